"""GroupNorm and InstanceNorm on the CPU: launch plans for the numba kernels of
`kernels/group_norm.py` (InstanceNorm is GroupNorm with G = C).

Kernel contract (the same in `triton/group_norm.py`; the layouts and dtypes are written at the
top of `_channels.py`):

    group_norm_fwd(x, weight, bias, groups, eps, silu, channels_last) -> (y, mean, var)
    group_norm_bwd(dy, x, weight, bias, mean, var, groups, eps, silu, channels_last)
        -> (dx, dweight, dbias)

`mean`, `var`: (N, G); silu: y = silu(x̂·w + b), the backward recomputing z = x̂·w + b.
"""

from __future__ import annotations

import torch

from fusednorm.cpu._channels import (
    BLOCK,
    Scratch,
    cl_rows,
    conform,
    consts,
    empty_layout,
    itemsize,
    kept,
)
from fusednorm.cpu._launch import STORAGE, Kernel, Layout, compute_dtype, thread_cap, threads

_SHAPE = ("n", "c", "s", "groups", "local_bytes")
_CALL = ("x", "weight", "bias", "y", "mean", "var", "consts", "scratch", "local")
_CALL_BWD = ("dy", "x", "weight", "bias", "mean", "var", "dx", "dweight", "dbias", "consts",
             "scratch", "local")
CF_FWD = Layout(_CALL, _SHAPE + ("silu",))
CF_BWD = Layout(_CALL_BWD, _SHAPE + ("silu",))
CL_FWD = Layout(_CALL, _SHAPE + ("rows", "silu", "by_sample"))
CL_BWD = Layout(_CALL_BWD, _SHAPE + ("rows", "silu", "by_sample"))


def _kernels():
    from fusednorm.cpu.kernels import group_norm

    return group_norm


_CF_FWD = Kernel("group_norm_cf_fwd", CF_FWD, lambda *key: _kernels().build_cf_fwd(*key))
_CF_BWD = Kernel("group_norm_cf_bwd", CF_BWD, lambda *key: _kernels().build_cf_bwd(*key))
_CL_FWD = Kernel("group_norm_cl_fwd", CL_FWD, lambda *key: _kernels().build_cl_fwd(*key))
_CL_BWD = Kernel("group_norm_cl_bwd", CL_BWD, lambda *key: _kernels().build_cl_bwd(*key))


