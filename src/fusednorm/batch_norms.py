"""BatchNorm: per-channel statistics over batch and space, on fusednorm's kernels.

Read top to bottom: backend kernels → torch.library ops (for torch.compile) → autograd →
argument checks → public function → modules. The kernels (`cpu/batch_norm.py`,
`triton/batch_norm.py`) share the contract written at the top of those files; this file views
the input as (N, C, S) in one of the two layouts the kernels read (channels first, or channels
innermost as in channels_last, which the output keeps), checks the arguments exactly as torch
does and updates the running statistics.

Semantics are torch's: the batch variance (biased) normalizes, the unbiased one enters
running_var; running statistics are updated only in training; empty inputs go to torch's op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fusednorm import _backend, _route
from fusednorm._autocast import casts, casts_on
from fusednorm._autograd import fast_apply, unwrap_if_dead
from fusednorm._backend import kernels, resolve
from fusednorm._checks import compute_dtype, params_ok, raise_like_torch
from fusednorm._layout import as_ncs, from_layout, layout_strides, plan_input, torch_strides
from fusednorm._ops import dispatch, needs_grad
from fusednorm._plan_cache import ABSENT, PlanCache

# ---------------------------------------------------------------------------------------------
# Kernels behind torch.library ops. Eager code calls the *_impl functions directly; compiled
# graphs see the ops and their fake implementations. Absent outputs are empty tensors.


def _fwd_impl(x, weight, bias, mean, var, eps, channels_last, backend):
    # (the kernels copy x into their layout if it is not in it already)
    y, bmean, bvar = kernels(backend, "batch_norm").batch_norm_fwd(x, weight, bias, mean, var, eps,
                                                      channels_last)
    if mean is not None:  # running statistics normalized; the op returns no alias of them
        bmean, bvar = x.new_empty((0,), dtype=weight.dtype), x.new_empty((0,), dtype=weight.dtype)
    return y, bmean, bvar


@torch.library.custom_op("fusednorm::batch_norm_fwd", mutates_args=())
def _fwd_op(x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor | None, var: Tensor | None,
            eps: float, channels_last: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _fwd_impl(x, weight, bias, mean, var, eps, channels_last, backend)


@_fwd_op.register_fake
def _(x, weight, bias, mean, var, eps, channels_last, backend):
    c = x.shape[1]
    stats = 0 if mean is not None else c
    return (
        x.new_empty_strided(x.shape, layout_strides(tuple(x.shape), channels_last)),
        x.new_empty((stats,), dtype=weight.dtype),
        x.new_empty((stats,), dtype=weight.dtype),
    )


def _bwd_impl(dy, x, weight, bias, mean, var, eps, training, channels_last, backend):
    return kernels(backend, "batch_norm").batch_norm_bwd(dy, x, weight, bias, mean, var, eps,
                                                         training, channels_last)


@torch.library.custom_op("fusednorm::batch_norm_bwd", mutates_args=())
def _bwd_op(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor,
            eps: float, training: bool, channels_last: bool, backend: str
            ) -> tuple[Tensor, Tensor, Tensor]:
    return _bwd_impl(dy, x, weight, bias, mean, var, eps, training, channels_last, backend)


@_bwd_op.register_fake
def _(dy, x, weight, bias, mean, var, eps, training, channels_last, backend):
    return (
        x.new_empty_strided(x.shape, layout_strides(tuple(x.shape), channels_last),
                            dtype=dy.dtype),
        weight.new_empty(weight.shape),
        weight.new_empty(weight.shape),
    )


# ---------------------------------------------------------------------------------------------
# Autograd: our own backward kernels; torch's op (differentiable twice) when a graph of the
# backward is asked for (create_graph=True).


def affine_params(weight: Tensor | None, bias: Tensor | None, c: int, ct: torch.dtype,
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """(C,) weight and bias in the compute dtype, ones and zeros when absent."""
    return _param(weight, c, ct, device, 1.0), _param(bias, c, ct, device, 0.0)


def _param(p: Tensor | None, c: int, ct: torch.dtype, device: torch.device, fill: float
           ) -> Tensor:
    if p is None:
        return torch.full((c,), fill, dtype=ct, device=device)
    if p.dim() == 1 and p.is_contiguous():
        return p.to(ct)  # (p itself when of the compute dtype; a reshape and contiguous() each
        # cost a microsecond)
    return p.reshape(c).to(ct).contiguous()



def batch_norm_forward(x, weight, bias, running_mean, running_var, training, eps, norm,
                       backend):
    """(y, batch mean, batch var, what the backward needs): the forward without autograd;
    norm: "batch", or "instance" for instance_norm with running statistics (y's layout)."""
    x3, cl = as_ncs(x, norm)
    ct = compute_dtype(x.dtype)
    w, b = affine_params(weight, bias, x3.shape[1], ct, x.device)
    if training:
        mean = var = None
    else:
        mean, var = running_mean.to(ct).contiguous(), running_var.to(ct).contiguous()
    y3, bmean, bvar = dispatch(_fwd_op, _fwd_impl, x3, w, b, mean, var, eps, cl, backend)
    if training:
        mean, var = bmean, bvar
    return from_layout(y3, x, norm), bmean, bvar, (x3, w, b, mean, var, cl)


class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, eps, norm,
                backend):
        y, bmean, bvar, (x3, w, b, mean, var, cl) = batch_norm_forward(
            x, weight, bias, running_mean, running_var, training, eps, norm, backend)
        ctx.save_for_backward(x, x3, w, b, mean, var, weight, bias)
        ctx.config = (training, eps, cl, backend, norm)
        ctx.mark_non_differentiable(bmean, bvar)
        ctx.set_materialize_grads(False)  # (see _BatchNormFast)
        return y, bmean, bvar

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        if dy is None:
            return (None,) * 9
        x, x3, w, b, mean, var, weight, bias = ctx.saved_tensors
        training, eps, cl, backend, norm = ctx.config
        if torch.is_grad_enabled():
            return _double_backward_ready(ctx, x, weight, bias, mean, var, dy)
        dx3, dw, db = dispatch(_bwd_op, _bwd_impl, dy.reshape(x3.shape), x3, w, b, mean, var, eps,
                               training, cl, backend)
        return (
            from_layout(dx3, x, norm) if ctx.needs_input_grad[0] else None,
            dw.to(weight.dtype).view(weight.shape) if ctx.needs_input_grad[1] else None,
            db.to(bias.dtype).view(bias.shape) if ctx.needs_input_grad[2] else None,
        ) + (None,) * 6


