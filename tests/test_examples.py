"""The four scripts in examples/ run and match torch.nn.LayerNorm (each asserts it inside)."""

import pathlib
import runpy

import pytest

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize("name", ["basic", "shapes", "no_affine", "transformer_block"])
def test_example(name):
    runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
