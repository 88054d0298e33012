"""The row norms' registered torch.library ops, and the same maths in torch ops.

The ops take rows with any leading dims, x (*, N), and answer in the same shapes: y and h
(*, N), mean and rstd (*). Their implementation flattens the rows for the kernels of either
backend (the contract in docs/DESIGN.md); keeping the leading dims unflattened is what lets a
DTensor sharded along them (sequence parallelism: Shard(1) of (batch, sequence, hidden)) reach
the kernels without being gathered (`_dtensor.py` holds the ops' sharding rules). Absent outputs
are empty tensors so that every op returns plain tensors.

Compiled graphs, torch.func transforms, forward AD, DTensor and dispatch modes reach the
kernels through these ops; eager calls on plain tensors skip the dispatcher (`row_norm.py`).
Each op is registered twice with one implementation: Inductor replaces the `_fusable` twin by a
decomposition that it fuses with the neighbouring ops (`_inductor.py`).

`normalized`, `affine` and `first_order_grads` are the kernels' maths in differentiable torch
ops: the composite of the "torch" backend, the Inductor decompositions and every derivative of
the backward (double backward, its jvp).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusednorm import _inductor
from fusednorm._backend import kernels
from fusednorm._checks import as_rows, compute_dtype


def _fwd_impl(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
              eps: float, is_rms: bool, zero_centered: bool, dropout_p: float, seed: Tensor,
              out_dtype: torch.dtype, residual_dtype: torch.dtype | None,
              xhat_dtype: torch.dtype | None, backend: str
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n = x.shape[-1]
    lead = x.shape[:-1]
    y, h, mean, rstd = kernels(backend, "row_norm").norm_fwd(
        as_rows(x, n), weight, bias, None if residual is None else as_rows(residual, n), eps,
        is_rms, zero_centered, dropout_p, int(seed), out_dtype, residual_dtype, xhat_dtype,
    )
    h = h.view(x.shape) if h.numel() else x.new_empty((0,))
    mean = mean.view(lead) if not is_rms else x.new_empty((0,), dtype=compute_dtype(x.dtype))
    return y.view(x.shape), h, mean, rstd.view(lead)


def _fwd_fake(x, weight, bias, residual, eps, is_rms, zero_centered, dropout_p, seed,
              out_dtype, residual_dtype, xhat_dtype, backend):
    with_h = residual is not None or dropout_p > 0
    stats = compute_dtype(x.dtype)
    lead = x.shape[:-1]
    return (
        x.new_empty(x.shape, dtype=out_dtype),
        x.new_empty(x.shape, dtype=residual_dtype) if with_h else x.new_empty((0,)),
        x.new_empty((0,) if is_rms else lead, dtype=stats),
        x.new_empty(lead, dtype=stats),
    )


def _bwd_impl(dy: Tensor, h: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
              rstd: Tensor, dh_out: Tensor | None, eps: float, is_rms: bool,
              zero_centered: bool, dropout_p: float, seed: Tensor, has_residual: bool,
              x_dtype: torch.dtype, residual_dtype: torch.dtype | None, need_weight_grad: bool,
              from_output: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n = dy.shape[-1]
    dx, dres, dw, db = kernels(backend, "row_norm").norm_bwd(
        as_rows(dy, n), as_rows(h, n), weight, bias, mean.reshape(-1), rstd.reshape(-1),
        None if dh_out is None else as_rows(dh_out, n), eps, is_rms, zero_centered, dropout_p,
        int(seed), has_residual, x_dtype, residual_dtype, need_weight_grad, from_output,
    )
    dx = dx.view(dy.shape)
    dres = dres.view(dy.shape) if has_residual else dres
    # distinct empty tensors: a custom op's outputs may not alias one another
    return tuple(dy.new_empty((0,)) if t is None else t for t in (dx, dres, dw, db))


def _bwd_fake(dy, h, weight, bias, mean, rstd, dh_out, eps, is_rms, zero_centered, dropout_p,
              seed, has_residual, x_dtype, residual_dtype, need_weight_grad, from_output,
              backend):
    n = dy.shape[-1]

    def grad_of(p):
        return p.new_empty((n,)) if p is not None and need_weight_grad else dy.new_empty((0,))

    return (
        dy.new_empty(dy.shape, dtype=x_dtype),
        dy.new_empty(dy.shape, dtype=residual_dtype) if has_residual else dy.new_empty((0,)),
        grad_of(weight),
        grad_of(bias),
    )


def _registering(fake):
    def fake_of_fusable(*args):
        _inductor.register_decompositions()  # while a graph is traced: before Inductor lowers it
        return fake(*args)
    return fake_of_fusable


fwd_op = torch.library.custom_op("fusednorm::row_norm_fwd", _fwd_impl, mutates_args=())
bwd_op = torch.library.custom_op("fusednorm::row_norm_bwd", _bwd_impl, mutates_args=())
fwd_op_fusable = torch.library.custom_op("fusednorm::row_norm_fwd_fusable", _fwd_impl,
                                         mutates_args=())
bwd_op_fusable = torch.library.custom_op("fusednorm::row_norm_bwd_fusable", _bwd_impl,
                                         mutates_args=())
fwd_op.register_fake(_fwd_fake)
bwd_op.register_fake(_bwd_fake)
fwd_op_fusable.register_fake(_registering(_fwd_fake))
bwd_op_fusable.register_fake(_registering(_bwd_fake))


# ---------------------------------------------------------------------------------------------
# The maths in torch ops (rows (*, N) in the last dim).


def normalized(hc: Tensor, eps: float, is_rms: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """x̂, mean (None for RMSNorm) and rstd, (*, 1), of rows hc in the compute dtype."""
    if is_rms:
        rstd = torch.rsqrt(hc.square().mean(-1, keepdim=True) + eps)
        return hc * rstd, None, rstd
    mean = hc.mean(-1, keepdim=True)
    centred = hc - mean
    rstd = torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)
    return centred * rstd, mean, rstd


def effective_weight(weight: Tensor, zero_centered: bool, compute: torch.dtype) -> Tensor:
    """The weight the rows are multiplied by, in the compute dtype: w, or 1 + w (Gemma)."""
    return weight.to(compute) + 1 if zero_centered else weight.to(compute)


def affine(xhat: Tensor, weight: Tensor | None, bias: Tensor | None, zero_centered: bool,
           out_dtype: torch.dtype, xhat_dtype: torch.dtype | None) -> Tensor:
    compute = xhat.dtype
    if xhat_dtype is not None:
        xhat = xhat.to(xhat_dtype).to(compute)
    y = xhat
    if weight is not None:
        y = y * effective_weight(weight, zero_centered, compute)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(out_dtype)


def composite(h: Tensor, weight, bias, eps, is_rms, zero_centered, out_dtype, xhat_dtype):
    """The norm of rows h (*, N) in torch ops, with the kernels' dtypes and roundings."""
    xhat, _, _ = normalized(h.to(compute_dtype(h.dtype)), eps, is_rms)
    return affine(xhat, weight, bias, zero_centered, out_dtype, xhat_dtype)