def _double_backward_ready(ctx, x, weight, bias, mean, var, dy):
    """First-order gradients from torch's own (twice differentiable) batch_norm."""
    training, eps = ctx.config[:2]
    stats = (None, None) if training else (mean, var)
    return differentiable_grads(
        lambda x, w, b: F.batch_norm(x, *stats, w, b, training, 0.0, eps), x, weight, bias, dy,
    ) + (None,) * 6


def differentiable_grads(fn, x, weight, bias, dy) -> tuple:
    """(dx, dweight, dbias) of y = fn(x, weight, bias) for dy, as a graph that can be
    differentiated again (None for an absent parameter). The saved tensors themselves are used
    where they require grad, so that the graph reaches them."""
    with torch.enable_grad():
        leaves = [t if t is None or t.requires_grad else t.detach().requires_grad_()
                  for t in (x, weight, bias)]
        y = fn(*leaves)
        grads = iter(torch.autograd.grad(y, [t for t in leaves if t is not None], dy,
                                         create_graph=True))
    return tuple(None if t is None else next(grads) for t in leaves)


# ---------------------------------------------------------------------------------------------
# Argument checks and the public function.


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         momentum: float, count: int) -> None:
    """running = (1 − momentum)·running + momentum·batch, with the unbiased batch variance."""
    with torch.no_grad():
        ct = mean.dtype
        unbiased = var * (count / (count - 1))  # count > 1: the checks refuse one value
        # one op for both (a small call's nine separate ones took ~25 µs), computed in the
        # compute dtype and rounded once to the statistics' own, as torch does
        running = [running_mean, running_var]
        if running_mean.dtype == running_var.dtype == ct:
            torch._foreach_lerp_(running, [mean, unbiased], momentum)
            return
        values = [t.to(ct) for t in running]
        torch._foreach_lerp_(values, [mean, unbiased], momentum)
        torch._foreach_copy_(running, values)


