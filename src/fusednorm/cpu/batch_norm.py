"""BatchNorm on the CPU: launch plans for the numba kernels of `kernels/batch_norm.py`.

Kernel contract (the same in `triton/batch_norm.py`; layouts and dtypes at the top of
`_channels.py`):

    batch_norm_fwd(x, weight, bias, mean, var, eps, channels_last) -> (y, mean, var)
    batch_norm_bwd(dy, x, weight, bias, mean, var, eps, training, channels_last)
        -> (dx, dweight, dbias)

- forward: with `mean` and `var` None (training) the batch statistics are computed and returned,
  (C,) in the compute dtype, var biased; else the given (C,) running statistics normalize and
  are returned as they are.
- backward: `training` says whether mean and var were the batch's (they then depend on x);
  otherwise dx = dy·w·rstd.
"""

from __future__ import annotations

import torch

from fusednorm.cpu._channels import (
    ChannelsLastPlan,
    Scratch,
    conform,
    empty_layout,
    itemsize,
)
from fusednorm.cpu._launch import STORAGE, Kernel, Layout, compute_dtype, thread_cap

_num_threads = torch.get_num_threads

CHUNKS = 16  # channels first: chunks of samples whose statistics are merged in order

_FIXED = ("n", "c", "s", "training")
CF_FWD = Layout(("x", "weight", "bias", "y", "mean", "var", "scratch"), _FIXED, ("eps",))
CF_BWD = Layout(("dy", "x", "weight", "mean", "var", "dx", "dweight", "dbias", "scratch"),
                _FIXED, ("eps",))


def _kernels():
    from fusednorm.cpu.kernels import batch_norm

    return batch_norm


_CF_FWD = Kernel("batch_norm_cf_fwd", CF_FWD, lambda *key: _kernels().build_fwd(*key))
_CF_BWD = Kernel("batch_norm_cf_bwd", CF_BWD, lambda *key: _kernels().build_bwd(*key))


def _chunks(n_: int) -> int:
    per = (n_ + CHUNKS - 1) // CHUNKS
    return (n_ + per - 1) // per


