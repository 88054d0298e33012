"""The row norms as autograd Functions that torch's transforms compose with.

`RowNorm` and `RowNormBackward` run the kernels through the registered ops (`_row_ops.py`) and
carry a rule for every transform, so that torch.func (vmap, grad, jvp, jacrev, jacfwd, hessian,
functional_call), forward-mode AD, DTensor (the ops' sharding rules) and dispatch modes all
compose with them. Eager calls on plain tensors take the leaner Functions of `_row_plans.py`;
torch.compile its own (dynamo does not trace a custom jvp).

- vmap: a batched row norm is the same norm over more rows: one kernel launch. Per-sample
  weights (vmap over stacked parameters) normalize without the affine, then apply each sample's
  weight and bias in torch ops; the batched backward computes dx on the kernels and each
  sample's weight gradients as sums in torch ops. Dropout under `randomness="different"` draws
  one seed for the whole batch (the rows differ, so the masks do); under "same" every sample
  gets the one mask, one launch per sample.
- jvp: x̂'s Jacobian is symmetric, so J·t is the backward kernel applied to t.
- derivatives of the backward (double backward, hessians): `first_order_grads`, torch ops.

Tensors reach the Functions in their own shapes (rows (*, normalized)); the ops see them as
(*, N) rows, leading dims kept.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from fusednorm._autograd import Function
from fusednorm._backend import kernels
from fusednorm._checks import compute_dtype
from fusednorm._route import _forward_ad, op_or_impl
from fusednorm._row_ops import (
    _bwd_impl,
    _fwd_impl,
    bwd_op,
    effective_weight,
    first_order_grads,
    fwd_op,
    normalized,
)


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """Everything about a row-norm call that is not a tensor."""

    normalized_shape: tuple[int, ...]
    eps: float
    is_rms: bool
    zero_centered: bool
    dropout_p: float
    x_dtype: torch.dtype
    out_dtype: torch.dtype
    residual_dtype: torch.dtype | None  # h's dtype; None: the norm's input is x itself
    xhat_dtype: torch.dtype | None
    memory_efficient: bool
    has_residual: bool
    backend: str

    @property
    def fused(self) -> bool:
        return self.residual_dtype is not None

    @property
    def n(self) -> int:
        return math.prod(self.normalized_shape)

    def replace(self, **changes) -> RowSpec:
        return dataclasses.replace(self, **changes)


def _rows(t: Tensor | None, spec: RowSpec) -> Tensor | None:
    """t (*, normalized) as (*, N), leading dims kept."""
    k = len(spec.normalized_shape)
    return t if t is None or k == 1 else t.flatten(-k)


def _unrows(t: Tensor, spec: RowSpec) -> Tensor:
    k = len(spec.normalized_shape)
    return t if k == 1 else t.unflatten(-1, spec.normalized_shape)


def _flat(p: Tensor | None) -> Tensor | None:
    return p if p is None or p.dim() == 1 else p.reshape(-1)


def _or_zeros_like(t: Tensor | None, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return torch.zeros_like(like, dtype=dtype) if t is None else t


# ---------------------------------------------------------------------------------------------
# vmap helpers


def _batched(t: Tensor | None, dim: int | None, size: int) -> Tensor | None:
    """t with its batch dim first: moved there, or t expanded along a new one."""
    if t is None:
        return None
    return t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)


def _broadcastable(p: Tensor, dim: int | None, size: int, lead: int) -> Tensor:
    """A per-sample parameter (batch, *normalized) viewed to broadcast over rows
    (batch, *lead dims, *normalized)."""
    p = _batched(p, dim, size)
    return p.view(size, *([1] * lead), *p.shape[1:])


def _seed_for_batch(seed: Tensor, dim: int | None) -> Tensor:
    # randomness="different" draws a seed per sample; one of them serves the whole batch
    return seed if dim is None else seed.select(dim, 0)


def _each_sample(function, info, in_dims, tensors, others):
    """`function` applied to each sample in turn (randomness="same": one mask for all)."""
    outs = []
    for i in range(info.batch_size):
        picked = [t if d is None or t is None else t.select(d, i)
                  for t, d in zip(tensors, in_dims)]
        outs.append(function.apply(*picked, *others))
    stacked, dims = [], []
    for column in zip(*outs):
        if column[0].numel() == 0 and column[0].dim() == 1:  # an absent output
            stacked.append(column[0])
            dims.append(None)
        else:
            stacked.append(torch.stack(column))
            dims.append(0)
    return tuple(stacked), tuple(dims)


def _xhat(saved: Tensor, mean: Tensor, rstd: Tensor, spec: RowSpec, weight=None, bias=None
          ) -> Tensor:
    """x̂ (*, N) in the compute dtype, in torch ops, from the saved tensor: the norm's input, or
    (memory_efficient) the output y = x̂·w + b. When something may differentiate the result
    (`_differentiated`), the statistics are recomputed from the input, so that x̂ depends on it
    as higher derivatives need (the statistics the forward returned are constants to
    autograd); otherwise the forward's statistics serve."""
    ct = rstd.dtype
    rows = _rows(saved, spec).to(ct)
    if spec.memory_efficient:
        # (a parameter is (*normalized), or per sample (batch, 1.., *normalized))
        if bias is not None:
            rows = rows - _rows(bias, spec).to(ct)
        if weight is not None:
            rows = rows / effective_weight(_rows(weight, spec), spec.zero_centered, ct)
        return rows
    if _differentiated(saved):
        return normalized(rows, spec.eps, spec.is_rms)[0]
    if spec.is_rms:
        return rows * rstd.unsqueeze(-1)
    return (rows - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)


