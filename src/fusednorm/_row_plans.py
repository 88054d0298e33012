"""Eager calls of the row norms on plain tensors: a launch plan per call signature.

`row_norm.py` decides the way of a call; this file serves the one most calls take: plain
tensors in a plain state, on our kernels. A plan (`_Plan`) holds everything decided once for one
signature of the arguments (the checks, exactly as torch's; the rows' layout; the kernels and
their fixed arguments), so that a small call costs about what torch's own does; `run` does the
rest per call, through leaner autograd Functions than the transform-aware ones of
`_row_functions.py`. The same checks serve every other way in (`row_norm._checked`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from fusednorm import _route
from fusednorm._autocast import autocast_cast, casts
from fusednorm._autograd import fast_apply
from fusednorm._backend import kernels, resolve
from fusednorm._checks import (
    FLOAT_DTYPES,
    HALF_DTYPES,
    as_rows,
    compute_dtype,
    default_rms_eps,
    normalized_shape_ok,
    param_shape_ok,
    params_ok,
    raise_like_torch,
    row_stride,
    stand_in,
)
from fusednorm._row_functions import RowSpec
from fusednorm._row_ops import composite as _composite

# ---------------------------------------------------------------------------------------------
# A differentiable composite with the kernels' exact semantics. It serves the "torch" backend
# for the options torch lacks, zero-element inputs, and double backward (create_graph=True).


def _composite_call(x, residual, weight, bias, eps, dropout_p, residual_dtype, out_dtype,
                    zero_centered, xhat_dtype, is_rms, fused, m, n):
    h = normed = x
    if fused:
        # as the kernels: residual + dropout(x) in the compute dtype, rounded once to h's dtype;
        # the norm reads that h, and its gradient meets h's own in the compute dtype
        compute = compute_dtype(torch.promote_types(x.dtype, residual_dtype))
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
    return (y, h) if residual is not None else y


# ---------------------------------------------------------------------------------------------
# Launch plans: one per call signature (see `_signature`).


class _Plan:
    """Everything decided for one signature of the arguments, once: the checks passed, the
    rows' layout, the kernels and their fixed arguments. `run` does the rest per call."""

    def __init__(self, x, normalized_shape, weight, bias, eps, residual, dropout_p,
                 residual_in_fp32, out_dtype, zero_centered, xhat_dtype, memory_efficient,
                 is_rms, traced=False):
        # traced: the call goes through the registered ops (compiled graphs, torch.func, ...),
        # the plan only checks and decides
        self.traced = traced or torch.compiler.is_compiling()
        self.normalized_shape, self.eps, self.is_rms = normalized_shape, eps, is_rms
        readable = torch.compiler.is_compiling() or _route.route(x, residual, weight,
                                                                  bias) != "torch"
        if not readable and not _torch_reads_options(x, residual, dropout_p, out_dtype,
                                                     zero_centered, xhat_dtype):
            self.kind, self.run = "torch_op", _run_torch_op  # torch's result, or its error
            return
        torch_call = functools.partial(_torch_rms_norm if is_rms else _torch_layer_norm, x,
                                       normalized_shape, weight, *(() if is_rms else (bias,)),
                                       eps)
        self.autocast = isinstance(x, Tensor) and casts(x.device.type)
        x, weight, bias = autocast_cast("rms_norm" if is_rms else "layer_norm", x, weight,
                                        bias)
        self.weight_cast = None
        if (is_rms and weight is not None and isinstance(x, Tensor)
                and x.dtype in FLOAT_DTYPES and weight.dtype in FLOAT_DTYPES
                and not params_ok(x, weight)):
            # torch's rms_norm takes a weight of any float dtype (its output keeps the
            # input's); the kernels take the input's dtype or float32, into which this cast is
            # (nearly) exact
            self.weight_cast = torch.float32 if x.dtype in HALF_DTYPES else x.dtype
            weight = weight.to(self.weight_cast)
        if is_rms and eps is None and isinstance(x, Tensor):
            eps = default_rms_eps(x.dtype)
        if not (normalized_shape_ok(x, normalized_shape) and params_ok(x, weight, bias)
                and param_shape_ok(weight, normalized_shape)
                and param_shape_ok(bias, normalized_shape)):
            raise_like_torch(torch_call, "layer_norm" if not is_rms else "rms_norm")
            # torch accepts what the kernels do not take: torch's op answers, when it can
            if _torch_reads_options(x, residual, dropout_p, out_dtype, zero_centered,
                                    xhat_dtype):
                raise RuntimeError("fusednorm: unsupported arguments for "
                                   + ("rms_norm" if is_rms else "layer_norm"))
            self.kind, self.run = "torch_op", _run_torch_op
            return
        if residual is not None and (residual.shape != x.shape or residual.device != x.device
                                     or not residual.is_floating_point()):
            raise RuntimeError(
                f"fusednorm: residual must be a floating-point tensor of the input's shape "
                f"{list(x.shape)} on {x.device}, got {residual.dtype} {list(residual.shape)} "
                f"on {residual.device}"
            )
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"dropout probability has to be in [0, 1), but got {dropout_p}")
        self.fused = fused = residual is not None or dropout_p > 0
        self.out_dtype = out_dtype = out_dtype or x.dtype
        self.residual_dtype = None
        if fused:
            # h keeps the residual's dtype (the input's without one); residual_in_fp32 widens
            # a half h to float32 and never narrows a float64 one
            base = residual.dtype if residual is not None else x.dtype
            self.residual_dtype = (torch.promote_types(base, torch.float32)
                                   if residual_in_fp32 else base)
        self.backend = resolve(x)
        self.n = functools.reduce(lambda a, b: a * b, normalized_shape, 1)
        self.m = x.numel() // self.n if self.n else 0
        self.shape = x.shape
        self.eps, self.is_rms, self.zero_centered = eps, is_rms, zero_centered
        self.dropout_p, self.xhat_dtype, self.memory_efficient = (
            dropout_p, xhat_dtype, memory_efficient)
        self.has_residual = residual is not None
        self.x_dtype = x.dtype
        self.normalized_shape = tuple(normalized_shape)
        plain = not fused and not zero_centered and xhat_dtype is None and out_dtype == x.dtype
        if self.backend == "torch" and plain:
            self.kind = "torch"
        elif self.backend == "torch" or x.numel() == 0 or not readable:
            self.kind = "composite"
        else:
            self.kind = "kernel"
            self._kernel_plan(x, weight, bias, residual)
        self.run = _run
        # the common calls, which `_run` would reach after checks that cannot fail for them:
        # our kernel, no residual or dropout, nothing to cast, the parameters read in place
        common = (self.kind == "kernel" and not fused and not self.autocast
                  and self.weight_cast is None and self.w_ok and self.b_ok
                  and not self.traced)
        if common and not self.needs_grad and self.backend == "cpu" and self.sx is not None:
            self.run = _run_plain
        elif common and self.needs_grad and not memory_efficient:
            self.run = _run_plain_grad

    def _kernel_plan(self, x, weight, bias, residual):
        m, n = self.m, self.n
        self.sx = row_stride(x, n)  # None: x is copied to rows first
        self.sr = None if residual is None else row_stride(residual, n)
        self.w_ok = weight is None or weight.is_contiguous()
        self.b_ok = bias is None or bias.is_contiguous()
        self.needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, residual, weight, bias))
        self.alias_ok = residual is not None and _grads_may_alias(x, residual)
        self._backward_plans = {}
        if self.traced:
            return  # these calls reach the kernels through the registered ops
        if self.backend != "cpu":
            self.forward = _ContractForward(self)
            return
        from fusednorm.cpu.layer_norm import ForwardPlan

        self.forward = ForwardPlan(
            m, n, self.sx if self.sx is not None else n,
            n if residual is None or self.sr is None else self.sr, x.dtype,
            None if residual is None else residual.dtype,
            None if weight is None else weight.dtype, None if bias is None else bias.dtype,
            self.out_dtype, self.residual_dtype, float(self.eps), self.is_rms,
            self.zero_centered, float(self.dropout_p), self.xhat_dtype, self.needs_grad,
            tuple(self.shape), x.is_contiguous())

    def spec(self) -> RowSpec:
        """The call's options as the autograd Functions of `_row_functions.py` take them."""
        return RowSpec(self.normalized_shape, float(self.eps), self.is_rms, self.zero_centered,
                       float(self.dropout_p), self.x_dtype, self.out_dtype, self.residual_dtype,
                       self.xhat_dtype, self.memory_efficient, self.has_residual, self.backend)

    def rows(self, x, residual):
        """x and the residual as the kernels read them: in place, or copied into rows."""
        if self.sx is None:
            x = x.contiguous()
        if residual is not None and self.sr is None:
            residual = residual.contiguous()
        return x, residual

    def backward_plan(self, dy, saved, weight, bias, dh_out, need_w, same):
        key = (dy.dtype, None if dh_out is None else dh_out.dtype, need_w, same)
        plan = self._backward_plans.get(key)
        if plan is None:
            plan = self._backward_plans[key] = self._make_backward(
                dy, saved, weight, bias, dh_out, need_w, same)
        return plan

    def _make_backward(self, dy, saved, weight, bias, dh_out, need_w, same):
        if self.backend != "cpu":
            return _ContractBackward(self, need_w, same)
        from fusednorm.cpu.layer_norm import BackwardPlan

        n, ct = self.n, compute_dtype(self.forward.ct)
        dres = self.residual_dtype if self.has_residual and not same else None
        return BackwardPlan(
            self.m, n, n, n, n, ct, dy.dtype, saved.dtype,
            None if weight is None else weight.dtype, None if bias is None else bias.dtype,
            None if dh_out is None else dh_out.dtype, self.x_dtype, dres, self.is_rms,
            self.zero_centered, float(self.dropout_p), need_w and weight is not None,
            need_w and bias is not None, self.memory_efficient, tuple(self.shape))


