"""GroupNorm (with an optional fused SiLU) on fusednorm's kernels; InstanceNorm, GroupNorm with
one group per channel, builds on it in `instance_norms.py`.

Read top to bottom: backend kernels → torch.library ops (for torch.compile) → autograd →
argument checks → public functions → the module. The kernels (`cpu/group_norm.py`,
`triton/group_norm.py`) share the contract written at the top of those files; the input is
viewed as (N, C, S), channels first or channels innermost (channels_last, kept by the output).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fusednorm import _backend, _route
from fusednorm._autocast import any_enabled, autocast_cast, casts, casts_on
from fusednorm._autograd import c_apply, fast_apply, unwrap_if_dead
from fusednorm._backend import kernels, resolve
from fusednorm._channel_functions import GroupNormFn, GroupSpec
from fusednorm._checks import compute_dtype, params_ok, raise_like_torch
from fusednorm._layout import as_ncs, from_layout, layout_strides, plan_input, torch_strides
from fusednorm._ops import dispatch, needs_grad
from fusednorm._plan_cache import ABSENT, PlanCache
from fusednorm.batch_norms import (
    KernelParams,
    _grad_like,
    _plain,
    affine_params,
    differentiable_grads,
)

ACTIVATIONS = (None, "silu")
_transforms_active, _dispatch_modes = _route._transforms_active, _route._dispatch_modes
_function_modes, _tracing_state = _route._function_modes, _route._tracing_state
_forward_ad = torch.autograd.forward_ad


# ---------------------------------------------------------------------------------------------
# Kernels behind torch.library ops. Eager code calls the *_impl functions directly; compiled
# graphs see the ops and their fake implementations.


def _fwd_impl(x, weight, bias, groups, eps, silu, channels_last, backend):
    # (the kernels copy x into their layout if it is not in it already)
    return kernels(backend, "group_norm").group_norm_fwd(x, weight, bias, groups, eps, silu,
                                                         channels_last)


@torch.library.custom_op("fusednorm::group_norm_fwd", mutates_args=())
def _fwd_op(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, silu: bool,
            channels_last: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _fwd_impl(x, weight, bias, groups, eps, silu, channels_last, backend)


@_fwd_op.register_fake
def _(x, weight, bias, groups, eps, silu, channels_last, backend):
    n = x.shape[0]
    return (
        x.new_empty_strided(x.shape, layout_strides(tuple(x.shape), channels_last)),
        x.new_empty((n, groups), dtype=weight.dtype),
        x.new_empty((n, groups), dtype=weight.dtype),
    )


def _bwd_impl(dy, x, weight, bias, mean, var, groups, eps, silu, channels_last, backend):
    return kernels(backend, "group_norm").group_norm_bwd(dy, x, weight, bias, mean, var, groups,
                                                         eps, silu, channels_last)


@torch.library.custom_op("fusednorm::group_norm_bwd", mutates_args=())
def _bwd_op(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor,
            groups: int, eps: float, silu: bool, channels_last: bool, backend: str
            ) -> tuple[Tensor, Tensor, Tensor]:
    return _bwd_impl(dy, x, weight, bias, mean, var, groups, eps, silu, channels_last, backend)


@_bwd_op.register_fake
def _(dy, x, weight, bias, mean, var, groups, eps, silu, channels_last, backend):
    return (
        x.new_empty_strided(x.shape, layout_strides(tuple(x.shape), channels_last),
                            dtype=dy.dtype),
        weight.new_empty(weight.shape),
        weight.new_empty(weight.shape),
    )


# ---------------------------------------------------------------------------------------------
# Autograd: our own backward kernels; torch's ops (differentiable twice) when a graph of the
# backward is asked for (create_graph=True).


def _forward(x, weight, bias, groups, eps, silu, backend):
    """(y, mean, var, what the backward needs): the forward without autograd."""
    x3, cl = as_ncs(x, "group")
    w, b = affine_params(weight, bias, x3.shape[1], compute_dtype(x.dtype), x.device)
    y3, mean, var = dispatch(_fwd_op, _fwd_impl, x3, w, b, groups, eps, silu, cl, backend)
    return from_layout(y3, x, "group"), mean, var, (x3, w, b, cl)


def _group_norm(x, weight, bias, groups, eps, silu, backend):
    """(y, mean, var) through autograd only when a gradient will be asked for."""
    if needs_grad(x, weight, bias):
        return _GroupNorm.apply(x, weight, bias, groups, eps, silu, backend)
    return _forward(x, weight, bias, groups, eps, silu, backend)[:3]


class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, silu, backend):
        y, mean, var, (x3, w, b, cl) = _forward(x, weight, bias, groups, eps, silu, backend)
        ctx.save_for_backward(x, x3, w, b, mean, var, weight, bias)
        ctx.config = (groups, eps, silu, cl, backend)
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)  # (see batch_norms._BatchNormFast)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        if dy is None:
            return (None,) * 7
        x, x3, w, b, mean, var, weight, bias = ctx.saved_tensors
        groups, eps, silu, cl, backend = ctx.config
        if torch.is_grad_enabled():
            return _double_backward_ready(ctx, x, weight, bias, dy)
        dx3, dw, db = dispatch(_bwd_op, _bwd_impl, dy.reshape(x3.shape), x3, w, b, mean, var,
                               groups, eps, silu, cl, backend)
        return (
            from_layout(dx3, x, "group") if ctx.needs_input_grad[0] else None,
            dw.to(weight.dtype) if ctx.needs_input_grad[1] else None,
            db.to(bias.dtype) if ctx.needs_input_grad[2] else None,
        ) + (None,) * 4


def _double_backward_ready(ctx, x, weight, bias, dy):
    """First-order gradients from torch's own group_norm (and silu), differentiable again."""
    return differentiable_group_norm_grads(x, weight, bias, dy, *ctx.config[:3]) + (None,) * 4