class BatchNormPlan:
    """BatchNorm over (N, C, S) inputs in one layout and dtype. Channels last, it is the
    channel norm of one sample of N·S rows with a group per channel (`ChannelsLastPlan`)."""

    def __init__(self, n_: int, c_: int, s_: int, eps: float, channels_last: bool,
                 x_dtype: torch.dtype, p_dtype: torch.dtype | None = None) -> None:
        ct = compute_dtype(x_dtype)
        self.shape, self.cl, self.ct = (n_, c_, s_), channels_last, ct
        self.pt = p_dtype = p_dtype or ct  # the parameters' (and their gradients') dtype
        # templates of the new statistics and parameter gradients: `empty_like` costs half of
        # an `empty` given a dtype, on every call
        self.stats_like, self.grad_like = torch.empty(c_, dtype=ct), torch.empty(c_, dtype=p_dtype)
        if channels_last:
            self._cl = ChannelsLastPlan(1, c_, n_ * s_, c_, eps, False, x_dtype, p_dtype)
            return
        self.key = (STORAGE[ct], STORAGE[x_dtype], STORAGE[p_dtype])
        self._fwd = _CF_FWD[self.key]
        self._bwd = None  # compiled (or loaded) at the first backward
        # the fixed part of a call's block, by `training` (packed once: each call's would cost
        # a keyword call and a pack)
        self._tails = {t: CF_FWD.fixed(n=n_, c=c_, s=s_, training=t, eps=eps)
                       for t in (False, True)}
        self.cap = thread_cap(n_ * c_ * s_, max(n_ * c_, _chunks(n_)))
        size = itemsize(ct)
        self.scratch = (Scratch(2 * _chunks(n_) * c_ * 8 + 2 * c_ * size, 0),
                        Scratch((4 * c_ + 2 * _chunks(n_) * c_) * size, 0))

    def forward(self, x, weight, bias, mean=None, var=None):
        """(y, mean, var): the batch statistics when mean and var are None, else these."""
        training = mean is None
        if training:
            mean, var = torch.empty_like(self.stats_like), torch.empty_like(self.stats_like)
        y = torch.empty_like(x)  # (x is dense in the layout)
        # (held in names for the call: a temporary's memory would be freed before the kernel
        # reads it)
        mean_c, var_c = mean.contiguous(), var.contiguous()
        ptrs = (x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(),
                mean_c.data_ptr(), var_c.data_ptr())
        if self.cl:
            self._cl.forward(*ptrs, training=training)
        else:
            # (`_launch.threads` and `Launch.__call__` inlined: in a model each frame costs
            # several µs)
            n = 1 if self.cap == 1 else min(self.cap, _num_threads())
            _held, shared, _ = self.scratch[0].take(n)
            block = CF_FWD.pack_call(*ptrs, shared) + self._tails[training]
            if n == 1:
                self._fwd.serial(block)
            else:
                self._fwd.on_threads(block, n, 0)
        return y, mean, var

    def backward(self, dy, x, weight, mean, var, training: bool):
        dx = torch.empty_like(x)  # (x is dense in the layout)
        dw, db = torch.empty_like(self.grad_like), torch.empty_like(self.grad_like)
        mean_c, var_c = mean.contiguous(), var.contiguous()
        if self.cl:
            self._cl.backward(dy.data_ptr(), x.data_ptr(), weight.data_ptr(), 0,  # (no SiLU)
                              mean_c.data_ptr(), var_c.data_ptr(), dx.data_ptr(),
                              dw.data_ptr(), db.data_ptr(), training=training)
            return dx, dw, db
        if self._bwd is None:
            self._bwd = _CF_BWD[self.key]
        n = 1 if self.cap == 1 else min(self.cap, _num_threads())
        _held, shared, _ = self.scratch[1].take(n)
        block = CF_BWD.pack_call(dy.data_ptr(), x.data_ptr(), weight.data_ptr(),
                                 mean_c.data_ptr(), var_c.data_ptr(), dx.data_ptr(),
                                 dw.data_ptr(), db.data_ptr(), shared) + self._tails[training]
        if n == 1:
            self._bwd.serial(block)
        else:
            self._bwd.on_threads(block, n, 0)
        return dx, dw, db


# --- the contract ---------------------------------------------------------------------------------

_PLANS: dict[tuple, BatchNormPlan] = {}


def plan(x: torch.Tensor, eps: float, channels_last: bool, p_dtype: torch.dtype
         ) -> BatchNormPlan:
    """The plan for x (N, C, S) and parameters of p_dtype (cached)."""
    key = (tuple(x.shape), eps, channels_last, x.dtype, p_dtype)
    p = _PLANS.get(key)
    if p is None:
        if len(_PLANS) >= 256:
            _PLANS.clear()
        p = _PLANS[key] = BatchNormPlan(*x.shape, eps, channels_last, x.dtype, p_dtype)
    return p


def batch_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   mean: torch.Tensor | None, var: torch.Tensor | None, eps: float,
                   channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = conform(x, channels_last)
    if x.numel() == 0:
        if mean is None:
            c_ = x.shape[1]
            mean = torch.full((c_,), float("nan"), dtype=weight.dtype)
            var = mean.clone()
        return empty_layout(x, channels_last), mean, var
    return plan(x, eps, channels_last, weight.dtype).forward(
        x, weight.contiguous(), bias.contiguous(), mean, var)


def batch_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   mean: torch.Tensor, var: torch.Tensor, eps: float, training: bool,
                   channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = conform(x, channels_last)
    if x.numel() == 0:
        zero = torch.zeros(x.shape[1], dtype=weight.dtype)
        return empty_layout(x, channels_last), zero, zero.clone()
    dy = conform(dy if dy.dtype == x.dtype else dy.to(x.dtype), channels_last)
    return plan(x, eps, channels_last, weight.dtype).backward(dy, x, weight.contiguous(), mean,
                                                              var, training)
