"""GroupNorm (InstanceNorm) and BatchNorm as autograd Functions that torch.func composes with.

The channel norms' counterpart of `_row_functions.py`: the kernels through the registered ops
(`group_norms.py`, `batch_norms.py`), with a rule for every transform.

- vmap: a batched GroupNorm is one with a larger batch, (B, N, C, *) → (B·N, C, *): one launch.
  With per-sample weights the batch goes into the channels instead, (N, B·C, *) with B·G
  groups (sample b's groups are channels b·C + [g·C/G, (g+1)·C/G)), each channel keeping its
  own weight. BatchNorm's statistics are per (sample, channel): its batch always goes into the
  channels, (N, B·C, *), running statistics and weights (B·C,). One launch either way.
- jvp: the Jacobian of x̂ (over a group, or a channel's values) is symmetric: J·t is the
  backward kernel applied to t; SiLU multiplies by its derivative.
- derivatives of the backward: torch's own ops (F.group_norm, F.batch_norm).

Running statistics are not updated here: `batch_norm` and `instance_norm` do it from the batch
statistics these return, or, under a transform, leave the whole call to torch's op (its rules
for in-place updates under vmap are torch's own).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from fusednorm._autograd import Function
from fusednorm._checks import compute_dtype
from fusednorm._layout import as_ncs, from_layout
from fusednorm._route import op_or_impl


def _group_norms():
    from fusednorm import group_norms

    return group_norms


def _batch_norms():
    from fusednorm import batch_norms

    return batch_norms


def _params(weight, bias, c, x):
    return _batch_norms().affine_params(weight, bias, c, compute_dtype(x.dtype), x.device)


def _per_channel(t: Tensor, dims: int) -> Tensor:
    """A (C,) vector viewed to broadcast over (N, C, *) with `dims` dims."""
    return t.view(1, -1, *([1] * (dims - 2)))


def _silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _moved(t: Tensor | None, dim: int | None, size: int) -> Tensor | None:
    """t with its vmap dim first (expanded along a new one if it has none)."""
    if t is None:
        return None
    return t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)


def _into_channels(x: Tensor) -> Tensor:
    """(B, N, C, *) as (N, B·C, *)."""
    b, n, c = x.shape[:3]
    return x.movedim(0, 1).reshape(n, b * c, *x.shape[3:])


def _out_of_channels(y: Tensor, size: int) -> Tensor:
    """(N, B·C, *) as (B, N, C, *)."""
    n, bc = y.shape[:2]
    return y.reshape(n, size, bc // size, *y.shape[2:]).movedim(1, 0)


def _stacked(p: Tensor | None, dim: int | None, size: int, fill: float, c: int, like: Tensor
             ) -> Tensor:
    """A per-channel vector (C,) or per sample (B, C) as (B·C,); None as `fill`."""
    if p is None:
        return torch.full((size * c,), fill, dtype=compute_dtype(like.dtype), device=like.device)
    return _moved(p, dim, size).reshape(size * c)


def _save(ctx, tensors, output, spec):
    """What both families' Functions keep of (x, weight, bias) and their (y, mean, var)."""
    _, mean, var = output
    ctx.save_for_backward(*tensors, mean, var)
    ctx.save_for_forward(*tensors, mean, var)
    ctx.spec = spec
    ctx.mark_non_differentiable(mean, var)


def _input_grads(ctx, backward, dy, others: int) -> tuple:
    """The gradients of (x, weight, bias), then None for the `others` other inputs."""
    x, weight, bias, mean, var = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw, db = backward.apply(dy, x, weight, bias, mean, var, ctx.spec, need[1] or need[2])
    return (dx, dw if need[1] else None, db if need[2] else None) + (None,) * others


# ---------------------------------------------------------------------------------------------
# GroupNorm (and InstanceNorm, G = C)


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    groups: int
    eps: float
    silu: bool
    backend: str