def differentiable_group_norm_grads(x, weight, bias, dy, groups, eps, silu) -> tuple:
    """(dx, dweight, dbias) from torch's own group_norm (and silu), differentiable again (also
    the C++ node's, cpu/_native.py)."""

    def norm(x, w, b):
        y = F.group_norm(x, groups, w, b, eps)
        return F.silu(y) if silu else y

    return differentiable_grads(norm, x, weight, bias, dy)


# ---------------------------------------------------------------------------------------------
# Argument checks and the public functions.


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _channel_vector_ok(p, c: int) -> bool:
    return p is None or (isinstance(p, Tensor) and p.dim() == 1 and p.shape[0] == c)


def _group_norm_ok(x, num_groups, weight, bias, eps) -> bool:
    if not isinstance(x, Tensor) or x.dim() < 2 or not isinstance(eps, (int, float)):
        return False
    n, c = x.shape[0], x.shape[1]
    if not _is_int(num_groups) or num_groups <= 0 or c % num_groups:
        return False
    values = n * c // num_groups  # torch's "more than 1 value per channel" count
    for size in x.shape[2:]:
        values *= size
    return (values != 1 and _channel_vector_ok(weight, c) and _channel_vector_ok(bias, c)
            and params_ok(x, weight, bias))


def _silu_flag(activation: str | None) -> bool:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation == "silu"


# ---------------------------------------------------------------------------------------------
# Launch plans for group_norm: one per call signature (as the row norms' in row_norm.py).