class _ContractForward:
    """A backend reached through its contract functions (the Triton kernels)."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan

    def __call__(self, x, residual, weight, bias, seed=0):
        p = self.plan
        y, h, mean, rstd = kernels(p.backend, "row_norm").norm_fwd(
            as_rows(x, p.n), weight, bias, None if residual is None else as_rows(residual, p.n),
            p.eps, p.is_rms, p.zero_centered, p.dropout_p, seed, p.out_dtype, p.residual_dtype,
            p.xhat_dtype)
        stats = rstd if p.is_rms else torch.cat([mean, rstd])
        return y.view(p.shape), h.view(p.shape) if p.fused else None, stats


class _ContractBackward:
    def __init__(self, plan: _Plan, need_w: bool, same: bool) -> None:
        self.plan, self.need_w, self.same = plan, need_w, same

    def __call__(self, dy, saved, weight, bias, stats, dh_out, seed=0):
        p = self.plan
        n = p.n
        mean, rstd = (stats.new_empty((0,)), stats) if p.is_rms else (stats[:p.m], stats[p.m:])
        dx, dres, dw, db = kernels(p.backend, "row_norm").norm_bwd(
            dy.reshape(-1, n), saved.reshape(-1, n), weight, bias, mean, rstd,
            None if dh_out is None else dh_out.reshape(-1, n), p.eps, p.is_rms,
            p.zero_centered, p.dropout_p, seed, p.has_residual and not self.same, p.x_dtype,
            p.residual_dtype, self.need_w, p.memory_efficient)
        return (dx.view(p.shape), dres.view(p.shape) if dres.numel() else None,
                dw if weight is not None and self.need_w else None,
                db if bias is not None and self.need_w else None)


# ---------------------------------------------------------------------------------------------
# Autograd: our own backward kernels; the composite only when a graph of the backward is asked.


class _RowNorm(torch.autograd.Function):
    """Returns y, or (y, h) when a residual is passed; with dropout alone h = dropout(x) is
    not returned. Inputs are taken in their own shapes; row views are the kernels' business (an
    `as_strided` view taken outside would give an expanded input, row stride 0, every row's
    gradient summed into each row)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, plan, seed):
        y, h, stats = plan.forward(*plan.rows(x, residual), weight, bias, seed)
        # The tensor backward reads: the output in memory-saving mode, else the norm's input.
        saved = y if plan.memory_efficient else (h if h is not None else x)
        ctx.save_for_backward(saved, weight, bias, stats)
        ctx.plan, ctx.seed = plan, seed
        ctx.set_materialize_grads(False)
        return (y, h) if plan.has_residual else y

    @staticmethod
    def backward(ctx, dy, dh_out=None):
        if dy is None and dh_out is None:
            # no gradient reaches the node (a Function after it returned None): torch's own
            # nodes then give no gradients, not zeros
            return (None,) * 6
        saved, weight, bias, stats = ctx.saved_tensors
        plan = ctx.plan
        if dy is None:
            dy = saved.new_zeros(plan.shape, dtype=plan.out_dtype)
        if torch.is_grad_enabled():
            return _double_backward_ready(plan, saved, weight, bias, dy)
        if not dy.is_contiguous():
            dy = dy.contiguous()
        if dh_out is not None and not dh_out.is_contiguous():
            dh_out = dh_out.contiguous()
        if not saved.is_contiguous():
            saved = saved.contiguous()
        need_w = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        # Without dropout and with one dtype, dresidual is dx: write it once and hand the same
        # tensor to both inputs, as the backward of torch's add does.
        same = (plan.has_residual and plan.dropout_p == 0
                and plan.residual_dtype == plan.x_dtype and plan.alias_ok)
        bwd = plan.backward_plan(dy, saved, weight, bias, dh_out, need_w, same)
        dx, dres, dw, db = bwd(dy, saved, weight, bias, stats, dh_out, ctx.seed)
        if dw is not None and (dw.dtype != weight.dtype or weight.dim() != 1):
            dw = dw.to(weight.dtype).view(weight.shape)
        if db is not None and (db.dtype != bias.dtype or bias.dim() != 1):
            db = db.to(bias.dtype).view(bias.shape)
        return dx, (dx if same else dres) if plan.has_residual else None, dw, db, None, None