class GroupNormFn(Function):
    """(y, mean, var) of group_norm(x (N, C, *)); mean and var (N, G) in the compute dtype."""

    @staticmethod
    def forward(x, weight, bias, spec):
        gn = _group_norms()
        x3, cl = as_ncs(x, "group")
        w, b = _params(weight, bias, x3.shape[1], x)
        y3, mean, var = op_or_impl(gn._fwd_op, gn._fwd_impl, x)(
            x3, w, b, spec.groups, spec.eps, spec.silu, cl, spec.backend)
        return from_layout(y3, x, "group"), mean, var

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, inputs[:3], output, inputs[-1])

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        return _input_grads(ctx, GroupNormBackward, dy, 1)

    @staticmethod
    def jvp(ctx, tx, tweight, tbias, _tspec):
        x, weight, bias, mean, var = ctx.saved_tensors
        spec = ctx.spec
        ct = mean.dtype
        dims = x.dim()
        tz = None
        if tx is not None:  # the Jacobian of x̂ is symmetric: J·tx is the backward of tx
            tz = GroupNormBackward.apply(tx, x, None, None, mean, var, dataclasses.replace(
                spec, silu=False), False)[0].to(ct)
            if weight is not None:
                tz = tz * _per_channel(weight.to(ct), dims)
        xhat = None
        if tweight is not None or tbias is not None or spec.silu:
            xhat = F.group_norm(x.to(ct), spec.groups, None, None, spec.eps)
        if tweight is not None:
            term = xhat * _per_channel(tweight.to(ct), dims)
            tz = term if tz is None else tz + term
        if tbias is not None:
            term = _per_channel(tbias.to(ct), dims)
            tz = term.expand(x.shape) if tz is None else tz + term
        if tz is None:
            tz = torch.zeros_like(x, dtype=ct)
        if spec.silu:
            z = xhat
            if weight is not None:
                z = z * _per_channel(weight.to(ct), dims)
            if bias is not None:
                z = z + _per_channel(bias.to(ct), dims)
            tz = tz * _silu_grad(z)
        return tz.to(x.dtype), None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, spec):
        size = info.batch_size
        xd, wd, bd = in_dims[:3]
        x = _moved(x, xd, size)  # (B, N, C, *)
        if wd is None and bd is None:  # a larger batch: (B·N, C, *)
            y, mean, var = GroupNormFn.apply(x.reshape(-1, *x.shape[2:]), weight, bias, spec)
            return ((y.view(x.shape), mean.view(size, -1, spec.groups),
                     var.view(size, -1, spec.groups)), (0, 0, 0))
        # per-sample weights: the batch in the channels, (N, B·C, *), B·G groups
        c = x.shape[2]
        w = _stacked(weight, wd, size, 1.0, c, x) if weight is not None else None
        b = _stacked(bias, bd, size, 0.0, c, x) if bias is not None else None
        y, mean, var = GroupNormFn.apply(_into_channels(x), w, b, dataclasses.replace(
            spec, groups=spec.groups * size))
        n = x.shape[1]
        stats = (mean.view(n, size, spec.groups).movedim(1, 0),
                 var.view(n, size, spec.groups).movedim(1, 0))
        return (_out_of_channels(y, size), *stats), (0, 0, 0)


class GroupNormBackward(Function):
    """(dx, dweight, dbias) of `GroupNormFn`; the parameter gradients empty unless `need_w`."""

    @staticmethod
    def forward(dy, x, weight, bias, mean, var, spec, need_w):
        gn = _group_norms()
        x3, cl = as_ncs(x, "group")
        w, b = _params(weight, bias, x3.shape[1], x)
        dx3, dw, db = op_or_impl(gn._bwd_op, gn._bwd_impl, dy)(
            dy.reshape(x3.shape), x3, w, b, mean, var, spec.groups, spec.eps, spec.silu, cl,
            spec.backend)
        empty = dy.new_empty((0,))
        return (from_layout(dx3, x, "group"),
                dw.to(weight.dtype) if need_w and weight is not None else empty,
                db.to(bias.dtype) if need_w and bias is not None else empty)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:4])
        ctx.save_for_forward(*inputs[:4])
        ctx.spec, ctx.need_w = inputs[6], inputs[7]

    @staticmethod
    def backward(ctx, *grads):
        spec = ctx.spec

        def norm(x, w, b):
            y = F.group_norm(x, spec.groups, w, b, spec.eps)
            return F.silu(y) if spec.silu else y

        return _second_order(norm, ctx.saved_tensors, ctx.need_w, grads) + (None,) * 4

    @staticmethod
    def jvp(ctx, tdy, tx, tweight, tbias, *_):
        spec = ctx.spec

        def norm(x, w, b):
            y = F.group_norm(x, spec.groups, w, b, spec.eps)
            return F.silu(y) if spec.silu else y

        return _first_order_jvp(norm, ctx.saved_tensors, ctx.need_w, (tdy, tx, tweight, tbias))

    @staticmethod
    def vmap(info, in_dims, dy, x, weight, bias, mean, var, spec, need_w):
        size = info.batch_size
        dy, x = _moved(dy, in_dims[0], size), _moved(x, in_dims[1], size)
        mean, var = _moved(mean, in_dims[4], size), _moved(var, in_dims[5], size)
        n, c = x.shape[1], x.shape[2]
        # the batch in the channels: every sample's weight gradients are channels of their own
        wide = dataclasses.replace(spec, groups=spec.groups * size)
        w = _stacked(weight, in_dims[2], size, 1.0, c, x) if weight is not None else None
        b = _stacked(bias, in_dims[3], size, 0.0, c, x) if bias is not None else None
        stats = [s.movedim(0, 1).reshape(n, size * spec.groups) for s in (mean, var)]
        dx, dw, db = GroupNormBackward.apply(_into_channels(dy), _into_channels(x), w, b,
                                             *stats, wide, need_w)
        dw = dw.view(size, c) if dw.numel() else dw
        db = db.view(size, c) if db.numel() else db
        return ((_out_of_channels(dx, size), dw, db),
                (0, 0 if dw.numel() else None, 0 if db.numel() else None))


