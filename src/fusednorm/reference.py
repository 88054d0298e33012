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


# --- channel norms: the input (N, C, *), statistics per (sample, group), per channel ----------


def group_norm_ref(x, groups, weight=None, bias=None, eps=1e-5, activation=None):
    """float64 GroupNorm (optionally followed by SiLU) in plain tensor arithmetic."""
    x = x.double()
    n, c = x.shape[:2]
    xg = x.reshape(n, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.double().reshape(shape)
    if bias is not None:
        y = y + bias.double().reshape(shape)
    if activation == "silu":
        y = y / (1 + torch.exp(-y))
    return y


def batch_norm_ref(x, running_mean, running_var, weight=None, bias=None, training=False,
                   momentum=0.1, eps=1e-5):
    """float64 BatchNorm in plain arithmetic; returns (y, new running mean, new running var)."""
    x = x.double()
    c = x.shape[1]
    shape = (1, c) + (1,) * (x.dim() - 2)
    dims = [0] + list(range(2, x.dim()))
    new_mean, new_var = running_mean, running_var
    if training:
        mean = x.mean(dims)
        var = ((x - mean.view(shape)) ** 2).mean(dims)
        if running_mean is not None:
            count = x.numel() // c
            new_mean = (1 - momentum) * running_mean.double() + momentum * mean
            new_var = (1 - momentum) * running_var.double() + momentum * var * count / (count - 1)
    else:
        mean, var = running_mean.double(), running_var.double()
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if weight is not None:
        y = y * weight.double().view(shape)
    if bias is not None:
        y = y + bias.double().view(shape)
    return y, new_mean, new_var


def instance_norm_ref(x, running_mean=None, running_var=None, weight=None, bias=None,
                      use_input_stats=True, momentum=0.1, eps=1e-5):
    """float64 InstanceNorm in plain arithmetic; returns (y, new running mean, new running var)
    (the running statistics unchanged when not updated)."""
    x = x.double()
    n, c = x.shape[:2]
    shape = (1, c) + (1,) * (x.dim() - 2)
    xs = x.reshape(n, c, -1)
    new_mean, new_var = running_mean, running_var
    if use_input_stats:
        mean = xs.mean(-1, keepdim=True)
        var = ((xs - mean) ** 2).mean(-1, keepdim=True)
        y = ((xs - mean) / torch.sqrt(var + eps)).reshape(x.shape)
        if running_mean is not None:
            s = xs.shape[-1]
            new_mean = (1 - momentum) * running_mean.double() + momentum * mean.mean(0).view(c)
            new_var = ((1 - momentum) * running_var.double()
                       + momentum * (var * s / (s - 1)).mean(0).view(c))
    else:
        y = (x - running_mean.double().view(shape)) / torch.sqrt(
            running_var.double().view(shape) + eps)
    if weight is not None:
        y = y * weight.double().view(shape)
    if bias is not None:
        y = y + bias.double().view(shape)
    return y, new_mean, new_var
