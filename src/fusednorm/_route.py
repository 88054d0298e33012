"""Which way a call goes, from the tensors it is given and the state torch is in.

The kernels read memory: they take plain strided tensors of a float dtype whose memory holds
their values. Everything else a torch tensor can be goes another way, decided here before any
data pointer is taken:

- `transforming()`: a torch.func transform (vmap, grad, jvp, ...) or forward-mode AD is
  active, or a TorchDispatchMode is: the autograd Functions of `_row_functions.py` and
  `_channel_functions.py`, whose rules for each transform run the kernels through the
  registered ops (`forward_over_forward()`: torch's ops instead).
- `tracing()`: TorchScript's tracer records aten ops only: torch's ops (`_export.py`).
- `function_mode()`: a TorchFunctionMode (`with torch.device(...)`, a user's mode) sees torch's
  functions, and changes where their factory calls allocate: torch's op, as torch would run.
- `kind(t)` of each tensor argument:
  - "kernels": readable by the kernels (see `readable`);
  - "ops": a DTensor, which dispatches the registered ops by their sharding rules
    (`_dtensor.py`) to the kernels on its local shards;
  - "nested": a jagged nested tensor (its values buffer holds the rows);
  - "torch": anything else (a subclass with its own __torch_function__ or __torch_dispatch__,
    fake tensors among them, sparse, mkldnn, strided-nested, a lazily negated or conjugated
    view, a complex, quantized or integer dtype): torch's own op, which gives torch's result or
    torch's error.
"""

from __future__ import annotations

import sys
import types

import torch
from torch import Tensor

from fusednorm._checks import FLOAT_DTYPES

_transforms_active = torch._C._are_functorch_transforms_active
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._len_torch_function_stack
_tracing_state = torch._C._get_tracing_state
_forward_ad = torch.autograd.forward_ad
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)
_DTENSOR = "torch.distributed.tensor.DTensor"


def way(*tensors: Tensor | None) -> str:
    """The way of a channel norm's call: "compile" (a graph being traced: the registered ops),
    "export" (torch.export or TorchScript's tracer: torch's ops), "transform", or `route`'s."""
    if torch.compiler.is_compiling():
        return "export" if torch.compiler.is_exporting() else "compile"
    if tracing():
        return "export"
    if function_mode():
        return "torch"
    if transforming():
        return "transform" if readable_all(*tensors) and not forward_over_forward() else "torch"
    return route(*tensors)


def transforming() -> bool:
    """Whether a call must go through the transform-aware autograd Functions: a torch.func
    transform wraps the tensors (no storage to read), forward-mode AD needs their jvp rules,
    or a TorchDispatchMode wants to see the op."""
    return _transforms_active() or _forward_ad._current_level >= 0 or _dispatch_modes() > 0


def forward_over_forward() -> bool:
    """Whether two forward-mode levels are active (jacfwd of jacfwd, jvp of jvp). torch runs an
    autograd.Function's jvp rule with forward AD off, so the outer level would not see the rule's
    own ops: such calls take torch's ops, which torch.func differentiates to any order."""
    stack = torch._C._functorch.get_interpreter_stack() or ()
    # (torch.autograd.forward_ad does not nest, nor nests under a functorch jvp)
    return sum(level.key() == torch._C._functorch.TransformType.Jvp for level in stack) >= 2


def plain_state() -> bool:
    """None of the states below (transforms, forward AD, modes, the tracer): the state in which
    eager calls on plain tensors take the fast path. (One call: this is on every call's way.)"""
    return not (_transforms_active() or _forward_ad._current_level >= 0 or _dispatch_modes()
                or _function_modes() or _tracing_state() is not None)


def function_mode() -> bool:
    """Whether a TorchFunctionMode is active (see the module's docstring)."""
    return _function_modes() > 0


def tracing() -> bool:
    """Whether TorchScript's tracer is recording (it sees aten ops only, not our kernels)."""
    return _tracing_state() is not None


def readable(t: Tensor | None) -> bool:
    """None, or a tensor the kernels can read: a plain strided tensor (a Parameter counts) of a
    float dtype, its memory holding its values (no lazy negation or conjugation)."""
    return t is None or (type(t) in _PLAIN_TYPES and t.layout is torch.strided
                         and not t.is_nested and t.dtype in FLOAT_DTYPES and not t.is_neg())


def kind(t: Tensor | None) -> str:
    """"kernels", "ops", "nested" or "torch" for one argument (see the module's docstring)."""
    if readable(t):
        return "kernels"
    if not isinstance(t, Tensor):
        return "torch"
    cls = type(t)
    if cls not in _PLAIN_TYPES:
        if _is_jagged(t):
            return "nested"
        if _is_a(t, _DTENSOR):
            from fusednorm import _dtensor

            _dtensor.register()  # (once: the sharding rules of the row norms' ops)
            return "ops"
    return "torch"


def readable_all(*tensors: Tensor | None) -> bool:
    return all(readable(t) for t in tensors)


def route(*tensors: Tensor | None) -> str:
    """The way for a call on these tensors: the first of "torch", "nested", "ops" that any of
    them needs, else "kernels"."""
    kinds = {kind(t) for t in tensors}
    for way in ("torch", "nested", "ops"):
        if way in kinds:
            return way
    return "kernels"


def tensor_signature(t: Tensor | None) -> tuple | None:
    """What tells a tensor argument apart in the launch plans' keys (with the input's own
    shape, strides and dtype): a plan made for one signature serves every later call with it."""
    return None if t is None else (type(t), t.shape, t.stride(), t.dtype, t.device,
                                   t.requires_grad, t.is_neg())


_ASYNC = "torch.distributed._functional_collectives.AsyncCollectiveTensor"


def settled(*tensors: Tensor | None) -> tuple:
    """The tensors, each pending collective's result waited for: tensor parallelism hands on
    RowwiseParallel's output as an AsyncCollectiveTensor, a wrapper that becomes a plain tensor
    once its collective has finished (`wait_tensor`, which autograd passes through)."""
    return tuple(torch.ops._c10d_functional.wait_tensor(t)
                 if t is not None and type(t) is not Tensor and _is_a(t, _ASYNC) else t
                 for t in tensors)


def op_or_impl(op, impl, x: Tensor):
    """`op` through the dispatcher when something there must see it (a DTensor's sharding
    rules, a dispatch mode), else its implementation: a direct call costs tens of µs less."""
    return op if type(x) is not Tensor or _dispatch_modes() else impl


def eager_only(fn):
    """A copy of `fn` that TorchScript compiles as raising (`torch.jit.unused`), for the eager
    branch of a module's forward (the scripted branch runs torch's ops); `fn` itself stays as it
    is. A copy rather than a wrapper: it costs the call nothing."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)
    copy.__kwdefaults__, copy.__doc__ = fn.__kwdefaults__, fn.__doc__
    return torch.jit.unused(copy)


def _is_a(t: Tensor, qualified: str) -> bool:
    module, name = qualified.rsplit(".", 1)
    found = sys.modules.get(module)  # none of these exists before its module is imported
    return found is not None and isinstance(t, getattr(found, name))


def _is_jagged(t: Tensor) -> bool:
    return t.is_nested and t.layout is torch.jagged