class _GroupPlan:
    """What is decided once for one signature of group_norm's arguments: the checks passed,
    the layout the kernels read x in, the parameters' stand-ins, the backend's plan. `fast`
    when x is read in place by our CPU kernels; the general path serves everything else."""

    # the C++ autograd node's call (`_native_node`): None until the plan's first backward
    native = None

    def __init__(self, x, num_groups, weight, bias, eps, silu):
        self.fast = False
        self.torch_op = _route.route(x, weight, bias) != "kernels"  # torch's result or error
        if self.torch_op:
            return
        self.autocast = isinstance(x, Tensor) and casts(x.device.type)
        x, weight, bias = autocast_cast("group_norm", x, weight, bias)
        if not _group_norm_ok(x, num_groups, weight, bias, eps):
            # on the same tensors (see `batch_norms._replay` for why not on stand-ins)
            raise_like_torch(
                lambda: F.group_norm(_plain(x), num_groups, _plain(weight), _plain(bias), eps),
                "group_norm",
            )
            self.torch_op = True  # torch accepts what the kernels do not take: its op answers
            return
        self.backend = resolve(x)
        self.groups, self.eps, self.silu = num_groups, float(eps), silu
        if self.backend != "cpu" or x.numel() == 0 or self.autocast:
            return
        planned = plan_input(x, "group")
        if planned is None:
            return  # the general path
        x3, cl, self.copy_to = planned  # (copy_to: the format each call copies x into first)
        ct = compute_dtype(x.dtype)
        c = x.shape[1]
        self.ct, self.stride = ct, torch_strides(x, "group")  # (x's, or its copy's)
        self.params = KernelParams(weight, bias, c, ct)
        # the parameters are what the kernels take, as they are (`params` would return them)
        self.direct = self.params.as_is and weight is not None and bias is not None
        self.needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias))
        # every input's gradient asked for (requires_grad is part of the plan's signature)
        self.all_grads = self.needs_grad and all(
            t is not None and t.requires_grad for t in (x, weight, bias))
        from fusednorm.cpu.group_norm import GroupNormPlan

        self.kernels = GroupNormPlan(*x3.shape, num_groups, self.eps, silu, cl, x.dtype,
                                     self.params.dtype)
        self.fast = True

    def run(self, input, weight, bias):
        """The call on a `fast` plan (its tensors of the plan's signature)."""
        if self.copy_to is not None:
            input = input.contiguous(memory_format=self.copy_to)
        if self.needs_grad:
            if self.native and not _transforms_active():  # (the C++ node, as `_native_node`)
                return self.native(unwrap_if_dead(input), unwrap_if_dead(weight),
                                   unwrap_if_dead(bias))
            return _group_norm_fast(input, weight, bias, self)
        if self.direct:
            return self.kernels.forward(input, weight, bias, True)[0]
        return self.kernels.forward(input, *self.params(weight, bias), True)[0]


class _GroupNormFast(torch.autograd.Function):
    """group_norm on a plan: x read in place, y and dx in x's layout."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan):
        if plan.direct:
            y, stats = plan.kernels.forward(x, weight, bias)
        else:
            y, stats = plan.kernels.forward(x, *plan.params(weight, bias))
        # (the parameters' stand-ins or copies are made again by the backward: saving fewer
        # tensors is the cheaper)
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.plan = plan
        ctx.set_materialize_grads(False)  # (see batch_norms._BatchNormFast)
        return y

    @staticmethod
    def backward(ctx, dy):
        if dy is None:
            return None, None, None, None
        x, weight, bias, stats = ctx.saved_tensors
        plan = ctx.plan
        if torch.is_grad_enabled():
            ctx.config = (plan.groups, plan.eps, plan.silu)
            return _double_backward_ready(ctx, x, weight, bias, dy)[:3] + (None,)
        if dy.stride() != plan.stride or dy.dtype != x.dtype:
            dy = torch.empty_like(x).copy_(dy)  # into x's layout and dtype
        if plan.direct:
            dx, dw, db = plan.kernels.backward(dy, x, weight, bias, stats)
            if plan.native is None:  # (its backward kernel is loaded now)
                plan.native = _native_node(plan)
            if plan.all_grads:  # (the common case, decided with the plan: fewer steps)
                return dx, dw, db, None
        else:
            dx, dw, db = plan.kernels.backward(dy, x, *plan.params(weight, bias), stats)
        need = ctx.needs_input_grad
        if plan.params.as_is:  # (the gradients are in the parameters' dtype and shape)
            return dx if need[0] else None, dw if need[1] else None, db if need[2] else None, None
        return (dx if need[0] else None,
                _grad_like(dw, weight) if need[1] else None,
                _grad_like(db, bias) if need[2] else None, None)


def _native_node(plan) -> Callable | bool:
    """The kept plan's call on the C++ autograd node (cpu/_native.py), False where there is
    none: `f(x, weight, bias) -> y`, the same bits as `_GroupNormFast`'s."""
    from fusednorm.cpu import _native

    ext = _native.module()
    descriptor = None if ext is None else plan.kernels.native_descriptor()
    return False if descriptor is None else functools.partial(ext.group_norm, descriptor)


_group_norm_fast = fast_apply(_GroupNormFast)
# (for a module's kept plan: its checks ruled out functorch transforms, and its guard wrappers)
_group_norm_fast_c = c_apply(_GroupNormFast)


