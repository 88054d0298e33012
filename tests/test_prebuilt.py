"""The shipped kernels (cpu/_prebuilt.py): built from this source, finalized into numba's own
machine code, and enough for a new environment's common first calls without numba."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import zipfile

import llvmlite.binding as ll
import pytest

from fusednorm.cpu import _launch, _llvm, _prebuilt


def _manifest() -> dict:
    with zipfile.ZipFile(_prebuilt.archive_path()) as archive:
        return json.loads(archive.read(_prebuilt.MANIFEST))


def test_the_archive_is_built_from_this_source():
    """Fails after any change under cpu/ until `make prebuilt` rebuilds the archive (until then
    every kernel is compiled by numba: correct, and a second or two per first call slower)."""
    assert _prebuilt.archive_path().is_file(), "no archive for this target: run `make prebuilt`"
    manifest = _manifest()
    assert manifest["source"] == _launch.kernel_source_hash(), (
        "the kernels' source changed since the archive was built: run `make prebuilt`")
    assert manifest["llvm"][0] == ll.llvm_version_info[0], "rebuild with this llvmlite"
    assert manifest["triple"] == ll.get_process_triple()


def test_an_archive_from_other_source_or_switched_off_is_not_used(monkeypatch):
    stale = _prebuilt._Shelf("0" * 64)
    assert stale.entries == {} and "another version" in stale.reason
    assert stale.object_code("row_norm_fwd", ("float32",) * 7) is None
    monkeypatch.setenv("FUSEDNORM_PREBUILT", "0")
    off = _prebuilt._Shelf(_launch.kernel_source_hash())
    assert off.entries == {} and "FUSEDNORM_PREBUILT" in off.reason


# One specialization of each family, with each storage conversion (bfloat16's bit shifts,
# float16's helper functions linked into the kernel) and the fused SiLU.
REPLAYED = [
    ("layer_norm", "_FWD", ("float32", "float32", "", "float32", "float32", "", "")),
    ("layer_norm", "_BWD", ("float32", "uint16", "uint16", "uint16", "", "uint16", "", "", "")),
    ("group_norm", "_CF_FWD", ("float32", "int16", "int16", "silu")),
    ("batch_norm", "_CF_BWD", ("float32", "uint16", "uint16")),
    ("_channels", "_CL_BWD", ("float32", "float32", "float32", "silu")),
]


@pytest.mark.parametrize(("module", "kernel", "key"), REPLAYED,
                         ids=[f"{m}{k}" for m, k, _ in REPLAYED])
def test_finalizing_the_bitcode_gives_numbas_machine_code(module, kernel, key):
    """`_llvm.finalize` replays numba's finalization: from the module numba had just before it,
    the same object code, byte for byte (a pass missing, or other options, changes it)."""
    from fusednorm.cpu.kernels import _compile

    family = getattr(importlib.import_module(f"fusednorm.cpu.{module}"), kernel)
    kept: dict = {}
    obj, _ = _compile.compile_kernel(family, key, _launch._runtime().symbols, kept)
    replayed = _llvm.finalize(ll.parse_bitcode(kept["module"]), _compile.pipeline())
    assert replayed == obj


_FIRST_CALLS = r"""
import hashlib, json, sys, torch, fusednorm
torch.manual_seed(0)
digests = []
def note(*tensors):
    for t in tensors:
        digests.append(hashlib.sha256(t.detach().float().numpy().tobytes()).hexdigest()[:12])
for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(6, 96, dtype=dtype, requires_grad=True)
    norm = fusednorm.LayerNorm(96, dtype=dtype)
    y = norm(x)
    y.backward(torch.randn_like(y))
    note(y, x.grad, norm.weight.grad)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 8, 5, 5, dtype=dtype).contiguous(memory_format=layout)
        x.requires_grad_()
        for norm in (fusednorm.GroupNorm(4, 8, dtype=dtype), fusednorm.BatchNorm2d(8, dtype=dtype)):
            y = norm(x)
            y.backward(torch.randn_like(y))
            note(y, x.grad, norm.weight.grad)
print(json.dumps({"numba": "numba" in sys.modules, "digests": digests}))
"""


def _first_calls(cache, prebuilt: str) -> dict:
    env = dict(os.environ, FUSEDNORM_CACHE_DIR=str(cache), FUSEDNORM_PREBUILT=prebuilt)
    out = subprocess.run([sys.executable, "-c", _FIRST_CALLS], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def test_a_new_environment_runs_the_common_kernels_without_numba(tmp_path):
    """An empty kernel cache: the row and channel norms' first forward and backward (float32,
    bfloat16, both layouts) load the shipped kernels, never import numba, and give bitwise what
    the kernels numba compiles give."""
    shipped = _first_calls(tmp_path / "shipped", "1")
    compiled = _first_calls(tmp_path / "compiled", "0")
    assert (shipped["numba"], compiled["numba"]) == (False, True)
    assert shipped["digests"] == compiled["digests"]
    assert len(set(shipped["digests"])) == len(shipped["digests"])  # (every output is its own)


def test_the_archive_holds_what_warmup_compiles(tmp_path):
    """`make prebuilt` ships the specializations `python -m fusednorm warmup` reaches: a warmup
    in a new environment imports no numba."""
    code = ("import json, sys, fusednorm._setup as s; n = s.warmup(); "
            "print(json.dumps([n, 'numba' in sys.modules]))")
    env = dict(os.environ, FUSEDNORM_PREBUILT="1", FUSEDNORM_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    count, numba_imported = json.loads(out.stdout.splitlines()[-1])
    assert count == len(_manifest()["kernels"]) and not numba_imported



def test_a_damaged_archive_falls_back_to_numba(tmp_path, monkeypatch):
    """A member LLVM cannot read gives no kernel (numba compiles it instead), not an error."""
    damaged = tmp_path / "damaged.zip"
    with zipfile.ZipFile(_prebuilt.archive_path()) as src, \
            zipfile.ZipFile(damaged, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            dst.writestr(name, data if name == _prebuilt.MANIFEST else data[: len(data) // 2])
    shelf = _prebuilt._Shelf(_launch.kernel_source_hash())
    monkeypatch.setattr(shelf, "path", damaged)
    entry = json.loads(next(iter(shelf.entries)))
    assert shelf.object_code(entry[0], tuple(entry[1:])) is None