def _cf_scratch(n_: int, c_: int, s_: int, groups: int, half: bool, backward: bool,
                size: int) -> Scratch:
    """What the channels-first kernels carve (`build_cf_fwd`, `build_cf_bwd`)."""
    k = kept(c_ // groups * s_)
    if not backward:
        return Scratch(0, k * size if half else 0)
    return Scratch(2 * n_ * c_ * size, (2 * k + BLOCK) * size)


def _cl_scratch(n_: int, c_: int, s_: int, groups: int, rows: int, by_sample: bool,
                backward: bool, size: int) -> Scratch:
    """What the channels-last kernels carve (`build_cl_fwd`, `build_cl_bwd`)."""
    ntask = n_ * ((s_ + rows - 1) // rows)
    if not backward:
        if by_sample:
            return Scratch(0, 4 * groups * 8 + 5 * c_ * size)
        return Scratch(2 * ntask * groups * 8 + 2 * n_ * c_ * size,
                       2 * groups * 8 + 3 * c_ * size)
    if by_sample:
        return Scratch(2 * n_ * c_ * size, 7 * c_ * size)
    return Scratch((7 * n_ * c_ + 2 * ntask * c_) * size, 0)


class GroupNormPlan:
    """GroupNorm over (N, C, S) inputs in one layout and dtype: the kernels and their fixed
    arguments, for `forward` and `backward` calls on tensors already in that layout."""

    def __init__(self, n_: int, c_: int, s_: int, groups: int, eps: float, silu: bool,
                 channels_last: bool, x_dtype: torch.dtype) -> None:
        ct = compute_dtype(x_dtype)
        self.shape, self.groups, self.cl, self.x_dtype, self.ct = (
            (n_, c_, s_), groups, channels_last, x_dtype, ct)
        self.cp = consts(ct, eps)
        self.size = itemsize(ct)
        self.rows = cl_rows(c_)
        self.silu = silu
        work = n_ * c_ * s_
        # threads worth waking: 1 below the grain (only the speed depends on it)
        self.cap = thread_cap(work, n_ * ((s_ + self.rows - 1) // self.rows) if channels_last
                              else n_ * groups)
        key = (STORAGE[ct], STORAGE[x_dtype])
        self._fwd = (_CL_FWD if channels_last else _CF_FWD)[key]
        # the backward kernel is compiled (or loaded) at the first backward: inference never
        # waits for it, and a first training step waits for each kernel in turn
        self._bwd_key = key if channels_last else key + (STORAGE[x_dtype],)
        self._bwd_kernel = None
        self._calls: dict[tuple[bool, int], tuple[Scratch, bytes]] = {}

    def _threads(self) -> int:
        return threads(self.cap)

    def _call(self, backward: bool, threads: int) -> tuple[Scratch, bytes]:
        """The scratch and the packed fixed arguments of a call on `threads` threads (worked
        out once per thread count: small calls are dominated by such work)."""
        call = self._calls.get((backward, threads))
        if call is None:
            need, fixed = self._scratch(backward, threads)
            layout = (CL_BWD if self.cl else CF_BWD) if backward else (
                CL_FWD if self.cl else CF_FWD)
            call = self._calls[backward, threads] = need, layout.fixed(**fixed)
        return call

    def _scratch(self, backward: bool, threads: int) -> tuple[Scratch, dict]:
        """The scratch and the fixed arguments of a call on `threads` threads."""
        n_, c_, s_ = self.shape
        by_sample = n_ >= 2 * threads  # channels last: a task per sample when all have some
        if self.cl:
            need = _cl_scratch(n_, c_, s_, self.groups, self.rows, by_sample, backward,
                               self.size)
            extra = {"rows": self.rows, "by_sample": by_sample}
        else:
            need = _cf_scratch(n_, c_, s_, self.groups, self.x_dtype == torch.float16,
                               backward, self.size)
            extra = {}
        return need, dict(n=n_, c=c_, s=s_, groups=self.groups, silu=self.silu,
                          local_bytes=need.local, **extra)

    def forward(self, x, weight, bias):
        """(y, stats) of x in the plan's layout (any shape whose memory is (N, C, S) in it);
        y is like x, stats (2, N, G): mean, then the biased variance."""
        y = torch.empty_like(x)
        stats = torch.empty((2, self.shape[0], self.groups), dtype=self.ct)
        mean = stats.data_ptr()
        threads = self._threads()
        need, tail = self._call(False, threads)
        _held, shared, local = need.take(threads)  # (held until the kernel returns)
        layout = CL_FWD if self.cl else CF_FWD
        self._fwd(layout.pack_call(
            x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(), mean,
            mean + self.shape[0] * self.groups * self.size, self.cp.data_ptr(), shared, local)
            + tail, threads)
        return y, stats

    def backward(self, dy, x, weight, bias, stats):
        """(dx, dweight, dbias); dy and x in the plan's layout and dtype, dx like x; stats as
        `forward` returns them (contiguous)."""
        c_ = self.shape[1]
        dx = torch.empty_like(x)
        dw, db = torch.empty(c_, dtype=self.ct), torch.empty(c_, dtype=self.ct)
        mean = stats.data_ptr()
        threads = self._threads()
        need, tail = self._call(True, threads)
        _held, shared, local = need.take(threads)  # (held until the kernel returns)
        layout = CL_BWD if self.cl else CF_BWD
        if self._bwd_kernel is None:
            self._bwd_kernel = (_CL_BWD if self.cl else _CF_BWD)[self._bwd_key]
        self._bwd_kernel(layout.pack_call(
            dy.data_ptr(), x.data_ptr(), weight.data_ptr(), bias.data_ptr(), mean,
            mean + self.shape[0] * self.groups * self.size, dx.data_ptr(), dw.data_ptr(),
            db.data_ptr(), self.cp.data_ptr(), shared, local) + tail, threads)
        return dx, dw, db


# --- the contract ---------------------------------------------------------------------------------

_PLANS: dict[tuple, GroupNormPlan] = {}


def plan(x: torch.Tensor, groups: int, eps: float, silu: bool, channels_last: bool
         ) -> GroupNormPlan:
    """The plan for x (N, C, S) (cached)."""
    key = (tuple(x.shape), groups, eps, silu, channels_last, x.dtype)
    p = _PLANS.get(key)
    if p is None:
        if len(_PLANS) >= 256:
            _PLANS.clear()
        p = _PLANS[key] = GroupNormPlan(*x.shape, groups, eps, silu, channels_last, x.dtype)
    return p


def group_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                   eps: float, silu: bool, channels_last: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = conform(x, channels_last)
    if x.numel() == 0:
        nan = torch.full((x.shape[0], groups), float("nan"), dtype=weight.dtype)
        return empty_layout(x, channels_last), nan, nan.clone()
    y, stats = plan(x, groups, eps, silu, channels_last).forward(
        x, weight.contiguous(), bias.contiguous())
    # separate tensors: the outputs of an op may not alias one another
    return y, stats[0].clone(), stats[1].clone()


def group_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   mean: torch.Tensor, var: torch.Tensor, groups: int, eps: float, silu: bool,
                   channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = conform(x, channels_last)
    c_ = x.shape[1]
    if x.numel() == 0:
        zero = torch.zeros(c_, dtype=weight.dtype)
        return empty_layout(x, channels_last), zero, zero.clone()
    dy = conform(dy if dy.dtype == x.dtype else dy.to(x.dtype), channels_last)
    return plan(x, groups, eps, silu, channels_last).backward(
        dy, x, weight.contiguous(), bias.contiguous(), torch.stack([mean, var]))
