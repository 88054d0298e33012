"""GroupNorm and InstanceNorm on the CPU: launch plans for the numba kernels of
`kernels/group_norm.py` (channels first) and `kernels/channels_last.py` (InstanceNorm is
GroupNorm with G = C).

Kernel contract (the same in `triton/group_norm.py`; the layouts and dtypes are written at the
top of `_channels.py`):

    group_norm_fwd(x, weight, bias, groups, eps, silu, channels_last) -> (y, mean, var)
    group_norm_bwd(dy, x, weight, bias, mean, var, groups, eps, silu, channels_last)
        -> (dx, dweight, dbias)

`mean`, `var`: (N, G); silu: y = silu(x̂·w + b), the backward recomputing z = x̂·w + b.
"""

from __future__ import annotations

import struct
import threading

import torch

from fusednorm.cpu._channels import (
    ChannelsLastPlan,
    Scratch,
    conform,
    element_cost,
    empty_layout,
    itemsize,
)
from fusednorm.cpu._launch import STORAGE, Kernel, Layout, compute_dtype, thread_cap

_num_threads = torch.get_num_threads
_FIXED = ("n", "c", "s", "groups")
CF_FWD = Layout(("x", "weight", "bias", "y", "mean", "var"), _FIXED, ("eps",))
CF_BWD = Layout(("dy", "x", "weight", "bias", "mean", "var", "dx", "dweight", "dbias",
                 "scratch", "local"), _FIXED, ("eps",))


def _kernels():
    from fusednorm.cpu.kernels import group_norm

    return group_norm


_CF_FWD = Kernel("group_norm_cf_fwd", CF_FWD, lambda *key: _kernels().build_fwd(*key))
_CF_BWD = Kernel("group_norm_cf_bwd", CF_BWD, lambda *key: _kernels().build_bwd(*key))


