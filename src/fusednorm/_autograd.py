"""A cheaper ``autograd.Function.apply`` for the eager fast paths."""

from __future__ import annotations

from collections.abc import Callable

import torch

# a tensor kept from inside a finished functorch transform (torch.func.grad, vmap) is a
# wrapper without storage: its value is the tensor it wraps (live wrappers are left alone)
unwrap_if_dead = _unwrap_if_dead = torch._C._functorch.unwrap_if_dead
_transforms_active = torch._C._are_functorch_transforms_active


def fast_apply(function: type[torch.autograd.Function], tensors: int = 3) -> Callable:
    """``function.apply`` for Functions whose first ``tensors`` (3 or 4) arguments are a tensor
    then tensors or None, the rest no tensors.

    torch's ``Function.apply`` is a Python wrapper around the C++ one that binds default
    arguments for ``setup_context`` (these Functions have none) and unwraps functorch's dead
    wrappers through a generator: ~2 µs of a small call's ~15. This unwraps the tensors by hand
    and hands calls made under a functorch transform (vmap, grad, ...) to the full ``apply``."""
    full = function.apply
    raw = c_apply(function)

    def apply3(x, a, b, *others):
        if _transforms_active():
            return full(x, a, b, *others)
        return raw(_unwrap_if_dead(x), a if a is None else _unwrap_if_dead(a),
                   b if b is None else _unwrap_if_dead(b), *others)

    def apply4(x, a, b, c, *others):
        if _transforms_active():
            return full(x, a, b, c, *others)
        return raw(_unwrap_if_dead(x), a if a is None else _unwrap_if_dead(a),
                   b if b is None else _unwrap_if_dead(b),
                   c if c is None else _unwrap_if_dead(c), *others)

    return {3: apply3, 4: apply4}[tensors]


_c_apply = torch._C._FunctionBase.__dict__["apply"]


def c_apply(function: type[torch.autograd.Function]) -> Callable:
    """The C++ ``apply`` of a Function, unwrapped: for callers that have ruled out functorch
    transforms and hold plain tensors (the plans' guards turn functorch wrappers down)."""
    return _c_apply.__get__(None, function)


class Function(torch.autograd.Function):
    """An autograd.Function whose ``apply`` skips torch's Python wrapper (it binds default
    arguments through ``inspect.signature``: tens of µs a call) when no functorch transform is
    active; under one, torch's own, which hands the call to functorch. For Functions whose
    ``forward`` has no default arguments."""

    @classmethod
    def apply(cls, *args):
        if _transforms_active():
            return super().apply(*args)
        return _c_apply.__get__(None, cls)(*args)
