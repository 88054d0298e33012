"""What the channel norms' launchers share (GroupNorm/InstanceNorm in `group_norm.py`,
BatchNorm in `batch_norm.py`): the blocking constants their kernels read, the kernels'
constants tensor, and the inputs brought to a kernel layout.

The kernel contract of both families, CPU and Triton alike:

- `x`: an (N, C, S) view, S the product of the spatial sizes: contiguous when `channels_last`
  is false, strides (S·C, 1, C) when true (channels innermost); other strides are copied. `dy`
  is brought to x's layout.
- `weight`, `bias`: contiguous (C,) tensors of the compute dtype (float32; float64 for float64
  input); the Python layer passes ones and zeros when the module has none.
- `y`, `dx`: new tensors of x's dtype and layout; statistics and parameter gradients in the
  compute dtype; variances biased; rstd = 1/sqrt(var + eps) recomputed identically wherever it
  is needed.
"""

from __future__ import annotations

import torch

from fusednorm._layout import conform, empty_layout  # noqa: F401 (the launchers' helpers)
from fusednorm.cpu._launch import scratch

BLOCK = 2048  # elements per statistics block (channels first): its two passes stay in L1
# A group (BatchNorm: a channel) up to this many elements keeps its converted x (and g) in
# scratch between the two sweeps: 256 KiB per array in float32, so both stay in L2.
KEEP = 1 << 16
CL_BLOCK = 4096  # elements per channels-last block (rows × C): a shape-only split, in L1

_CONSTS: dict[tuple[torch.dtype, float], torch.Tensor] = {}


def consts(ct: torch.dtype, eps: float) -> torch.Tensor:
    """The kernels' constants in the compute type: eps, 1, 0 (cached: kernels only read them,
    and a plan holds the tensor it passes)."""
    cp = _CONSTS.get((ct, eps))
    if cp is None:
        if len(_CONSTS) > 64:
            _CONSTS.clear()
        cp = _CONSTS[ct, eps] = torch.tensor([eps, 1.0, 0.0], dtype=ct)
    return cp


def kept(size: int) -> int:
    """Scratch elements per thread and array of the blocked paths: the whole group (channel)
    when it is kept between the sweeps, else a block."""
    return size if size <= KEEP else BLOCK


def cl_rows(c: int) -> int:
    """Rows (spatial positions) per channels-last block: from C alone."""
    return max(1, CL_BLOCK // max(c, 1))


def itemsize(dtype: torch.dtype) -> int:
    return 8 if dtype == torch.float64 else 4


def _round(nbytes: int) -> int:
    return (nbytes + 63) // 64 * 64  # whole cache lines: threads never share one


class Scratch:
    """A kernel's scratch: a `shared` region and a `local` one per thread, in bytes (float64
    arrays first in each, so that they stay 8-byte aligned)."""

    def __init__(self, shared: int, local: int) -> None:
        self.shared, self.local = _round(shared), _round(local)

    def take(self, threads: int) -> tuple[torch.Tensor | None, int, int]:
        """(buffer, its address, the first thread's local region's address): the buffer is
        held by the caller until the kernel returns."""
        total = self.shared + threads * self.local
        if not total:
            return None, 0, 0
        buf = scratch(total)
        addr = buf.data_ptr()
        return buf, addr, addr + self.shared
