"""Jagged nested tensors (``layout=torch.jagged``): the rows are the values buffer's.

A jagged tensor (B, j, *dense) keeps its sequences one after another in a values buffer
(sum of lengths, *dense). Normalizing over trailing dense dims normalizes each row of that
buffer on its own: the norm of the values, with autograd through `values()` and back into a
jagged tensor of the input's structure (the same offsets, so the same ragged size). Normalizing
over the ragged dim (or the batch) is not a row norm of the buffer: torch's own op answers,
with torch's result or torch's error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def row_norm(norm, x, normalized_shape, weight, bias, eps, residual, dropout_p,
             residual_in_fp32, out_dtype, zero_centered, xhat_dtype, memory_efficient, is_rms):
    """`norm` (row_norm._row_norm) over the values of jagged x (and of a jagged residual)."""
    extras = (residual is not None or dropout_p or out_dtype is not None or zero_centered
              or xhat_dtype is not None)
    if not (isinstance(normalized_shape, (tuple, list, torch.Size))
            and 0 < len(normalized_shape) <= x.dim() - x._ragged_idx - 1):
        if extras:
            raise RuntimeError("fusednorm: residual, dropout_p and the other fused options "
                               "normalize jagged tensors over their dense trailing dims only")
        if is_rms:
            return F.rms_norm(x, normalized_shape, weight, eps)
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    values = None
    if residual is not None:
        if not (residual.is_nested and residual.shape == x.shape):  # the same ragged size
            raise RuntimeError(
                f"fusednorm: residual must be a jagged tensor of the input's shape "
                f"{list(x.shape)}, got {list(residual.shape)}")
        values = residual.values()
    out = norm(x.values(), normalized_shape, weight, bias, eps, values, dropout_p,
               residual_in_fp32, out_dtype, zero_centered, xhat_dtype, memory_efficient,
               is_rms)
    if residual is not None:
        return _like(out[0], x), _like(out[1], x)
    return _like(out, x)


def _like(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A jagged tensor of x's structure holding `values` (a differentiable view of them)."""
    return torch.nested.nested_tensor_from_jagged(
        values, offsets=x.offsets(), lengths=x.lengths(), jagged_dim=x._ragged_idx,
        min_seqlen=x._maybe_min_seqlen, max_seqlen=x._maybe_max_seqlen)