# ---------------------------------------------------------------------------------------------
# BatchNorm: batch statistics (training), or given running statistics (eval), never updated here


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    training: bool
    eps: float
    backend: str


class BatchNormFn(Function):
    """(y, mean, var) of batch_norm(x (N, C, *)): in training the batch's (C,) mean and biased
    variance, else `running_mean` and `running_var` normalize and are returned as mean, var."""

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, spec):
        bn = _batch_norms()
        x3, cl = as_ncs(x, "batch")
        ct = compute_dtype(x.dtype)
        w, b = _params(weight, bias, x3.shape[1], x)
        rm = rv = None
        if not spec.training:
            rm, rv = running_mean.to(ct).contiguous(), running_var.to(ct).contiguous()
        y3, mean, var = op_or_impl(bn._fwd_op, bn._fwd_impl, x)(x3, w, b, rm, rv, spec.eps, cl,
                                                                spec.backend)
        if not spec.training:
            mean, var = rm.clone(), rv.clone()
        return from_layout(y3, x, "batch"), mean, var

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, inputs[:3], output, inputs[-1])

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        return _input_grads(ctx, BatchNormBackward, dy, 3)

    @staticmethod
    def jvp(ctx, tx, tweight, tbias, *_):
        x, weight, _, mean, var = ctx.saved_tensors
        ct = mean.dtype
        dims = x.dim()
        ty = None
        if tx is not None:  # symmetric Jacobian of x̂ (training), a diagonal one (eval)
            ty = BatchNormBackward.apply(tx, x, None, None, mean, var, ctx.spec, False)[0]
            ty = ty.to(ct)
            if weight is not None:
                ty = ty * _per_channel(weight.to(ct), dims)
        if tweight is not None or tbias is not None:
            # x̂ in torch ops, differentiable in x as higher derivatives need (the returned
            # statistics are constants to autograd)
            spec = ctx.spec
            xhat = F.batch_norm(x.to(ct), None if spec.training else mean,
                                None if spec.training else var, None, None, spec.training, 0.0,
                                spec.eps)
            term = 0
            if tweight is not None:
                term = xhat * _per_channel(tweight.to(ct), dims)
            if tbias is not None:
                term = term + _per_channel(tbias.to(ct), dims)
            ty = term if ty is None else ty + term
        if ty is None:
            ty = torch.zeros_like(x, dtype=ct)
        return ty.to(x.dtype), None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, running_mean, running_var, spec):
        size = info.batch_size
        x = _moved(x, in_dims[0], size)
        c = x.shape[2]
        w = _stacked(weight, in_dims[1], size, 1.0, c, x) if weight is not None else None
        b = _stacked(bias, in_dims[2], size, 0.0, c, x) if bias is not None else None
        rm = rv = None
        if not spec.training:
            rm = _stacked(running_mean, in_dims[3], size, 0.0, c, x)
            rv = _stacked(running_var, in_dims[4], size, 1.0, c, x)
        y, mean, var = BatchNormFn.apply(_into_channels(x), w, b, rm, rv, spec)
        return (_out_of_channels(y, size), mean.view(size, c), var.view(size, c)), (0, 0, 0)