def _differentiated(t: Tensor) -> bool:
    """Whether what is computed from t may be differentiated: autograd records it, forward AD
    is on, or an outer torch.func transform wraps it (a grad or jvp level, perhaps)."""
    return ((torch.is_grad_enabled() and t.requires_grad) or _forward_ad._current_level >= 0
            or torch._C._functorch.is_functorch_wrapped_tensor(t))


# ---------------------------------------------------------------------------------------------


class RowNorm(Function):
    """(y, h, mean, rstd) of the row norm; h is empty unless fused (residual or dropout),
    mean empty for RMSNorm. `seed`: a 0-dim int64 tensor (the dropout seed)."""

    @staticmethod
    def forward(x, residual, weight, bias, seed, spec):
        y, h, mean, rstd = op_or_impl(fwd_op, _fwd_impl, x)(
            _rows(x, spec), _flat(weight), _flat(bias), _rows(residual, spec), spec.eps,
            spec.is_rms, spec.zero_centered, spec.dropout_p, seed, spec.out_dtype,
            spec.residual_dtype, spec.xhat_dtype, spec.backend)
        return _unrows(y, spec), _unrows(h, spec) if spec.fused else h, mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, weight, bias, seed, spec = inputs
        y, h, mean, rstd = output
        norm_input = h if spec.fused else x
        ctx.save_for_backward(y if spec.memory_efficient else norm_input, weight, bias, mean,
                              rstd, seed)
        ctx.save_for_forward(norm_input, weight, bias, mean, rstd)
        ctx.seed = seed
        ctx.spec = spec
        # (one call: each call replaces the set the last one marked)
        ctx.mark_non_differentiable(mean, rstd, *(() if spec.fused else (h,)))
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, dy, dh, _dmean, _drstd):
        saved, weight, bias, mean, rstd, seed = ctx.saved_tensors
        spec = ctx.spec
        need = ctx.needs_input_grad
        if dy is None and (dh is None or not spec.fused):
            return (None,) * 6
        dy = _or_zeros_like(dy, saved, spec.out_dtype)
        dx, dres, dw, db = RowNormBackward.apply(
            dy, dh if spec.fused else None, saved, weight, bias, mean, rstd, seed, spec,
            need[2] or need[3])
        return (dx, dres if spec.has_residual else None, dw if need[2] else None,
                db if need[3] else None, None, None)

    @staticmethod
    def jvp(ctx, tx, tresidual, tweight, tbias, _tseed, _tspec):
        h, weight, _, mean, rstd = ctx.saved_tensors
        spec, seed = ctx.spec, ctx.seed
        ct = rstd.dtype
        th = tx
        if spec.fused:
            if tx is not None and spec.dropout_p > 0:  # the same mask, from the same seed
                tx = RowNorm.apply(tx, None, None, None, seed, spec.replace(
                    has_residual=False, zero_centered=False, xhat_dtype=None,
                    memory_efficient=False, out_dtype=ct))[1]
            th = tx if tresidual is None else (tresidual if tx is None else tresidual + tx)
            th = None if th is None else th.to(spec.residual_dtype)
        ty = None
        if th is not None:  # x̂'s Jacobian is symmetric: J·th is the backward of th
            jacobian = spec.replace(zero_centered=False, dropout_p=0.0, x_dtype=ct,
                                    out_dtype=ct, residual_dtype=None, xhat_dtype=None,
                                    memory_efficient=False, has_residual=False)
            ty = RowNormBackward.apply(th, None, h, None, None, mean, rstd, seed, jacobian,
                                       False)[0]
            if weight is not None:
                ty = ty * effective_weight(weight, spec.zero_centered, ct)
        if tweight is not None or tbias is not None:
            xhat = _unrows(_xhat(h, mean, rstd, spec.replace(memory_efficient=False)), spec)
            if spec.xhat_dtype is not None:
                xhat = xhat.to(spec.xhat_dtype).to(ct)
            extra = None if tweight is None else xhat * tweight.to(ct)
            if tbias is not None:
                extra = tbias.to(ct) if extra is None else extra + tbias.to(ct)
            ty = extra if ty is None else ty + extra
        # (a differentiable output's tangent may not be None)
        ty = torch.zeros_like(h, dtype=spec.out_dtype) if ty is None else ty.to(spec.out_dtype)
        if spec.fused and th is None:
            th = torch.zeros_like(h)
        return ty, th if spec.fused else None, None, None

    @staticmethod
    def vmap(info, in_dims, x, residual, weight, bias, seed, spec):
        size = info.batch_size
        xd, rd, wd, bd, sd = in_dims[:5]
        if spec.dropout_p > 0 and sd is None:
            return _each_sample(RowNorm, info, in_dims[:5], (x, residual, weight, bias, seed),
                                (spec,))
        seed = _seed_for_batch(seed, sd)
        rows_batched = xd is not None or rd is not None or (sd is not None
                                                            and spec.dropout_p > 0)
        if rows_batched:
            x, residual = _batched(x, xd, size), _batched(residual, rd, size)
        if wd is None and bd is None:  # the same norm over more rows
            y, h, mean, rstd = RowNorm.apply(x, residual, weight, bias, seed, spec)
            y_dim = 0 if rows_batched else None
        else:  # per-sample parameters: x̂ on the kernels, each sample's affine in torch ops
            ct = compute_dtype(spec.x_dtype)
            xhat, h, mean, rstd = RowNorm.apply(x, residual, None, None, seed, spec.replace(
                zero_centered=False, out_dtype=ct, memory_efficient=False))
            if not rows_batched:
                xhat = xhat.unsqueeze(0)
            lead = xhat.dim() - 1 - len(spec.normalized_shape)
            y = xhat
            if weight is not None:
                y = y * effective_weight(_broadcastable(weight, wd, size, lead),
                                         spec.zero_centered, ct)
            if bias is not None:
                y = y + _broadcastable(bias, bd, size, lead).to(ct)
            y, y_dim = y.to(spec.out_dtype), 0
        rows = 0 if rows_batched else None
        return (y, h, mean, rstd), (y_dim, rows if spec.fused else None,
                                    None if spec.is_rms else rows, rows)


