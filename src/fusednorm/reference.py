"""float64 references: the specification every backend is tested against.

Written with plain tensor arithmetic (not torch's norm ops) so that they check torch as well as us.
Each takes and returns tensors of any float dtype; the maths is done in float64 and the result
is returned in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _dims(x: torch.Tensor, normalized_shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(range(x.dim() - len(normalized_shape), x.dim()))


def layer_norm_ref(x, normalized_shape, weight=None, bias=None, eps=1e-5, zero_centered=False):
    x = x.double()
    dims = _dims(x, normalized_shape)
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * (weight.double() + 1 if zero_centered else weight.double())
    if bias is not None:
        y = y + bias.double()
    return y


def default_rms_eps(dtype: torch.dtype) -> float:
    """torch.nn.functional.rms_norm's eps=None: the epsilon of the computation type."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def rms_norm_ref(x, normalized_shape, weight=None, eps=None, zero_centered=False):
    if eps is None:
        eps = default_rms_eps(x.dtype)
    x = x.double()
    dims = _dims(x, normalized_shape)
    y = x / torch.sqrt((x * x).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * (weight.double() + 1 if zero_centered else weight.double())
    return y


def add_norm_ref(x, residual, keep_mask, p, norm, **norm_kwargs):
    """h = residual + dropout(x) with the given keep mask; returns (norm(h), h) in float64."""
    x = x.double()
    if keep_mask is not None and p > 0:
        x = x * keep_mask.double() / (1 - p)
    h = x if residual is None else residual.double() + x
    return norm(h, **norm_kwargs), h
