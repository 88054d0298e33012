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
    Scratch,
    cl_rows,
    conform,
    consts,
    empty_layout,
    itemsize,
    kept,
)
from fusednorm.cpu._launch import STORAGE, Kernel, Layout, compute_dtype, thread_cap, threads

CHUNKS = 16  # channels first: chunks of samples whose statistics are merged in order
SPAN = 16  # channels last: blocks per statistics piece (all N·S rows' pieces merged in order)

_CALL = ("x", "weight", "bias", "y", "mean", "var", "consts", "scratch", "local")
_CALL_BWD = ("dy", "x", "weight", "mean", "var", "dx", "dweight", "dbias", "consts", "scratch",
             "local")
CF_FWD = Layout(_CALL, ("n", "c", "s", "local_bytes", "training"))
CF_BWD = Layout(_CALL_BWD, ("n", "c", "s", "local_bytes", "training"))
CL_FWD = Layout(_CALL, ("m", "c", "rows", "local_bytes", "training"))
CL_BWD = Layout(_CALL_BWD, ("m", "c", "rows", "local_bytes", "training"))


def _kernels():
    from fusednorm.cpu.kernels import batch_norm

    return batch_norm


_CF_FWD = Kernel("batch_norm_cf_fwd", CF_FWD, lambda *key: _kernels().build_cf_fwd(*key))
_CF_BWD = Kernel("batch_norm_cf_bwd", CF_BWD, lambda *key: _kernels().build_cf_bwd(*key))
_CL_FWD = Kernel("batch_norm_cl_fwd", CL_FWD, lambda *key: _kernels().build_cl_fwd(*key))
_CL_BWD = Kernel("batch_norm_cl_bwd", CL_BWD, lambda *key: _kernels().build_cl_bwd(*key))


def _chunks(n_: int) -> int:
    per = (n_ + CHUNKS - 1) // CHUNKS
    return (n_ + per - 1) // per


def _scratch(n_: int, c_: int, s_: int, rows: int, half: bool, channels_last: bool,
             backward: bool, size: int) -> Scratch:
    """What the kernels carve (`kernels/batch_norm.py`, each entry's comments)."""
    if channels_last:
        nsp = ((n_ * s_ + rows - 1) // rows + SPAN - 1) // SPAN
        if backward:
            return Scratch((5 * c_ + 2 * nsp * c_) * size, 0)
        return Scratch(2 * nsp * c_ * 8 + 2 * c_ * size, 2 * c_ * 8 + 3 * c_ * size)
    if half:
        return Scratch(0, (2 if backward else 1) * kept(n_ * s_) * size)
    if backward:
        return Scratch((4 * c_ + 2 * _chunks(n_) * c_) * size, 0)
    return Scratch(2 * _chunks(n_) * c_ * 8 + 2 * c_ * size, 0)


class BatchNormPlan:
    """BatchNorm over (N, C, S) inputs in one layout and dtype."""

    def __init__(self, n_: int, c_: int, s_: int, eps: float, channels_last: bool,
                 x_dtype: torch.dtype, dy_dtype: torch.dtype | None = None) -> None:
        ct = compute_dtype(x_dtype)
        self.shape, self.cl, self.x_dtype, self.ct = (n_, c_, s_), channels_last, x_dtype, ct
        self.cp = consts(ct, eps)
        self.size = itemsize(ct)
        self.rows = cl_rows(c_)
        self.half = x_dtype == torch.float16
        self.cap = thread_cap(n_ * c_ * s_, max(n_ * c_, n_ * s_))
        key = (STORAGE[ct], STORAGE[x_dtype])
        self._fwd = (_CL_FWD if channels_last else _CF_FWD)[key]
        # the backward kernel is compiled (or loaded) at the first backward: inference never
        # waits for it, and a first training step waits for each kernel in turn
        self._bwd_key = key if channels_last else key + (STORAGE[x_dtype],)
        self._bwd_kernel = None

    def _threads(self) -> int:
        return threads(self.cap)

    def _call(self, kernel, layout: Layout, pointers: list, training: bool,
              backward: bool) -> None:
        n_, c_, s_ = self.shape
        threads = self._threads()
        need = _scratch(n_, c_, s_, self.rows, self.half, self.cl, backward, self.size)
        _held, shared, local = need.take(threads)  # (held until the kernel returns)
        if self.cl:
            fixed = layout.fixed(m=n_ * s_, c=c_, rows=self.rows, local_bytes=need.local,
                                 training=training)
        else:
            fixed = layout.fixed(n=n_, c=c_, s=s_, local_bytes=need.local, training=training)
        kernel(layout.pack_call(*pointers, self.cp.data_ptr(), shared, local) + fixed, threads)

    def forward(self, x, weight, bias, mean=None, var=None):
        """(y, mean, var): the batch statistics when mean and var are None, else these."""
        training = mean is None
        if training:
            c_ = self.shape[1]
            mean, var = torch.empty(c_, dtype=self.ct), torch.empty(c_, dtype=self.ct)
        y = empty_layout(x, self.cl)
        # (held in names for the call: a temporary's memory would be freed before the kernel
        # reads it)
        mean_c, var_c = mean.contiguous(), var.contiguous()
        self._call(self._fwd, CL_FWD if self.cl else CF_FWD,
                   [x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(),
                    mean_c.data_ptr(), var_c.data_ptr()], training, False)
        return y, mean, var

    def backward(self, dy, x, weight, mean, var, training: bool):
        c_ = self.shape[1]
        dx = empty_layout(x, self.cl)
        dw, db = torch.empty(c_, dtype=self.ct), torch.empty(c_, dtype=self.ct)
        mean_c, var_c = mean.contiguous(), var.contiguous()
        if self._bwd_kernel is None:
            self._bwd_kernel = (_CL_BWD if self.cl else _CF_BWD)[self._bwd_key]
        self._call(self._bwd_kernel, CL_BWD if self.cl else CF_BWD,
                   [dy.data_ptr(), x.data_ptr(), weight.data_ptr(), mean_c.data_ptr(),
                    var_c.data_ptr(), dx.data_ptr(), dw.data_ptr(), db.data_ptr()], training,
                   True)
        return dx, dw, db


# --- the contract ---------------------------------------------------------------------------------

_PLANS: dict[tuple, BatchNormPlan] = {}


def plan(x: torch.Tensor, eps: float, channels_last: bool) -> BatchNormPlan:
    """The plan for x (N, C, S) (cached)."""
    key = (tuple(x.shape), eps, channels_last, x.dtype)
    p = _PLANS.get(key)
    if p is None:
        if len(_PLANS) >= 256:
            _PLANS.clear()
        p = _PLANS[key] = BatchNormPlan(*x.shape, eps, channels_last, x.dtype)
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
    return plan(x, eps, channels_last).forward(x, weight.contiguous(), bias.contiguous(), mean,
                                               var)


def batch_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   mean: torch.Tensor, var: torch.Tensor, eps: float, training: bool,
                   channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = conform(x, channels_last)
    if x.numel() == 0:
        zero = torch.zeros(x.shape[1], dtype=weight.dtype)
        return empty_layout(x, channels_last), zero, zero.clone()
    dy = conform(dy if dy.dtype == x.dtype else dy.to(x.dtype), channels_last)
    return plan(x, eps, channels_last).backward(dy, x, weight.contiguous(), mean, var, training)