class RowNormBackward(Function):
    """(dx, dresidual, dweight, dbias) of `RowNorm`; dresidual empty without a residual, the
    parameter gradients empty when not asked for (`need_w`) or absent. dh_out: the gradient
    flowing into h (None: none)."""

    @staticmethod
    def forward(dy, dh_out, saved, weight, bias, mean, rstd, seed, spec, need_w):
        dx, dres, dw, db = op_or_impl(bwd_op, _bwd_impl, dy)(
            _rows(dy, spec), _rows(saved, spec), _flat(weight), _flat(bias), mean, rstd,
            _rows(dh_out, spec), spec.eps, spec.is_rms, spec.zero_centered, spec.dropout_p,
            seed, spec.has_residual, spec.x_dtype, spec.residual_dtype, need_w,
            spec.memory_efficient, spec.backend)
        dx = _unrows(dx, spec)
        dres = _unrows(dres, spec) if spec.has_residual else dres
        dw = dw.view(weight.shape) if need_w and weight is not None else dw
        db = db.view(bias.shape) if need_w and bias is not None else db
        return dx, dres, dw, db

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:8])
        ctx.save_for_forward(*inputs[:8])
        ctx.spec, ctx.need_w = inputs[8], inputs[9]

    @staticmethod
    def backward(ctx, *grads):
        tensors = ctx.saved_tensors
        first, present = _first_order(ctx.spec, ctx.need_w, tensors)
        outputs, vjp = torch.func.vjp(first, *(tensors[i] for i in present))
        cotangents = tuple(torch.zeros_like(o) if g is None else g
                           for o, g in zip(outputs, grads))
        found = dict(zip(present, vjp(cotangents)))
        return tuple(found.get(i) for i in range(8)) + (None, None)

    @staticmethod
    def jvp(ctx, *tangents):
        tensors = ctx.saved_tensors
        first, present = _first_order(ctx.spec, ctx.need_w, tensors)
        primals = tuple(tensors[i] for i in present)
        tangents = tuple(torch.zeros_like(p) if tangents[i] is None else tangents[i]
                         for i, p in zip(present, primals))
        return torch.func.jvp(first, primals, tangents)[1]

    @staticmethod
    def vmap(info, in_dims, dy, dh_out, saved, weight, bias, mean, rstd, seed, spec, need_w):
        size = info.batch_size
        tensors = (dy, dh_out, saved, weight, bias, mean, rstd, seed)
        if spec.dropout_p > 0 and in_dims[7] is None:
            return _each_sample(RowNormBackward, info, in_dims[:8], tensors, (spec, need_w))
        seed = _seed_for_batch(seed, in_dims[7])
        dy, dh_out, saved = (_batched(t, d, size) for t, d in zip(tensors[:3], in_dims[:3]))
        mean = mean if spec.is_rms else _batched(mean, in_dims[5], size)
        rstd = _batched(rstd, in_dims[6], size)
        ct = rstd.dtype
        lead = dy.dim() - 1 - len(spec.normalized_shape)
        w = None if weight is None else (weight if in_dims[3] is None and in_dims[4] is None
                                         else _broadcastable(weight, in_dims[3], size, lead))
        b = None if bias is None else (bias if in_dims[3] is None and in_dims[4] is None
                                       else _broadcastable(bias, in_dims[4], size, lead))
        if w is weight and b is bias:  # shared parameters: the kernel applies them
            dx, dres, _, _ = RowNormBackward.apply(dy, dh_out, saved, weight, bias, mean, rstd,
                                                   seed, spec, False)
        else:  # per-sample parameters: g = dy·w in torch ops, the rest on the kernel
            g = dy.to(ct) if w is None else dy.to(ct) * effective_weight(w, spec.zero_centered,
                                                                         ct)
            x_in = _unrows(_xhat(saved, mean, rstd, spec, w, b), spec) \
                if spec.memory_efficient else saved
            dx, dres, _, _ = RowNormBackward.apply(g, dh_out, x_in, None, None, mean, rstd,
                                                   seed, spec.replace(zero_centered=False),
                                                   False)
        dw = db = dy.new_empty((0,))
        w_dim = b_dim = None
        if need_w:
            d = _rows(dy, spec).to(ct)
            sums = tuple(range(1, d.dim() - 1))  # each sample's rows
            if weight is not None:
                xhat = _xhat(saved, mean, rstd, spec, w, b)
                dw = _unrows(_sum_rows(d * xhat, sums), spec).to(weight.dtype)
                w_dim = 0
            if bias is not None:
                db, b_dim = _unrows(_sum_rows(d, sums), spec).to(bias.dtype), 0
        return (dx, dres, dw, db), (0, 0 if spec.has_residual else None, w_dim, b_dim)


