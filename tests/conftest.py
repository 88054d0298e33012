"""Test set-up shared by every test file.

CI has no GPU, so the Triton kernels run on CPU tensors through Triton's interpreter. The
interpreter must be switched on before triton is first imported, which is why it happens here.
On a machine with a GPU, `FUSEDNORM_GPU=1` runs the same tests compiled on CUDA tensors.

numba sizes its thread pool once, from NUMBA_NUM_THREADS (default: the core count), when it is
first imported: 8 lets the thread-count tests run the CPU kernels on up to 8 threads on any
machine (`helpers.kernel_threads`). Every other test runs on torch's thread count, as users do.
"""

import os

if os.environ.get("FUSEDNORM_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "8")

import numba
import pytest
import torch

numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
