"""The row norms, LayerNorm and RMSNorm, with optional fused residual-add and dropout.

Read top to bottom: torch.library ops over the backend kernels (for torch.compile) → autograd →
public functions. The kernels (cpu/layer_norm.py, triton/layer_norm.py) share one contract,
written down in docs/DESIGN.md; this file flattens inputs to (M, N) rows, checks arguments
exactly as torch does and never lets invalid input reach a kernel. (It is not called
layer_norm.py because the package exports a function of that name.)
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fusednorm._autocast import autocast_cast
from fusednorm._backend import resolve
from fusednorm._checks import (
    FLOAT_DTYPES,
    HALF_DTYPES,
    as_rows,
    normalized_shape_ok,
    param_shape_ok,
    params_ok,
    raise_like_torch,
    stand_in,
)
from fusednorm._ops import dispatch, needs_grad
from fusednorm.reference import default_rms_eps


@functools.cache
def _kernels(backend: str) -> ModuleType:
    return importlib.import_module(f"fusednorm.{backend}.layer_norm")


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Kernels behind torch.library ops. Eager code calls the *_impl functions directly (custom ops
# cost microseconds per call); compiled graphs see the ops and their fake implementations.
# Absent outputs are empty tensors so that every op returns plain tensors.


def _fwd_impl(x, weight, bias, residual, eps, is_rms, zero_centered, dropout_p, seed,
              out_dtype, residual_dtype, xhat_dtype, backend):
    y, h, mean, rstd = _kernels(backend).norm_fwd(
        x, weight, bias, residual, eps, is_rms, zero_centered, dropout_p, int(seed),
        out_dtype, residual_dtype, xhat_dtype,
    )
    if h.numel() == 0:
        h = x.new_empty((0,))
    if mean.numel() == 0:
        mean = x.new_empty((0,), dtype=_stats_dtype(x.dtype))
    return y, h, mean, rstd


@torch.library.custom_op("fusednorm::row_norm_fwd", mutates_args=())
def _fwd_op(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
            eps: float, is_rms: bool, zero_centered: bool, dropout_p: float, seed: Tensor,
            out_dtype: torch.dtype, residual_dtype: torch.dtype | None,
            xhat_dtype: torch.dtype | None, backend: str
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _fwd_impl(x, weight, bias, residual, eps, is_rms, zero_centered, dropout_p, seed,
                     out_dtype, residual_dtype, xhat_dtype, backend)


@_fwd_op.register_fake
def _(x, weight, bias, residual, eps, is_rms, zero_centered, dropout_p, seed, out_dtype,
      residual_dtype, xhat_dtype, backend):
    m, n = x.shape
    with_h = residual is not None or dropout_p > 0
    stats = _stats_dtype(x.dtype)
    return (
        x.new_empty((m, n), dtype=out_dtype),
        x.new_empty((m, n), dtype=residual_dtype) if with_h else x.new_empty((0,)),
        x.new_empty((0 if is_rms else m,), dtype=stats),
        x.new_empty((m,), dtype=stats),
    )


def _bwd_impl(dy, h, weight, bias, mean, rstd, dh_out, eps, is_rms, zero_centered, dropout_p,
              seed, has_residual, x_dtype, residual_dtype, need_weight_grad, from_output,
              backend):
    dx, dres, dw, db = _kernels(backend).norm_bwd(
        dy, h, weight, bias, mean, rstd, dh_out, eps, is_rms, zero_centered, dropout_p,
        int(seed), has_residual, x_dtype, residual_dtype, need_weight_grad, from_output,
    )
    # distinct empty tensors: a custom op's outputs may not alias one another
    return tuple(dy.new_empty((0,)) if t is None else t for t in (dx, dres, dw, db))


@torch.library.custom_op("fusednorm::row_norm_bwd", mutates_args=())
def _bwd_op(dy: Tensor, h: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
            rstd: Tensor, dh_out: Tensor | None, eps: float, is_rms: bool,
            zero_centered: bool, dropout_p: float, seed: Tensor, has_residual: bool,
            x_dtype: torch.dtype, residual_dtype: torch.dtype | None, need_weight_grad: bool,
            from_output: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _bwd_impl(dy, h, weight, bias, mean, rstd, dh_out, eps, is_rms, zero_centered,
                     dropout_p, seed, has_residual, x_dtype, residual_dtype, need_weight_grad,
                     from_output, backend)


@_bwd_op.register_fake
def _(dy, h, weight, bias, mean, rstd, dh_out, eps, is_rms, zero_centered, dropout_p, seed,
      has_residual, x_dtype, residual_dtype, need_weight_grad, from_output, backend):
    m, n = dy.shape

    def grad_of(p):
        return p.new_empty((n,)) if p is not None and need_weight_grad else dy.new_empty((0,))

    return (
        dy.new_empty((m, n), dtype=x_dtype),
        dy.new_empty((m, n), dtype=residual_dtype) if has_residual else dy.new_empty((0,)),
        grad_of(weight),
        grad_of(bias),
    )


# ---------------------------------------------------------------------------------------------
# A differentiable composite with the kernels' exact semantics. It serves the "torch" backend
# for the options torch lacks, zero-element inputs, and double backward (create_graph=True).


def _composite(h, weight, bias, eps, is_rms, zero_centered, out_dtype, xhat_dtype):
    compute = _stats_dtype(h.dtype)
    hc = h.to(compute)
    if is_rms:
        xhat = hc * torch.rsqrt(hc.square().mean(-1, keepdim=True) + eps)
    else:
        centred = hc - hc.mean(-1, keepdim=True)
        xhat = centred * torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)
    if xhat_dtype is not None:
        xhat = xhat.to(xhat_dtype).to(compute)
    y = xhat
    if weight is not None:
        y = y * (weight.to(compute) + 1 if zero_centered else weight.to(compute))
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Autograd: our own backward kernels; the composite only when a graph of the backward is asked.


class _Saved(NamedTuple):
    """What backward needs besides tensors."""

    eps: float
    is_rms: bool
    zero_centered: bool
    dropout_p: float
    seed: int | Tensor
    x_dtype: torch.dtype
    out_dtype: torch.dtype
    residual_dtype: torch.dtype | None
    xhat_dtype: torch.dtype | None
    memory_efficient: bool
    backend: str
    has_residual: bool
    has_h: bool
    alias_ok: bool
    n: int  # elements per row
    shape: torch.Size  # the input's (and the residual's) shape


class _RowNorm(torch.autograd.Function):
    """Takes x and the residual in their own shapes and returns (M, N) outputs. The (M, N) row
    views are taken inside: an `as_strided` view taken outside would give an expanded input
    (row stride 0) the gradient of its storage, every row's gradient summed into each row."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, is_rms, zero_centered, dropout_p, seed,
                out_dtype, residual_dtype, xhat_dtype, memory_efficient, backend, alias_ok, n):
        y, h, mean, rstd = dispatch(
            _fwd_op, _fwd_impl, as_rows(x, n), weight, bias,
            as_rows(residual, n) if residual is not None else None, eps, is_rms,
            zero_centered, dropout_p, seed, out_dtype, residual_dtype, xhat_dtype, backend,
        )
        has_h = residual is not None or dropout_p > 0  # h is an output of its own
        # The tensor backward reads: the output in memory-saving mode, else the norm's input.
        saved = y if memory_efficient else (h if has_h else x)
        ctx.save_for_backward(saved, weight, bias, mean, rstd)
        ctx.config = _Saved(eps, is_rms, zero_centered, dropout_p, seed, x.dtype, out_dtype,
                            residual_dtype, xhat_dtype, memory_efficient, backend,
                            residual is not None, has_h, alias_ok, n, x.shape)
        ctx.set_materialize_grads(False)
        if not has_h:
            ctx.mark_non_differentiable(h)
        return y, h

    @staticmethod
    def backward(ctx, dy, dh_out):
        saved, weight, bias, mean, rstd = ctx.saved_tensors
        c = ctx.config
        if dy is None:
            dy = saved.new_zeros((saved.numel() // c.n, c.n), dtype=c.out_dtype)
        if torch.is_grad_enabled():
            return _double_backward_ready(c, saved, weight, bias, dy)
        saved = as_rows(saved, c.n)
        dy = dy.contiguous()
        if not c.has_h:  # h was the empty placeholder (compiled graphs still pass it a grad)
            dh_out = None
        if dh_out is not None:
            dh_out = dh_out.contiguous()
        need_w = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        # Without dropout and with one dtype, dresidual is dx: write it once and hand the same
        # tensor to both inputs, as the backward of torch's add does.
        same = (c.has_residual and c.dropout_p == 0 and c.residual_dtype == c.x_dtype
                and c.alias_ok)
        dx, dres, dw, db = dispatch(
            _bwd_op, _bwd_impl, dy, saved, weight, bias, mean, rstd, dh_out, c.eps, c.is_rms,
            c.zero_centered, c.dropout_p, c.seed, c.has_residual and not same, c.x_dtype,
            c.residual_dtype, need_w, c.memory_efficient, c.backend,
        )
        dx = dx.view(c.shape)
        if same:
            dres = dx
        return (dx, dres.view(c.shape) if c.has_residual else None,
                dw if weight is not None and need_w else None,
                db if bias is not None and need_w else None) + (None,) * 12


def _double_backward_ready(c, x, weight, bias, dy):
    """First-order gradients built from differentiable ops, so that they can be differentiated
    again. Only the plain norm needs it (torch's own fused ops do not support it either)."""
    if c.has_h or c.memory_efficient:
        raise RuntimeError(
            "fusednorm: double backward (create_graph=True) is supported for the plain norm, "
            "not with residual, dropout or memory_efficient=True"
        )
    inputs = [t for t in (x, weight, bias) if t is not None]
    with torch.enable_grad():
        detached = [t if t.requires_grad else t.detach().requires_grad_() for t in inputs]
        it = iter(detached)
        xg = next(it)
        wg = next(it) if weight is not None else None
        bg = next(it) if bias is not None else None
        y = _composite(xg.reshape(-1, c.n), wg, bg, c.eps, c.is_rms, c.zero_centered, dy.dtype,
                       c.xhat_dtype)
        grads = torch.autograd.grad(y, detached, dy, create_graph=True, allow_unused=True)
    it = iter(grads)
    dx = next(it)
    dw = next(it) if weight is not None else None
    db = next(it) if bias is not None else None
    return (dx, None, dw, db) + (None,) * 12


# ---------------------------------------------------------------------------------------------
# Public functions.


def _row_norm(x, normalized_shape, weight, bias, eps, residual, dropout_p, residual_in_fp32,
              out_dtype, zero_centered, xhat_dtype, memory_efficient, is_rms, torch_call):
    """Shared body of layer_norm and rms_norm; torch_call replays the plain call on torch."""
    x, weight, bias = autocast_cast("rms_norm" if is_rms else "layer_norm", x, weight, bias)
    if not (normalized_shape_ok(x, normalized_shape) and params_ok(x, weight, bias)
            and param_shape_ok(weight, normalized_shape)
            and param_shape_ok(bias, normalized_shape)):
        raise_like_torch(torch_call, "layer_norm" if not is_rms else "rms_norm")
    if residual is not None and (residual.shape != x.shape or residual.device != x.device
                                 or not residual.is_floating_point()):
        raise RuntimeError(
            f"fusednorm: residual must be a floating-point tensor of the input's shape "
            f"{list(x.shape)} on {x.device}, got {residual.dtype} {list(residual.shape)} "
            f"on {residual.device}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout probability has to be in [0, 1), but got {dropout_p}")

    fused = residual is not None or dropout_p > 0
    out_dtype = out_dtype or x.dtype
    residual_dtype = None
    if fused:
        residual_dtype = residual.dtype if residual is not None else x.dtype
        if residual_in_fp32:  # at least float32: a float64 stream stays float64
            residual_dtype = torch.promote_types(residual_dtype, torch.float32)
    backend = resolve(x)
    n = 1
    for size in normalized_shape:
        n *= size
    m = 1
    for size in x.shape[: x.dim() - len(normalized_shape)]:
        m *= size

    plain = not fused and not zero_centered and xhat_dtype is None and out_dtype == x.dtype
    if backend == "torch" and plain:
        return torch_call(x, weight, bias)
    if backend == "torch" or x.numel() == 0:
        return _composite_call(x, residual, weight, bias, eps, dropout_p, residual_dtype,
                               out_dtype, zero_centered, xhat_dtype, is_rms, fused, m, n)

    seed = draw_seed() if dropout_p > 0 else 0
    if torch.compiler.is_compiling() and isinstance(seed, int):
        seed = torch.zeros((), dtype=torch.int64)

    w = weight.reshape(n) if weight is not None else None
    b = bias.reshape(n) if bias is not None else None
    if needs_grad(x, residual, w, b):
        y, h = _RowNorm.apply(
            x, residual, w, b, eps, is_rms, zero_centered, dropout_p, seed, out_dtype,
            residual_dtype, xhat_dtype, memory_efficient, backend,
            residual is not None and _grads_may_alias(x, residual), n,
        )
    else:
        y, h, _, _ = dispatch(_fwd_op, _fwd_impl, as_rows(x, n), w, b,
                              as_rows(residual, n) if residual is not None else None, eps,
                              is_rms, zero_centered, dropout_p, seed, out_dtype, residual_dtype,
                              xhat_dtype, backend)
    y = y.view(x.shape)
    return (y, h.view(x.shape)) if fused else y


def _grads_may_alias(x: Tensor, residual: Tensor) -> bool:
    """Whether x and the residual may receive the very same gradient tensor: not when both end
    at leaves, whose .grad would then share memory (AccumulateGrad keeps what it is given)."""
    if torch.compiler.is_compiling():
        return False

    def leaf(t):
        return t.requires_grad and (t.is_leaf or (t._base is not None and t._base.is_leaf))

    return not (leaf(x) and leaf(residual))


def draw_seed() -> int | Tensor:
    """The dropout seed, from torch's default generator so that torch.manual_seed makes masks
    reproducible; backward regenerates the mask from it instead of storing it. A tensor under
    torch.compile (no graph break), an int in eager mode."""
    seed = torch.randint(2**31 - 1, (), dtype=torch.int64)
    return seed if torch.compiler.is_compiling() else int(seed)


def _composite_call(x, residual, weight, bias, eps, dropout_p, residual_dtype, out_dtype,
                    zero_centered, xhat_dtype, is_rms, fused, m, n):
    h = normed = x
    if fused:
        # as the kernels: residual + dropout(x) in the compute dtype, rounded once to h's dtype;
        # the norm reads that h, and its gradient meets h's own in the compute dtype
        compute = _stats_dtype(torch.promote_types(x.dtype, residual_dtype))
        hc = x.to(compute)
        hc = F.dropout(hc, dropout_p) if dropout_p > 0 else hc
        hc = hc if residual is None else residual.to(compute) + hc
        h = hc.to(residual_dtype)
        normed = hc + (h.to(compute) - hc).detach()
    y = _composite(
        normed.reshape(m, n),
        weight.reshape(n) if weight is not None else None,
        bias.reshape(n) if bias is not None else None,
        eps, is_rms, zero_centered, out_dtype, xhat_dtype,
    ).view(x.shape)
    return (y, h) if fused else y


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    residual: Tensor | None = None,
    dropout_p: float = 0.0,
    residual_in_fp32: bool = False,
    out_dtype: torch.dtype | None = None,
    zero_centered_weight: bool = False,
    memory_efficient: bool = False,
    xhat_dtype: torch.dtype | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``torch.nn.functional.layer_norm`` on fusednorm's kernels.

    With ``residual`` (or ``dropout_p > 0``) returns ``(y, h)`` where
    ``h = residual + dropout(input)`` and ``y = layer_norm(h)``, computed in one pass.
    ``residual_in_fp32`` keeps h in float32; ``out_dtype`` sets y's dtype;
    ``zero_centered_weight`` uses ``1 + weight`` (Gemma); ``memory_efficient`` keeps the output
    instead of the input for backward (exact where no weight element is 0); ``xhat_dtype``
    rounds the normalized value to that dtype before the affine (Hugging Face's cast order).
    """
    return _row_norm(
        input, normalized_shape, weight, bias, eps, residual, dropout_p, residual_in_fp32,
        out_dtype, zero_centered_weight, xhat_dtype, memory_efficient, False,
        functools.partial(_torch_layer_norm, input, normalized_shape, weight, bias, eps),
    )


def rms_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    residual: Tensor | None = None,
    dropout_p: float = 0.0,
    residual_in_fp32: bool = False,
    out_dtype: torch.dtype | None = None,
    zero_centered_weight: bool = False,
    memory_efficient: bool = False,
    xhat_dtype: torch.dtype | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``torch.nn.functional.rms_norm`` on fusednorm's kernels; options as in layer_norm.

    ``eps=None`` means what it means in torch: the epsilon of the computation dtype.
    """
    torch_call = functools.partial(_torch_rms_norm, input, normalized_shape, weight, eps)
    if (weight is not None and isinstance(input, Tensor) and input.dtype in FLOAT_DTYPES
            and weight.dtype in FLOAT_DTYPES and not params_ok(input, weight)):
        # torch's rms_norm takes a weight of any float dtype (its output keeps the input's);
        # the kernels take the input's dtype or float32, into which this cast is (nearly) exact
        weight = weight.to(torch.float32 if input.dtype in HALF_DTYPES else input.dtype)
    return _row_norm(
        input, normalized_shape, weight, None,
        default_rms_eps(input.dtype) if eps is None else eps,
        residual, dropout_p, residual_in_fp32, out_dtype, zero_centered_weight, xhat_dtype,
        memory_efficient, True, torch_call,
    )


def _torch_layer_norm(x, normalized_shape, weight, bias, eps, *real):
    """torch's op: on the real tensors when given, else on stand-ins (to raise its errors)."""
    if real:
        return F.layer_norm(real[0], normalized_shape, real[1], real[2], eps)
    return F.layer_norm(stand_in(x), normalized_shape, stand_in(weight), stand_in(bias), eps)


def _torch_rms_norm(x, normalized_shape, weight, eps, *real):
    if real:
        return F.rms_norm(real[0], normalized_shape, real[1], eps)
    return F.rms_norm(stand_in(x), normalized_shape, stand_in(weight), eps)