def _sum_rows(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    # (sum over no dims: torch's sum(()) would sum over all of them)
    return t.sum(dims) if dims else t


def _first_order(spec: RowSpec, need_w: bool, tensors: tuple):
    """The backward in torch ops as a function of the tensors it is differentiable in (dy,
    dh_out, the norm's input, weight, bias), and their positions among `tensors`."""
    if spec.memory_efficient:
        raise RuntimeError(
            "fusednorm: derivatives of the backward (double backward, hessians) are not "
            "available with memory_efficient=True (the backward recomputes x̂ from the output)")
    saved, rstd, seed = tensors[2], tensors[6], tensors[7]
    present = [i for i in range(5) if tensors[i] is not None]
    ct = rstd.dtype
    keep = None
    if spec.dropout_p > 0:
        rows = _rows(saved, spec)
        m = rows.numel() // spec.n if spec.n else 0
        keep = kernels(spec.backend, "row_norm").dropout_keep_mask(
            int(seed), m, spec.n, spec.dropout_p, rows.device).view(rows.shape)

    def first(*values):
        given = dict(zip(present, values))
        dy_, dh_, h_, w_, b_ = (given.get(i) for i in range(5))
        dh, dx, dw, db = first_order_grads(
            _rows(dy_, spec), _rows(h_, spec), _flat(w_), _rows(dh_, spec), keep, spec.eps,
            spec.is_rms, spec.zero_centered, 1.0 / (1.0 - spec.dropout_p),
            b_ is not None, ct)
        empty = dy_.new_empty((0,))
        return (_unrows(dx, spec).to(spec.x_dtype),
                _unrows(dh, spec).to(spec.residual_dtype) if spec.has_residual else empty,
                dw.view(w_.shape).to(w_.dtype) if need_w and w_ is not None else empty,
                db.view(b_.shape).to(b_.dtype) if need_w and b_ is not None else empty)

    return first, present
