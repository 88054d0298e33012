"""The row norms, LayerNorm and RMSNorm, with optional fused residual-add and dropout: the
public functions, and the way each call goes.

Every way in (`_route.py`) is decided before a data pointer is taken: plain tensors in a plain
state take the plan of their signature (`_row_plans.py`, our kernels without the dispatcher);
compiled graphs the registered ops (`_traced`, ops in `_row_ops.py`); torch.func transforms,
forward AD, DTensor and dispatch modes the autograd Functions of `_row_functions.py`
(`_through_functions`); export and TorchScript's tracer torch's own ops (`_export.py`);
TorchFunctionModes and forward-over-forward derivatives torch's ops (`_through_torch`); jagged
nested tensors their values (`_nested.py`); anything the kernels cannot read torch's op itself.
The kernels (cpu/layer_norm.py, triton/layer_norm.py) share one contract, written down in
docs/DESIGN.md. (Not called layer_norm.py: the package exports a function of that name.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fusednorm import _backend, _dtensor, _export, _inductor, _nested, _route
from fusednorm._autocast import autocast_cast, casts_on
from fusednorm._autograd import unwrap_if_dead
from fusednorm._backend import use_backend
from fusednorm._checks import as_rows
from fusednorm._plan_cache import ABSENT, PlanCache
from fusednorm._row_functions import RowNorm
from fusednorm._row_ops import bwd_op as _bwd_op
from fusednorm._row_ops import bwd_op_fusable as _bwd_op_fusable
from fusednorm._row_ops import fwd_op as _fwd_op
from fusednorm._row_ops import fwd_op_fusable as _fwd_op_fusable
from fusednorm._row_plans import _double_backward_ready, _Plan, _run, draw_seed

# ---------------------------------------------------------------------------------------------
# The way of a call; the plans of plain calls, by signature.

_PLANS = PlanCache()
_SHAPE_TYPES = (tuple, list, torch.Size)
_transforms_active, _dispatch_modes = _route._transforms_active, _route._dispatch_modes
_function_modes, _tracing_state = _route._function_modes, _route._tracing_state
_forward_ad = torch.autograd.forward_ad


def _row_norm(x, normalized_shape, weight, bias, eps, residual, dropout_p, residual_in_fp32,
              out_dtype, zero_centered, xhat_dtype, memory_efficient, is_rms):
    """Shared body of layer_norm and rms_norm: the way the call goes (see the module's
    docstring), then, for plain tensors, the plan of its signature."""
    if torch.compiler.is_compiling():
        args = (x, normalized_shape, weight, bias, eps, residual, dropout_p, residual_in_fp32,
                out_dtype, zero_centered, xhat_dtype, memory_efficient, is_rms)
        return _exported(*args) if torch.compiler.is_exporting() else _traced(*args)
    # Everything the checks, the layout and the autograd decision depend on (and the backend
    # setting): a call with another signature never meets this plan (`_plan_cache.py`). The
    # state checks are `_route.plain_state`'s, inlined: every call pays them.
    key = plan = None
    if (type(x) is Tensor and type(normalized_shape) in _SHAPE_TYPES
            and not (_transforms_active() or _forward_ad._current_level >= 0
                     or _dispatch_modes() or _function_modes() or _tracing_state() is not None)):
        x = unwrap_if_dead(x)
        try:
            key = (is_rms, x.shape, normalized_shape if type(normalized_shape) is not list
                   else tuple(normalized_shape), weight is None, bias is None, residual is None,
                   eps, dropout_p, residual_in_fp32, out_dtype, zero_centered, xhat_dtype,
                   memory_efficient, torch.is_grad_enabled(), _backend._current,
                   casts_on(x))
        except (RuntimeError, AttributeError):  # no sizes (strided nested)
            key = None
        else:
            tensors = (x, ABSENT[1] if weight is None else weight,
                       ABSENT[2] if bias is None else bias,
                       ABSENT[3] if residual is None else residual)
            plan = _PLANS.get(key, tensors)
    if plan is None:
        args = (x, normalized_shape, weight, bias, eps, residual, dropout_p, residual_in_fp32,
                out_dtype, zero_centered, xhat_dtype, memory_efficient, is_rms)
        if type(x) is not Tensor or (residual is not None and type(residual) is not Tensor):
            x, residual = _route.settled(x, residual)
            args = (x, normalized_shape, weight, bias, eps, residual, *args[6:])
        if _route.function_mode():
            return _through_torch(*args)
        if _route.transforming():
            return _through_functions(*args)
        if _route.tracing():
            return _exported(*args)
        way = _route.route(x, residual, weight, bias)
        if way == "nested":
            return _nested.row_norm(_row_norm, *args)
        if way == "ops":
            return _through_functions(*args)
        plan = _Plan(*args)
        if key is not None:
            _PLANS.put(key, tensors, plan)
    return plan.run(plan, x, residual, weight, bias)


def _through_functions(x, normalized_shape, weight, bias, eps, residual, dropout_p,
                       residual_in_fp32, out_dtype, zero_centered, xhat_dtype,
                       memory_efficient, is_rms):
    """torch.func transforms, forward AD, DTensor, dispatch modes: the autograd
    Functions with a rule for each, on the registered ops."""
    if _route.forward_over_forward():  # (the composite: torch's layer_norm is wrong there)
        return _through_torch(x, normalized_shape, weight, bias, eps, residual, dropout_p,
                              residual_in_fp32, out_dtype, zero_centered, xhat_dtype,
                              memory_efficient, is_rms, composite=True)
    residual, local_h = _dtensor.local_residual(x, residual)
    plan, x, weight, bias = _checked(x, normalized_shape, weight, bias, eps, residual, dropout_p,
                                     residual_in_fp32, out_dtype, zero_centered, xhat_dtype,
                                     memory_efficient, is_rms)
    if plan.kind != "kernel":
        return plan.run(plan, x, residual, weight, bias)
    # under vmap the draw follows torch's randomness rule: an error, one seed, or one per sample
    seed = torch.randint(2**31 - 1, (), dtype=torch.int64) if plan.dropout_p > 0 else _NO_SEED
    y, h, _, _ = RowNorm.apply(x, residual, weight, bias, seed, plan.spec())
    if local_h:
        h = h.to_local()
    return (y, h) if plan.has_residual else y


_NO_SEED = torch.zeros((), dtype=torch.int64)


def _exported(x, normalized_shape, weight, bias, eps, residual, dropout_p, residual_in_fp32,
              out_dtype, zero_centered, xhat_dtype, memory_efficient, is_rms):
    """torch.export and TorchScript's tracer: torch's ops, after the same checks."""
    plan, x, weight, bias = _checked(x, normalized_shape, weight, bias, eps, residual, dropout_p,
                                     residual_in_fp32, out_dtype, zero_centered, xhat_dtype,
                                     memory_efficient, is_rms)
    if plan.kind != "kernel":
        return plan.run(plan, x, residual, weight, bias)
    return _export.row_norm(plan.spec(), x, residual, weight, bias)


def _checked(x, normalized_shape, weight, bias, eps, residual, dropout_p, residual_in_fp32,
             out_dtype, zero_centered, xhat_dtype, memory_efficient, is_rms):
    """A call's plan (its checks and decisions, no kernel plan), and x, weight and bias cast as
    the plan says (autocast, rms_norm's weight). Where the plan is not our kernels' the
    tensors are as given: its `run` casts them."""
    plan = _Plan(x, normalized_shape, weight, bias, eps, residual, dropout_p, residual_in_fp32,
                 out_dtype, zero_centered, xhat_dtype, memory_efficient, is_rms, traced=True)
    if plan.kind != "kernel":
        return plan, x, weight, bias
    if plan.autocast:
        x, weight, bias = autocast_cast("rms_norm" if is_rms else "layer_norm", x, weight, bias)
    if plan.weight_cast is not None:
        weight = weight.to(plan.weight_cast)
    return plan, x, weight, bias


def _through_torch(x, normalized_shape, weight, bias, eps, residual, dropout_p,
                   residual_in_fp32, out_dtype, zero_centered, xhat_dtype, memory_efficient,
                   is_rms, composite=False):
    """torch's ops (the composite for the options torch lacks): under a TorchFunctionMode,
    which sees them (and says where they allocate), and for forward-over-forward derivatives
    (`_route.forward_over_forward`)."""
    with use_backend("torch"):
        plan = _Plan(x, normalized_shape, weight, bias, eps, residual, dropout_p,
                     residual_in_fp32, out_dtype, zero_centered, xhat_dtype, memory_efficient,
                     is_rms, traced=True)
    if composite and plan.kind == "torch":
        plan.kind = "composite"
    return plan.run(plan, x, residual, weight, bias)


def _traced(x, normalized_shape, weight, bias, eps, residual, dropout_p, residual_in_fp32,
            out_dtype, zero_centered, xhat_dtype, memory_efficient, is_rms):
    """Under torch.compile: the registered ops, so that the graph has no break."""
    plan = _Plan(x, normalized_shape, weight, bias, eps, residual, dropout_p, residual_in_fp32,
                 out_dtype, zero_centered, xhat_dtype, memory_efficient, is_rms)
    if plan.kind != "kernel":
        return _run(plan, x, residual, weight, bias)
    if plan.weight_cast is not None:
        weight = weight.to(plan.weight_cast)
    n = plan.n
    w = weight.reshape(n) if weight is not None else None
    b = bias.reshape(n) if bias is not None else None
    seed = draw_seed() if dropout_p > 0 else torch.zeros((), dtype=torch.int64)
    fwd_fusable, bwd_fusable = _inductor.fusable(plan)
    plan.fwd_op = _fwd_op_fusable if fwd_fusable else _fwd_op
    plan.bwd_op = _bwd_op_fusable if bwd_fusable else _bwd_op
    if plan.needs_grad:
        y, h = _TracedRowNorm.apply(x, residual, w, b, plan, seed)
    else:
        y, h, _, _ = plan.fwd_op(as_rows(x, n), w, b, None if residual is None
                             else as_rows(residual, n), plan.eps, plan.is_rms,
                             plan.zero_centered, plan.dropout_p, seed, plan.out_dtype,
                             plan.residual_dtype, plan.xhat_dtype, plan.backend)
    y = y.view(x.shape)
    return (y, h.view(x.shape)) if plan.has_residual else y


class _TracedRowNorm(torch.autograd.Function):
    """`_RowNorm` through the registered ops, for compiled graphs."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, plan, seed):
        y, h, mean, rstd = plan.fwd_op(
            as_rows(x, plan.n), weight, bias,
            None if residual is None else as_rows(residual, plan.n), plan.eps, plan.is_rms,
            plan.zero_centered, plan.dropout_p, seed, plan.out_dtype, plan.residual_dtype,
            plan.xhat_dtype, plan.backend)
        saved = y if plan.memory_efficient else (h if plan.fused else x)
        ctx.save_for_backward(saved, weight, bias, mean, rstd, seed)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        if not plan.fused:
            ctx.mark_non_differentiable(h)
        return y, h

    @staticmethod
    def backward(ctx, dy, dh_out):
        saved, weight, bias, mean, rstd, seed = ctx.saved_tensors
        plan = ctx.plan
        n = plan.n
        if dy is None:
            dy = saved.new_zeros((plan.m, n), dtype=plan.out_dtype)
        if torch.is_grad_enabled():
            return _double_backward_ready(plan, saved, weight, bias, dy.reshape(plan.shape)
                                          if dy.numel() == saved.numel() else dy)
        if not plan.fused:
            dh_out = None
        need_w = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        dx, dres, dw, db = plan.bwd_op(
            dy.reshape(-1, n).contiguous(), as_rows(saved, n).contiguous(), weight, bias, mean,
            rstd, None if dh_out is None else dh_out.reshape(-1, n).contiguous(), plan.eps,
            plan.is_rms, plan.zero_centered, plan.dropout_p, seed, plan.has_residual,
            plan.x_dtype, plan.residual_dtype, need_w, plan.memory_efficient, plan.backend)
        return (dx.view(plan.shape), dres.view(plan.shape) if plan.has_residual else None,
                dw if weight is not None and need_w else None,
                db if bias is not None and need_w else None, None, None)


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

    Returns ``(y, h)`` exactly when ``residual`` is passed: ``h = residual + dropout(input)``
    and ``y = layer_norm(h)``, computed in one pass. Without it returns
    ``y = layer_norm(dropout(input))`` alone, whatever ``dropout_p`` and the grad mode.
    ``residual_in_fp32`` keeps h in float32; ``out_dtype`` sets y's dtype;
    ``zero_centered_weight`` uses ``1 + weight`` (Gemma); ``memory_efficient`` keeps the output
    instead of the input for backward (exact where no weight element is 0); ``xhat_dtype``
    rounds the normalized value to that dtype before the affine (Hugging Face's cast order).
    """
    return _row_norm(input, normalized_shape, weight, bias, eps, residual, dropout_p,
                     residual_in_fp32, out_dtype, zero_centered_weight, xhat_dtype,
                     memory_efficient, False)


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
    return _row_norm(input, normalized_shape, weight, None, eps, residual, dropout_p,
                     residual_in_fp32, out_dtype, zero_centered_weight, xhat_dtype,
                     memory_efficient, True)