def _running_ok(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                training: bool) -> bool:
    if (running_mean is None) != (running_var is None):
        return False
    if running_mean is None:
        return training
    c = x.shape[1]
    return all(
        isinstance(t, Tensor) and t.dim() == 1 and t.shape[0] == c
        and not (torch.is_grad_enabled() and t.requires_grad)
        for t in (running_mean, running_var)
    )


def _args_ok(x, running_mean, running_var, weight, bias, training, momentum, eps) -> bool:
    if not isinstance(x, Tensor) or x.dim() < 2 or not isinstance(momentum, (int, float)):
        return False
    if not isinstance(eps, (int, float)) or eps < 0 or (training and eps <= 0):
        return False
    if training:
        values = x.shape[0]
        for size in x.shape[2:]:
            values *= size
        if values == 1:
            return False
    c = x.shape[1]
    return (
        _running_ok(x, running_mean, running_var, training)
        and all(p is None or (isinstance(p, Tensor) and p.numel() == c) for p in (weight, bias))
        and params_ok(x, weight, bias, running_mean, running_var)
    )


def _replay(x, running_mean, running_var, weight, bias, training, momentum, eps):
    """torch's batch_norm on the same tensors, so that it raises its own error.

    Not on zero-memory stand-ins: torch's CPU batch_norm takes other paths, with other messages,
    for expanded tensors. The running statistics go as copies (torch would write them), with
    requires_grad kept, since under grad mode torch refuses running statistics that need grad.
    """
    grad = torch.is_grad_enabled()

    def call():
        with torch.set_grad_enabled(grad):
            F.batch_norm(_plain(x), _copy(running_mean), _copy(running_var), _plain(weight),
                         _plain(bias), training, momentum, eps)

    raise_like_torch(call, "batch_norm")


def _plain(t):
    return t.detach() if isinstance(t, Tensor) else t


def _copy(t):
    return t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, Tensor) else t


# ---------------------------------------------------------------------------------------------
# Launch plans for batch_norm: one per call signature (as group_norms.py's).


class _BatchPlan:
    """What is decided once for one signature of batch_norm's arguments: `fast` when x is read
    in place by our CPU kernels (the checks passed); the general path serves everything else,
    torch's errors included."""

    def __init__(self, x, running_mean, running_var, weight, bias, training, eps):
        self.fast = False
        if (_route.route(x, weight, bias, running_mean, running_var) != "kernels"
                or casts(x.device.type)
                or not _args_ok(x, running_mean, running_var, weight, bias, training, 0.0, eps)
                or resolve(x) != "cpu" or x.numel() == 0):
            return
        planned = plan_input(x, "batch")
        if planned is None:
            return  # the general path
        x3, cl, self.copy_to = planned  # (copy_to: the format each call copies x into first)
        ct = compute_dtype(x.dtype)
        c = x.shape[1]
        self.ct, self.training, self.eps = ct, training, float(eps)
        self.stride = torch_strides(x, "batch")  # (x's, or its copy's)
        self.count = x.numel() // c
        self.params = KernelParams(weight, bias, c, ct)
        self.needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias))
        from fusednorm.cpu.batch_norm import plan

        self.kernels = plan(x3, self.eps, cl, self.params.dtype)
        self.fast = True