class BatchNormBackward(Function):
    """(dx, dweight, dbias) of `BatchNormFn`; the parameter gradients empty unless `need_w`."""

    @staticmethod
    def forward(dy, x, weight, bias, mean, var, spec, need_w):
        bn = _batch_norms()
        x3, cl = as_ncs(x, "batch")
        w, b = _params(weight, bias, x3.shape[1], x)
        dx3, dw, db = op_or_impl(bn._bwd_op, bn._bwd_impl, dy)(
            dy.reshape(x3.shape), x3, w, b, mean, var, spec.eps, spec.training, cl,
            spec.backend)
        empty = dy.new_empty((0,))
        return (from_layout(dx3, x, "batch"),
                dw.to(weight.dtype).view(weight.shape) if need_w and weight is not None
                else empty,
                db.to(bias.dtype).view(bias.shape) if need_w and bias is not None else empty)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:6])
        ctx.save_for_forward(*inputs[:6])
        ctx.spec, ctx.need_w = inputs[6], inputs[7]

    @staticmethod
    def _norm(ctx):
        spec = ctx.spec
        mean, var = ctx.saved_tensors[4:6]
        stats = (None, None) if spec.training else (mean, var)
        return lambda x, w, b: F.batch_norm(x, *stats, w, b, spec.training, 0.0, spec.eps)

    @staticmethod
    def backward(ctx, *grads):
        norm = BatchNormBackward._norm(ctx)
        return _second_order(norm, ctx.saved_tensors[:4], ctx.need_w, grads) + (None,) * 4

    @staticmethod
    def jvp(ctx, tdy, tx, tweight, tbias, *_):
        norm = BatchNormBackward._norm(ctx)
        return _first_order_jvp(norm, ctx.saved_tensors[:4], ctx.need_w,
                                (tdy, tx, tweight, tbias))

    @staticmethod
    def vmap(info, in_dims, dy, x, weight, bias, mean, var, spec, need_w):
        size = info.batch_size
        dy, x = _moved(dy, in_dims[0], size), _moved(x, in_dims[1], size)
        c = x.shape[2]
        w = _stacked(weight, in_dims[2], size, 1.0, c, x) if weight is not None else None
        b = _stacked(bias, in_dims[3], size, 0.0, c, x) if bias is not None else None
        mean = _moved(mean, in_dims[4], size).reshape(size * c)
        var = _moved(var, in_dims[5], size).reshape(size * c)
        dx, dw, db = BatchNormBackward.apply(_into_channels(dy), _into_channels(x), w, b, mean,
                                             var, spec, need_w)
        dw = dw.view(size, c) if dw.numel() else dw
        db = db.view(size, c) if db.numel() else db
        return ((_out_of_channels(dx, size), dw, db),
                (0, 0 if dw.numel() else None, 0 if db.numel() else None))


# ---------------------------------------------------------------------------------------------
# Derivatives of the backward, from torch's ops


def _first_order(norm, tensors, need_w):
    """The backward (dx, dweight, dbias) of y = norm(x, w, b) as a function of (dy, x, w, b)
    (those present), in torch's differentiable ops."""
    present = [i for i in range(4) if tensors[i] is not None]

    def first(*values):
        given = dict(zip(present, values))
        dy, x, w, b = (given.get(i) for i in range(4))
        params = [t for t in (x, w, b) if t is not None]
        _, vjp = torch.func.vjp(lambda *p: norm(*_fill((x, w, b), p)), *params)
        grads = dict(zip([i for i, t in enumerate((x, w, b)) if t is not None], vjp(dy)))
        empty = dy.new_empty((0,))
        return (grads[0], grads[1] if need_w and w is not None else empty,
                grads[2] if need_w and b is not None else empty)

    return first, present


def _fill(template, values):
    it = iter(values)
    return tuple(None if t is None else next(it) for t in template)


def _second_order(norm, tensors, need_w, grads):
    first, present = _first_order(norm, tensors, need_w)
    outputs, vjp = torch.func.vjp(first, *(tensors[i] for i in present))
    cotangents = tuple(torch.zeros_like(o) if g is None else g for o, g in zip(outputs, grads))
    found = dict(zip(present, vjp(cotangents)))
    return tuple(found.get(i) for i in range(4))


def _first_order_jvp(norm, tensors, need_w, tangents):
    first, present = _first_order(norm, tensors, need_w)
    primals = tuple(tensors[i] for i in present)
    tangents = tuple(torch.zeros_like(p) if tangents[i] is None else tangents[i]
                     for i, p in zip(present, primals))
    return torch.func.jvp(first, primals, tangents)[1]