class GroupNormPlan:
    """GroupNorm over (N, C, S) inputs in one layout and dtype: the kernels and their fixed
    arguments, for `forward` and `backward` calls on tensors already in that layout."""

    def __init__(self, n_: int, c_: int, s_: int, groups: int, eps: float, silu: bool,
                 channels_last: bool, x_dtype: torch.dtype,
                 p_dtype: torch.dtype | None = None) -> None:
        ct = compute_dtype(x_dtype)
        self.shape, self.groups, self.cl, self.ct = (n_, c_, s_), groups, channels_last, ct
        self.eps, self.silu = eps, silu
        self.pt = p_dtype = p_dtype or ct  # the parameters' (and their gradients') dtype
        self.size = itemsize(ct)
        # templates of the new statistics and parameter gradients: `empty_like` costs half of
        # an `empty` given a dtype, on every call
        self.stats_like = torch.empty((2, n_, groups), dtype=ct)
        self.var_at = n_ * groups * self.size  # (the variances' offset in stats, in bytes)
        self._spare = threading.local()  # (see `forward`)
        self.grad_like = torch.empty(c_, dtype=p_dtype)
        if channels_last:
            self._cl = ChannelsLastPlan(n_, c_, s_, groups, eps, silu, x_dtype, p_dtype)
            return
        # (SiLU is compiled in: a model runs one or the other, and each kernel is smaller)
        self.key = (STORAGE[ct], STORAGE[x_dtype], STORAGE[p_dtype], "silu" if silu else "")
        self._fwd = _CF_FWD[self.key]
        self._bwd = None  # compiled (or loaded) at the first backward
        # threads worth waking: 1 below the grain (only the speed depends on it)
        self.cap = thread_cap(n_ * c_ * s_, n_ * groups, element_cost(x_dtype, silu))
        self.tail = CF_FWD.fixed(n=n_, c=c_, s=s_, groups=groups, eps=eps)
        # the backward's: Σg, Σg·x̂ per (n, c); with SiLU per thread a group's g
        self.scratch = Scratch(2 * n_ * c_ * self.size, c_ // groups * s_ * self.size if silu else 0)

    def forward(self, x, weight, bias, spare=False):
        """(y, stats) of x in the plan's layout (any shape whose memory is (N, C, S) in it);
        y is like x, stats (2, N, G): mean, then the biased variance. With `spare` the
        statistics go to this thread's spare buffer, overwritten by its next such call (a call
        without gradients has no use for them; a new tensor each call cost ~1 µs of a 10 µs
        call)."""
        y = torch.empty_like(x)
        if not spare:
            stats = torch.empty_like(self.stats_like)
        else:
            stats = getattr(self._spare, "stats", None)
            if stats is None:
                stats = self._spare.stats = torch.empty_like(self.stats_like)
        mean = stats.data_ptr()
        if self.cl:
            self._cl.forward(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(),
                             mean, mean + self.var_at)
            return y, stats
        block = CF_FWD.pack_call(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(),
                                 mean, mean + self.var_at) + self.tail
        # (`threads` and `Launch.__call__` inlined: in a model each frame costs several µs)
        if self.cap == 1:
            self._fwd.serial(block)
        else:
            self._fwd.on_threads(block, min(self.cap, _num_threads()), 0)
        return y, stats

    def backward(self, dy, x, weight, bias, stats):
        """(dx, dweight, dbias); dy and x in the plan's layout and dtype, dx like x; stats as
        `forward` returns them (contiguous)."""
        dx = torch.empty_like(x)
        dw, db = torch.empty_like(self.grad_like), torch.empty_like(self.grad_like)
        mean = stats.data_ptr()
        if self.cl:
            self._cl.backward(dy.data_ptr(), x.data_ptr(), weight.data_ptr(), bias.data_ptr(),
                              mean, mean + self.var_at, dx.data_ptr(), dw.data_ptr(),
                              db.data_ptr())
            return dx, dw, db
        if self._bwd is None:
            self._bwd = _CF_BWD[self.key]
        n = 1 if self.cap == 1 else min(self.cap, _num_threads())
        _held, shared, local = self.scratch.take(n)  # (held until the kernel returns)
        block = CF_BWD.pack_call(dy.data_ptr(), x.data_ptr(), weight.data_ptr(), bias.data_ptr(),
                                 mean, mean + self.var_at, dx.data_ptr(), dw.data_ptr(),
                                 db.data_ptr(), shared, local) + self.tail
        if n == 1:
            self._bwd.serial(block)
        else:
            self._bwd.on_threads(block, n, 0)
        return dx, dw, db


    def native_descriptor(self) -> bytes | None:
        """The plan as `csrc/group_norm_node.cpp` reads it (its `Desc`, then the forward's and
        the backward's fixed block parts); None until the backward kernel is loaded (the first
        backward loads it: a forward never waits for it)."""
        n_, c_, _ = self.shape
        k = self._cl if self.cl else self  # (the launcher: channels last's plan, or this one)
        if k._bwd is None:
            return None
        # (the fixed parts of one thread count serve any other: it only splits the work)
        threads = 1 if k.cap == 1 else min(k.cap, _num_threads())
        if self.cl:
            need_f, tail_f = k._tail(False, threads, True)
            need_b, tail_b = k._tail(True, threads, True)
            scratch = (need_f.shared, need_f.local, need_b.shared, need_b.local)
        else:  # (the forward takes no scratch; one fixed part serves both)
            tail_f = tail_b = self.tail
            scratch = (0, 0, self.scratch.shared, self.scratch.local)
        return _DESC.pack(k._fwd.address, k._bwd.address, threads, k.cap, n_, c_, self.groups,
                          self.var_at, 1 if self.ct == torch.float64 else 0, *scratch,
                          int(self.cl), self.silu, len(tail_f), len(tail_b),
                          self.eps) + tail_f + tail_b


# `Desc` of csrc/group_norm_node.cpp: 17 int64 fields, then eps
_DESC = struct.Struct("<17qd")


# --- the contract ---------------------------------------------------------------------------------

_PLANS: dict[tuple, GroupNormPlan] = {}


def plan(x: torch.Tensor, groups: int, eps: float, silu: bool, channels_last: bool,
         p_dtype: torch.dtype) -> GroupNormPlan:
    """The plan for x (N, C, S) and parameters of p_dtype (cached)."""
    key = (tuple(x.shape), groups, eps, silu, channels_last, x.dtype, p_dtype)
    p = _PLANS.get(key)
    if p is None:
        if len(_PLANS) >= 256:
            _PLANS.clear()
        p = _PLANS[key] = GroupNormPlan(*x.shape, groups, eps, silu, channels_last, x.dtype,
                                        p_dtype)
    return p


def group_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                   eps: float, silu: bool, channels_last: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = conform(x, channels_last)
    if x.numel() == 0:
        nan = torch.full((x.shape[0], groups), float("nan"), dtype=weight.dtype)
        return empty_layout(x, channels_last), nan, nan.clone()
    y, stats = plan(x, groups, eps, silu, channels_last, weight.dtype).forward(
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
    return plan(x, groups, eps, silu, channels_last, weight.dtype).backward(
        dy, x, weight.contiguous(), bias.contiguous(), torch.stack([mean, var]))
