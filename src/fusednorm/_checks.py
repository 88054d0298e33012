"""Argument checks that fail exactly as the installed torch does.

The fast path only decides *whether* the arguments are valid. When they are not, the same call
is replayed on PyTorch's own op with zero-memory stand-ins (a scalar expanded to the real shape,
same dtype and device), so the exception type and message are those of the installed torch on
that device, whatever its version.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def stand_in(t: torch.Tensor | None) -> torch.Tensor | None:
    """A tensor with ``t``'s shape, dtype and device that owns one element of memory."""
    if t is None or not isinstance(t, torch.Tensor):
        return t
    return torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)


def raise_like_torch(torch_call: Callable[[], object], what: str) -> None:
    """Run ``torch_call`` (torch's op on stand-ins) so that it raises torch's own error.

    Returns when torch accepts what our checks refuse (say, parameters of a dtype the kernels do
    not take): the caller then answers with torch's op on the real arguments, never with the
    kernels on input they do not support. (`what` names the op, for the callers' messages.)"""
    with torch.no_grad():
        torch_call()


def params_ok(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Dtype and device rules shared by every norm: float input; parameters of the input's dtype,
    or float32 with a float16/bfloat16 input; all parameters of one dtype, on x's device."""
    if x.dtype not in FLOAT_DTYPES:
        return False
    present = [p for p in params if p is not None]
    if not present:
        return True
    dtype = present[0].dtype
    if dtype != x.dtype and not (dtype == torch.float32 and x.dtype in HALF_DTYPES):
        return False
    return all(p.dtype == dtype and p.device == x.device for p in present)


def normalized_shape_ok(x: torch.Tensor, normalized_shape: Sequence[int]) -> bool:
    if not isinstance(normalized_shape, (tuple, list, torch.Size)):
        return False
    k = len(normalized_shape)
    return 0 < k <= x.dim() and tuple(x.shape[x.dim() - k :]) == tuple(normalized_shape)


def param_shape_ok(p: torch.Tensor | None, normalized_shape: Sequence[int]) -> bool:
    return p is None or tuple(p.shape) == tuple(normalized_shape)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every kernel computes (and keeps statistics) in: float32, float64 for float64
    input."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_rms_eps(dtype: torch.dtype) -> float:
    """torch.nn.functional.rms_norm's eps=None: the epsilon of the computation type."""
    return torch.finfo(compute_dtype(dtype)).eps


def as_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """View ``x`` as (M, n) rows without copying when its inner dims collapse to unit stride.

    Rows may be strided (row stride != n) and are read in place by the kernels; any other
    layout (channels-last with normalized dims that are not innermost, transposes) is copied
    once.
    """
    m = x.numel() // n if n else 0
    if x.dim() == 0:
        return x.reshape(1, 1)
    if x.is_contiguous():
        return x.view(m, n)
    stride = row_stride(x, n)
    if stride is None:
        return x.contiguous().view(m, n)
    # Overlapping rows (an expanded batch, row stride 0) are fine: kernels only read x.
    return x.as_strided((m, n), (stride, 1))


def row_stride(x: torch.Tensor, n: int) -> int | None:
    """The stride between x's rows of its last n elements when they can be read in place:
    unit inner stride and one uniform row stride (n for contiguous x); None when x must be
    copied first."""
    if x.is_contiguous():
        return n
    if n > 1 and x.stride(-1) != 1:
        return None
    # the normalized dims must be contiguous among themselves ...
    inner, expected = 0, 1
    for size, stride in zip(reversed(x.shape), reversed(x.stride())):
        if expected == n:
            break
        if size != 1 and stride != expected:
            return None
        expected *= size
        inner += 1
    # ... and the leading dims must collapse into one dimension of rows.
    found, expected_stride = None, None
    for size, stride in zip(reversed(x.shape[: x.dim() - inner]),
                            reversed(x.stride()[: x.dim() - inner])):
        if size == 1:
            continue
        if found is None:
            found, expected_stride = stride, stride * size
        elif stride != expected_stride:
            return None
        else:
            expected_stride = stride * size
    return n if found is None else found
