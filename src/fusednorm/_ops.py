"""Eager calls go straight to the kernels; compiled graphs go through torch.library ops.

And calls that no gradient will be asked of skip the autograd.Function (`needs_grad`): its
machinery costs several microseconds a call, as much as a small kernel.

`torch.library.custom_op` costs several microseconds per call in eager mode, which matters for
small rows on a GPU, so eager code calls the Python implementation directly. Under
torch.compile the registered op (with its fake implementation) is used, so the graph has no
break and Inductor sees an opaque, correctly-shaped node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def dispatch(op: Callable[..., Any], impl: Callable[..., Any], *args: Any) -> Any:
    if torch.compiler.is_compiling():
        return op(*args)
    return impl(*args)


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record an op on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