def first_order_grads(dy: Tensor, h: Tensor, weight: Tensor | None, dh_out: Tensor | None,
                      keep: Tensor | None, eps: float, is_rms: bool, zero_centered: bool,
                      scale: float, need_bias_grad: bool, compute: torch.dtype,
                      stats: tuple[Tensor | None, Tensor] | None = None
                      ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(dh, dx, dweight, dbias) of the norm of rows h (*, N), in torch ops, in the compute
    dtype: dh the gradient of the norm's input (plus dh_out, the gradient flowing into h), dx =
    dh through the dropout mask `keep` (None: no dropout). The statistics are recomputed from h,
    so that the result can be differentiated again, unless `stats` (mean or None, rstd; (*))
    are given (Inductor's decomposition: the forward's, no second derivative)."""
    if stats is None:
        xhat, _, rstd = normalized(h.to(compute), eps, is_rms)
    else:
        mean, rstd = stats[0], stats[1].unsqueeze(-1)
        hc = h.to(compute)
        xhat = hc * rstd if is_rms else (hc - mean.unsqueeze(-1)) * rstd
    d = dy.to(compute)
    g = d if weight is None else d * effective_weight(weight, zero_centered, compute)
    dh = g - xhat * (g * xhat).mean(-1, keepdim=True)
    if not is_rms:
        dh = dh - g.mean(-1, keepdim=True)
    dh = dh * rstd
    if dh_out is not None:
        dh = dh + dh_out.to(compute)
    dx = dh if keep is None else dh * keep * scale
    lead = tuple(range(dy.dim() - 1))  # (none: one row; torch's sum(()) would sum it all)
    dw = None if weight is None else ((d * xhat).sum(lead) if lead else d * xhat)
    db = None if not need_bias_grad else (d.sum(lead) if lead else d)
    return dh, dx, dw, db