_PLANS = PlanCache()


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    activation: str | None = None,
) -> Tensor:
    """``torch.nn.functional.group_norm`` on fusednorm's kernels.

    ``activation="silu"`` returns ``silu(group_norm(input))`` from the same pass (computed in
    float32 before the output is rounded). The output has torch's layout: channels last where
    torch suggests channels last for the input, else contiguous.
    """
    silu = False if activation is None else _silu_flag(activation)
    # The common call first: a plain tensor in a plain state (`_route.plain_state`, inlined:
    # inside a model this Python runs cache-cold, each call a few µs more than in a loop), then
    # the plan of its signature (`_plan_cache.py`: the tensors' own signatures, and the other
    # arguments and the state in the key), which tells the tensors the kernels cannot read;
    # else the way `_route` gives.
    common = (type(input) is Tensor and not torch.compiler.is_compiling()
              and not (_transforms_active() or _forward_ad._current_level >= 0
                       or _dispatch_modes() or _function_modes() or _tracing_state() is not None))
    way = "kernels" if common else _route.way(input, weight, bias)
    if way == "kernels":
        if common:
            input = unwrap_if_dead(input)
            plan = _planned(input, num_groups, weight, bias, eps, silu)[1]
        else:  # (a Parameter as the input: not filed)
            plan = _GroupPlan(input, num_groups, weight, bias, eps, silu)
        if plan.fast:
            return plan.run(input, weight, bias)
        if plan.torch_op:
            return _torch_group_norm(input, num_groups, weight, bias, eps, silu)
    elif way in ("export", "torch", "nested", "ops"):
        return _torch_group_norm(input, num_groups, weight, bias, eps, silu)
    input, weight, bias = autocast_cast("group_norm", input, weight, bias)
    if not _group_norm_ok(input, num_groups, weight, bias, eps):
        # on the same tensors (see `batch_norms._replay` for why not on stand-ins)
        raise_like_torch(
            lambda: F.group_norm(_plain(input), num_groups, _plain(weight), _plain(bias), eps),
            "group_norm",
        )
        return _torch_group_norm(input, num_groups, weight, bias, eps, silu)
    backend = resolve(input)
    if backend == "torch" or input.numel() == 0:
        return _torch_group_norm(input, num_groups, weight, bias, eps, silu)
    if way == "transform":  # torch.func, forward AD, a dispatch mode: the Function with rules
        spec = GroupSpec(num_groups, float(eps), silu, backend)
        return GroupNormFn.apply(input, weight, bias, spec)[0]
    return _group_norm(input, weight, bias, num_groups, float(eps), silu, backend)[0]


def _planned(input, num_groups, weight, bias, eps, silu) -> tuple:
    """(guard, plan) of a call on a plain tensor in a plain state: the plan filed for its
    signature (`_plan_cache.py`: the tensors' own signatures, and the other arguments and the
    state in the key), made and filed if there is none; the guard None where the call is filed
    by signature or not at all (a tensor without sizes or strides gets a plan of its own)."""
    try:
        key = (input.shape, num_groups, eps, silu, weight is None, bias is None,
               torch.is_grad_enabled(), _backend._current, casts_on(input))
    except (RuntimeError, AttributeError):  # no sizes (strided nested)
        return None, _GroupPlan(input, num_groups, weight, bias, eps, silu)
    tensors = (input, ABSENT[1] if weight is None else weight,
               ABSENT[2] if bias is None else bias)
    guard, plan = _PLANS.find(key, tensors)
    if plan is None:
        plan = _GroupPlan(input, num_groups, weight, bias, eps, silu)
        guard = _PLANS.put(key, tensors, plan)
    return guard, plan


