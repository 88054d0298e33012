"""What the channel norms' launchers share (GroupNorm/InstanceNorm in `group_norm.py`,
BatchNorm in `batch_norm.py`): the blocking constants, scratch, and the channels-last plan,
whose kernels (`kernels/channels_last.py`) serve all three.

The kernel contract of both families, CPU and Triton alike:

- `x`: an (N, C, S) view, S the product of the spatial sizes: contiguous when `channels_last`
  is false, strides (S·C, 1, C) when true (channels innermost); other strides are copied. `dy`
  is brought to x's layout.
- `weight`, `bias`: contiguous (C,) tensors of one dtype, the compute dtype (float32; float64
  for float64 input) or x's (half weights are read where they lie: a cast per call cost a small
  bfloat16 call more than its kernel's own reads); the Python layer passes ones and zeros when
  the module has none.
- `y`, `dx`: new tensors of x's dtype and layout; statistics in the compute dtype, parameter
  gradients in the parameters' (summed in the compute dtype, rounded once); variances biased;
  rstd = 1/sqrt(var + eps) recomputed identically wherever it is needed.
"""

from __future__ import annotations

import torch

from fusednorm._layout import conform, empty_layout  # noqa: F401 (the launchers' helpers)
from fusednorm.cpu._launch import (
    STORAGE,
    Kernel,
    Layout,
    compute_dtype,
    scratch,
    thread_cap,
    thread_state,
)

_num_threads = torch.get_num_threads

BLOCK = 2048  # elements per statistics block (channels first): a second pass stays in L1
# Channels last: elements per span (rows × C), a task and a piece of the statistics (the
# backward's sums read it from L2 again); and at most so many rows, each channel's sums running
# down them in order (their rounding grows with the count, as torch's do).
CL_SPAN, CL_MAX_ROWS = 32768, 1024


def cl_rows(c: int) -> int:
    """Rows (spatial positions) per channels-last span: from C alone."""
    return min(CL_MAX_ROWS, max(1, CL_SPAN // max(c, 1)))


def element_cost(x_dtype: torch.dtype, silu: bool) -> int:
    """A channel norm's work per element against float32's (`thread_cap`): its conversions
    from a half type, and a SiLU's exponential, each about double it (measured: a (1, 128, 16,
    16) bfloat16 GroupNorm with SiLU took 41 µs on one thread, 28 on two)."""
    return (2 if x_dtype in (torch.bfloat16, torch.float16) else 1) * (2 if silu else 1)


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
        buf = getattr(thread_state, "scratch", None)  # (`scratch`'s own test, a frame fewer)
        if buf is None or buf.numel() < total:
            buf = scratch(total)
        addr = buf.data_ptr()
        return buf, addr, addr + self.shared


# --- channels last: GroupNorm, InstanceNorm and BatchNorm -------------------------------------

_FIXED = ("n", "c", "s", "groups", "rows", "local_bytes", "training", "by_sample")
CL_FWD = Layout(("x", "weight", "bias", "y", "mean", "var", "scratch", "local"), _FIXED,
                ("eps",))
CL_BWD = Layout(("dy", "x", "weight", "bias", "mean", "var", "dx", "dweight", "dbias",
                 "scratch", "local"), _FIXED, ("eps",))


def _kernels():
    from fusednorm.cpu.kernels import channels_last

    return channels_last


_CL_FWD = Kernel("channels_last_fwd", CL_FWD, lambda *key: _kernels().build_fwd(*key))
_CL_BWD = Kernel("channels_last_bwd", CL_BWD, lambda *key: _kernels().build_bwd(*key))


class ChannelsLastPlan:
    """A channel norm over N samples of S rows of C channels (channels innermost), normalized
    per (sample, group of C/G channels): GroupNorm (InstanceNorm: G = C), and BatchNorm as one
    sample of all rows with G = C. `forward` and `backward` take addresses (the caller holds
    the tensors) and return nothing: the statistics are (N, G) arrays the caller passes."""

    def __init__(self, n_: int, c_: int, s_: int, groups: int, eps: float, silu: bool,
                 x_dtype: torch.dtype, p_dtype: torch.dtype) -> None:
        ct = compute_dtype(x_dtype)
        self.shape, self.groups, self.eps, self.silu = (n_, c_, s_), groups, eps, silu
        self.size = itemsize(ct)
        self.rows = cl_rows(c_)
        self.spans = (s_ + self.rows - 1) // self.rows
        # threads worth waking: 1 below the grain (only the speed depends on it)
        self.cap = thread_cap(n_ * c_ * s_, n_ * self.spans, element_cost(x_dtype, silu))
        # (SiLU is compiled in: a model runs one or the other, and each kernel is smaller)
        self.key = (STORAGE[ct], STORAGE[x_dtype], STORAGE[p_dtype], "silu" if silu else "")
        self._fwd = _CL_FWD[self.key]
        self._bwd = None  # compiled (or loaded) at the first backward
        self._tails: dict[tuple[bool, int, bool], tuple[Scratch, bytes]] = {}

    def _tail(self, backward: bool, threads: int, training: bool) -> tuple[Scratch, bytes]:
        """The scratch and the packed fixed arguments of a call (worked out once per thread
        count: small calls are dominated by such work)."""
        tail = self._tails.get((backward, threads, training))
        if tail is None:  # (the launchers look it up first themselves)
            n_, c_, s_ = self.shape
            by_sample = n_ >= 2 * threads  # a task per sample when every thread has some
            per = n_ * self.spans
            if backward:
                need = Scratch((2 * per * c_ + 4 * n_ * c_) * self.size, 2 * c_ * self.size)
            else:
                need = Scratch(16 * per * c_ + 2 * n_ * c_ * self.size, 3 * c_ * self.size)
            layout = CL_BWD if backward else CL_FWD
            tail = self._tails[backward, threads, training] = need, layout.fixed(
                n=n_, c=c_, s=s_, groups=self.groups, rows=self.rows,
                local_bytes=need.local, training=training,
                by_sample=by_sample, eps=self.eps)
        return tail

    def forward(self, x: int, weight: int, bias: int, y: int, mean: int, var: int,
                training: bool = True) -> None:
        """y from x; mean and var (N·G) written when training, else read."""
        # (`_launch.threads` and `_tail`'s lookup inlined: see `Launch`)
        threads = 1 if self.cap == 1 else min(self.cap, _num_threads())
        need, tail = self._tails.get((False, threads, training)) or self._tail(
            False, threads, training)
        _held, shared, local = need.take(threads)  # (held until the kernel returns)
        block = CL_FWD.pack_call(x, weight, bias, y, mean, var, shared, local) + tail
        if threads == 1:
            self._fwd.serial(block)
        else:
            self._fwd.on_threads(block, threads, 0)

    def backward(self, dy: int, x: int, weight: int, bias: int, mean: int, var: int, dx: int,
                 dweight: int, dbias: int, training: bool = True) -> None:
        """dx, dweight and dbias; `training`: mean and var were x's (else given)."""
        if self._bwd is None:
            self._bwd = _CL_BWD[self.key]
        threads = 1 if self.cap == 1 else min(self.cap, _num_threads())
        need, tail = self._tails.get((True, threads, training)) or self._tail(
            True, threads, training)
        _held, shared, local = need.take(threads)
        block = CL_BWD.pack_call(dy, x, weight, bias, mean, var, dx, dweight, dbias, shared,
                                 local) + tail
        if threads == 1:
            self._bwd.serial(block)
        else:
            self._bwd.on_threads(block, threads, 0)
