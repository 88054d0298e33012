"""Test set-up shared by every test file.

CI has no GPU, so the Triton kernels run on CPU tensors through Triton's interpreter. The
interpreter must be switched on before triton is first imported, which is why it happens here.
On a machine with a GPU, `FUSEDNORM_GPU=1` runs the same tests compiled on CUDA tensors.
"""

import os

if os.environ.get("FUSEDNORM_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