def _torch_group_norm(input, num_groups, weight, bias, eps, silu):
    """torch's own op (and SiLU): for export and tracing, and for tensors the kernels cannot
    read (torch's result, or its error)."""
    y = F.group_norm(input, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


# ---------------------------------------------------------------------------------------------
# Modules: torch's own with the computation swapped. Constructor, parameters, buffers,
# state_dict, input checks (unbatched InstanceNorm input included) and repr are torch's.


class GroupNorm(torch.nn.GroupNorm):
    """``torch.nn.GroupNorm`` on fusednorm's kernels; ``activation="silu"`` fuses a SiLU.

    Under TorchScript (see modules.py), torch's group_norm and silu."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5,
                 affine: bool = True, device=None, dtype=None, *, bias: bool = True,
                 activation: str | None = None) -> None:
        _silu_flag(activation)
        # bias=True is passed implicitly, so that a torch without the keyword works too
        extra = {} if bias else {"bias": False}
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, **extra)
        self.activation = activation
        self._silu = activation == "silu"  # (TorchScript types a bool, not an Optional[str])

    # The plan of this module's last call, kept for the next (see `_eager`): its guard, the plan,
    # and what it was made for (parameters, configuration, state); None until a call on a plain
    # tensor in a plain state takes our kernels.
    _fusednorm_last = None

    def forward(self, input: Tensor) -> Tensor:
        if _is_scripting():
            y = F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
            return F.silu(y) if self._silu else y
        return self._eager(input, self.activation)

    @torch.jit.unused
    def _eager(self, input: Tensor, activation: str | None) -> Tensor:
        """`group_norm` of this module's input. A model calls each norm with inputs of one
        signature, cache-cold (each step of Python costs several times what it does in a loop):
        so the plan of the last call is tried first, the state checked as `group_norm` checks
        it, the tensors by the plan's guard and the configuration by identity, without the
        lookup of a plan by its key; anything else takes `group_norm`'s way, and a plan it
        finds is then kept."""
        # (where `self.weight` finds them, without Module.__getattr__'s Python; `self.weight`
        # itself only where they are not parameters: a parametrized weight is a property)
        params = self._parameters
        weight = params["weight"] if "weight" in params else self.weight  # noqa: SIM401
        bias = params["bias"] if "bias" in params else self.bias  # noqa: SIM401
        common = (type(input) is Tensor and not torch.compiler.is_compiling()
                  and not (_transforms_active() or _forward_ad._current_level >= 0
                           or _dispatch_modes() or _function_modes()
                           or _tracing_state() is not None))
        last = self._fusednorm_last if common else None
        if last is not None:
            guard, plan, held_weight, held_bias, groups, eps, held_activation, grad, backend = last
            # (the configuration and the parameters are the very objects the plan was kept
            # for; neither parameter can have become a nested tensor since, on which a guard
            # check ends the process)
            if (weight is held_weight and bias is held_bias and self.num_groups is groups
                    and self.eps is eps and activation is held_activation
                    and torch.is_grad_enabled() is grad and _backend._current is backend
                    and not any_enabled() and not input.is_nested
                    and guard(input, ABSENT[1] if weight is None else weight,
                              ABSENT[2] if bias is None else bias)):
                # (`plan.run`, inlined: a step less)
                if plan.copy_to is not None:
                    input = input.contiguous(memory_format=plan.copy_to)
                if plan.needs_grad:
                    if plan.native:  # (from the plan's second backward on, where built)
                        return plan.native(input, weight, bias)
                    return _group_norm_fast_c(input, weight, bias, plan)
                if plan.direct:
                    return plan.kernels.forward(input, weight, bias, True)[0]
                return plan.kernels.forward(input, *plan.params(weight, bias), True)[0]
        if common and not any_enabled():  # (under autocast: `group_norm` casts, or not)
            # as `group_norm` takes such a call, its plan kept if it is our kernels' and guarded
            silu = False if activation is None else _silu_flag(activation)
            input = unwrap_if_dead(input)
            guard, plan = _planned(input, self.num_groups, weight, bias, self.eps, silu)
            if plan.fast:
                self._fusednorm_last = guard and (
                    guard, plan, weight, bias, self.num_groups, self.eps, activation,
                    torch.is_grad_enabled(), _backend._current)
                return plan.run(input, weight, bias)
        return group_norm(input, self.num_groups, weight, bias, self.eps, activation=activation)

    def __getstate__(self):  # (copies and pickles make their own plans)
        state = super().__getstate__()
        state.pop("_fusednorm_last", None)
        return state

    def extra_repr(self) -> str:
        extra = f", activation={self.activation!r}" if self.activation else ""
        return super().extra_repr() + extra


_is_scripting = torch.jit.is_scripting  # (TorchScript knows the function, not the name)


def __getattr__(name: str):
    # InstanceNorm lived here before `instance_norms.py`: models pickled then name this module
    if name in ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "instance_norm"):
        from fusednorm import instance_norms

        return getattr(instance_norms, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