class _PlainRowNorm(torch.autograd.Function):
    """`_RowNorm` for the common case, with less to do per call: no residual, no dropout, x
    saved for the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan):
        y, _, stats = plan.forward(x if plan.sx is not None else x.contiguous(), None, weight,
                                   bias)
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.plan = plan
        ctx.set_materialize_grads(False)  # (see `_RowNorm.backward`)
        return y

    @staticmethod
    def backward(ctx, dy):
        if dy is None:
            return None, None, None, None
        x, weight, bias, stats = ctx.saved_tensors
        plan = ctx.plan
        if torch.is_grad_enabled():
            return _plain_grads(_double_backward_ready(plan, x, weight, bias, dy))
        if not dy.is_contiguous():
            dy = dy.contiguous()
        if not x.is_contiguous():
            x = x.contiguous()
        need = ctx.needs_input_grad
        bwd = plan.backward_plan(dy, x, weight, bias, None, need[1] or need[2], False)
        dx, _, dw, db = bwd(dy, x, weight, bias, stats, None)
        if dw is not None and (dw.dtype != weight.dtype or weight.dim() != 1):
            dw = dw.to(weight.dtype).view(weight.shape)
        if db is not None and (db.dtype != bias.dtype or bias.dim() != 1):
            db = db.to(bias.dtype).view(bias.shape)
        return dx, dw, db, None


_plain_row_norm = fast_apply(_PlainRowNorm)
_row_norm_function = fast_apply(_RowNorm, 4)


def _plain_grads(grads):
    dx, _, dw, db = grads[:4]
    return dx, dw, db, None


def _double_backward_ready(plan, x, weight, bias, dy):
    """First-order gradients built from differentiable ops, so that they can be differentiated
    again. Only the plain norm needs it (torch's own fused ops do not support it either)."""
    if plan.fused or plan.memory_efficient:
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
        y = _composite(xg.reshape(-1, plan.n), None if wg is None else wg.reshape(plan.n),
                       None if bg is None else bg.reshape(plan.n), plan.eps, plan.is_rms,
                       plan.zero_centered, dy.dtype, plan.xhat_dtype)
        grads = torch.autograd.grad(y, detached, dy.reshape(-1, plan.n), create_graph=True,
                                    allow_unused=True)
    it = iter(grads)
    dx = next(it).view(plan.shape)
    dw = next(it) if weight is not None else None
    db = next(it) if bias is not None else None
    return dx, None, dw, db, None, None


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



def _torch_reads_options(x, residual, dropout_p, out_dtype, zero_centered, xhat_dtype) -> bool:
    """Whether a call the kernels cannot read asks for options torch's op lacks, which the
    composite (torch ops) computes; refused for an input that is not floating point."""
    if residual is None and not dropout_p and out_dtype is None and not zero_centered \
            and xhat_dtype is None:
        return False
    if isinstance(x, Tensor) and x.is_floating_point() and x.layout is torch.strided:
        return True
    raise TypeError(
        "fusednorm: residual, dropout_p, out_dtype, zero_centered_weight and xhat_dtype need a "
        f"strided floating-point input, got {getattr(x, 'dtype', type(x).__name__)} "
        f"{getattr(x, 'layout', '')}".rstrip())


def _run(plan: _Plan, x, residual, weight, bias):
    """A call through its plan, whatever the plan's kind."""
    if plan.autocast:
        x, weight, bias = autocast_cast("rms_norm" if plan.is_rms else "layer_norm", x,
                                        weight, bias)
    if plan.weight_cast is not None:
        weight = weight.to(plan.weight_cast)
    kind = plan.kind
    if kind == "torch":
        if plan.is_rms:
            return F.rms_norm(x, plan.normalized_shape, weight, plan.eps)
        return F.layer_norm(x, plan.normalized_shape, weight, bias, plan.eps)
    if kind == "composite":
        return _composite_call(x, residual, weight, bias, plan.eps, plan.dropout_p,
                               plan.residual_dtype, plan.out_dtype, plan.zero_centered,
                               plan.xhat_dtype, plan.is_rms, plan.fused, plan.m, plan.n)
    if not plan.w_ok:
        weight = weight.contiguous()
    if not plan.b_ok:
        bias = bias.contiguous()
    if plan.needs_grad and not (plan.fused or plan.memory_efficient):
        return _plain_row_norm(x, weight, bias, plan)
    seed = draw_seed() if plan.dropout_p > 0 else 0
    if plan.needs_grad:
        return _row_norm_function(x, residual, weight, bias, plan, seed)
    y, h, _ = plan.forward(*plan.rows(x, residual), weight, bias, seed)
    return (y, h) if plan.has_residual else y


def _run_torch_op(plan: _Plan, x, residual, weight, bias):
    """Tensors the kernels cannot read (`_route.kind` "torch"): torch's own op, with torch's
    result or torch's error."""
    if plan.is_rms:
        return F.rms_norm(x, plan.normalized_shape, weight, plan.eps)
    return F.layer_norm(x, plan.normalized_shape, weight, bias, plan.eps)


def _run_plain(plan: _Plan, x, residual, weight, bias):
    """`_run` for the common case: our kernel, no gradient, x read in place, nothing to cast
    or copy, no dropout."""
    return plan.forward(x, residual, weight, bias)[0]


def _run_plain_grad(plan: _Plan, x, residual, weight, bias):
    """`_run` for the common training call: the plain case with a gradient to compute."""
    return _plain_row_norm(x, weight, bias, plan)


def _torch_layer_norm(x, normalized_shape, weight, bias, eps, *real):
    """torch's op: on the real tensors when given, else on stand-ins (to raise its errors)."""
    if real:
        return F.layer_norm(real[0], normalized_shape, real[1], real[2], eps)
    return F.layer_norm(stand_in(x), normalized_shape, stand_in(weight), stand_in(bias), eps)


def _torch_rms_norm(x, normalized_shape, weight, eps, *real):
    if real:
        return F.rms_norm(real[0], normalized_shape, real[1], eps)
    return F.rms_norm(stand_in(x), normalized_shape, stand_in(weight), eps)