class KernelParams:
    """A plan's weight and bias as the kernels take them, (C,) contiguous, both of `dtype`:
    `params(weight, bias)` gives the tensors themselves where they are (C,) and contiguous
    (the kernels read half parameters where they lie and write their gradients in their
    dtype), stand-ins made once for absent ones, else copies in the compute dtype. Decided once
    per plan: the checks passed already (one dtype for both, x's or float32)."""

    def __init__(self, weight: Tensor | None, bias: Tensor | None, c: int, ct: torch.dtype):
        present = [p for p in (weight, bias) if p is not None]
        self.as_is = all(p.dim() == 1 and p.is_contiguous() for p in present)
        self.c, self.ct = c, ct
        self.dtype = present[0].dtype if present and self.as_is else ct
        self.ones = torch.ones(c, dtype=self.dtype) if weight is None else None
        self.zeros = torch.zeros(c, dtype=self.dtype) if bias is None else None

    def __call__(self, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.as_is:
            return (self.ones if weight is None else weight,
                    self.zeros if bias is None else bias)
        return (self.ones if weight is None else _param(weight, self.c, self.ct, None, 1.0),
                self.zeros if bias is None else _param(bias, self.c, self.ct, None, 0.0))


class _BatchNormFast(torch.autograd.Function):
    """batch_norm on a plan: x read in place, y and dx in x's layout; in training also the
    batch mean and (biased) variance, not differentiable."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan, mean, var):
        y, mean, var = plan.kernels.forward(x, *plan.params(weight, bias), mean, var)
        # (the weight's stand-in or copy is made again by the backward: saving fewer tensors
        # is the cheaper)
        ctx.save_for_backward(x, mean, var, weight, bias)
        ctx.plan = plan
        # No zero tensors for gradients that never come: the statistics' (two allocations and
        # fills per backward), and y's where the node is reached by no gradient at all (a
        # Function after it returning None), where torch's own node gives no weight and bias
        # gradients rather than zeros.
        ctx.set_materialize_grads(False)
        if not plan.training:
            return y
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, *_stats):
        if dy is None:
            return (None,) * 6
        x, mean, var, weight, bias = ctx.saved_tensors
        plan = ctx.plan
        if torch.is_grad_enabled():
            ctx.config = (plan.training, plan.eps)
            return _double_backward_ready(ctx, x, weight, bias, mean, var, dy)[:3] + (None,) * 3
        if dy.stride() != plan.stride or dy.dtype != x.dtype:
            dy = torch.empty_like(x).copy_(dy)  # into x's layout and dtype
        dx, dw, db = plan.kernels.backward(dy, x, plan.params(weight, bias)[0], mean, var,
                                           plan.training)
        need = ctx.needs_input_grad
        if plan.params.as_is:  # (the gradients are in the parameters' dtype and shape)
            return (dx if need[0] else None, dw if need[1] else None, db if need[2] else None,
                    None, None, None)
        return (dx if need[0] else None, _grad_like(dw, weight) if need[1] else None,
                _grad_like(db, bias) if need[2] else None, None, None, None)


def _grad_like(g: Tensor, p: Tensor) -> Tensor:
    """A parameter's gradient (C,) from the kernels, as the parameter: its dtype and shape
    (torch takes a weight of any shape with C elements)."""
    g = g if g.dtype == p.dtype else g.to(p.dtype)
    return g if p.dim() == 1 else g.view(p.shape)


_batch_norm_fast = fast_apply(_BatchNormFast)

_PLANS = PlanCache()


def _plan(input, running_mean, running_var, weight, bias, training, eps) -> _BatchPlan | None:
    """The plan of this signature (`_plan_cache.py`: the tensors' own signatures, and the
    other arguments and the state in the key); None for arguments that are not tensors."""
    try:
        key = (input.shape, training, eps, running_mean is None, running_var is None,
               weight is None, bias is None, torch.is_grad_enabled(), _backend._current,
               casts_on(input))
    except (RuntimeError, AttributeError):  # no sizes (strided nested)
        return None
    tensors = (input, ABSENT[1] if running_mean is None else running_mean,
               ABSENT[2] if running_var is None else running_var,
               ABSENT[3] if weight is None else weight, ABSENT[4] if bias is None else bias)
    plan = _PLANS.get(key, tensors)
    if plan is None:
        if not all(isinstance(t, Tensor) for t in tensors):
            return None  # (the general path raises torch's error)
        plan = _BatchPlan(input, running_mean, running_var, weight, bias, training, eps)
        _PLANS.put(key, tensors, plan)
    return plan


def _fast_batch_norm(plan, input, running_mean, running_var, weight, bias, momentum):
    if plan.training:
        mean = var = None
    else:
        mean, var = running_mean.to(plan.ct).contiguous(), running_var.to(plan.ct).contiguous()
    if plan.needs_grad:
        out = _batch_norm_fast(input, weight, bias, plan, mean, var)
        y, mean, var = out if plan.training else (out, mean, var)
    else:
        y, mean, var = plan.kernels.forward(input, *plan.params(weight, bias), mean, var)
    if plan.training and running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, momentum, plan.count)
    return y


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``torch.nn.functional.batch_norm`` on fusednorm's kernels.

    The output has torch's layout: channels last for channels-last (not contiguous) input, else
    contiguous. In training the running statistics, when given, are updated in place with the
    batch mean and unbiased variance.
    """
    # the common call first: plain tensors in a plain state, on the plan of their signature
    if (type(input) is Tensor and type(momentum) is float and not torch.compiler.is_compiling()
            and _route.plain_state()):
        plan = _plan(unwrap_if_dead(input), running_mean, running_var, weight, bias,
                     bool(training), eps)
        if plan is not None and plan.fast:
            input = unwrap_if_dead(input)
            if plan.copy_to is not None:
                input = input.contiguous(memory_format=plan.copy_to)
            return _fast_batch_norm(plan, input, running_mean, running_var,
                                    weight, bias, momentum)
    way = _route.way(input, weight, bias, running_mean, running_var)
    if way in ("export", "torch", "nested", "ops") or (
            way == "transform" and training and running_mean is not None):
        # torch's op: for export, for tensors the kernels cannot read, and for running
        # statistics updated in place under a transform (torch's rules for that under vmap)
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                            eps)
    if not _args_ok(input, running_mean, running_var, weight, bias, training, momentum, eps):
        _replay(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                            eps)  # torch accepts what the kernels do not take: its answer
    backend = resolve(input)
    if backend == "torch" or input.numel() == 0:
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                            eps)
    if way == "transform":
        from fusednorm._channel_functions import BatchNormFn, BatchSpec

        spec = BatchSpec(training, float(eps), backend)
        return BatchNormFn.apply(input, weight, bias, running_mean, running_var, spec)[0]
    args = (input, weight, bias, running_mean, running_var, training, float(eps), "batch",
            backend)
    if needs_grad(input, weight, bias):
        y, mean, var = _BatchNorm.apply(*args)
    else:
        y, mean, var, _ = batch_norm_forward(*args)
    if training and running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, float(momentum),
                             input.numel() // input.shape[1])
    return y


# ---------------------------------------------------------------------------------------------
# Modules: torch's own, with forward on the function above. Constructor, parameters, buffers,
# state_dict (old checkpoints without num_batches_tracked included) and repr are torch's.


_batch_norm_eager = _route.eager_only(batch_norm)
_is_scripting = torch.jit.is_scripting  # (TorchScript knows the function, not the name)


class _BatchNormForward:
    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        # torch's rule: the running statistics are updated only when tracked and training;
        # momentum None means a cumulative average over the batches seen.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        # batch statistics in training, and in eval when no running statistics are kept
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        pass_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if pass_running else None
        running_var = self.running_var if pass_running else None
        if _is_scripting():  # torch's op (see modules.py)
            return F.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                use_batch, factor, self.eps)
        return _batch_norm_eager(input, running_mean, running_var, self.weight, self.bias,
                                 use_batch, factor, self.eps)


class BatchNorm1d(_BatchNormForward, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on fusednorm's kernels."""


class BatchNorm2d(_BatchNormForward, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on fusednorm's kernels; channels_last input stays
    channels_last."""


class BatchNorm3d(_BatchNormForward, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on fusednorm's kernels."""
