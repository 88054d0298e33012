"""The two layouts the channel-norm kernels read, shared by the op layer and every backend.

The channel norms view their input as (N, C, S), S the product of the spatial sizes, either
channels first (contiguous) or channels innermost (channels_last), the layout of torch's own
output for that input and norm (`torch_channels_last`): x is read in place where it lies in
that layout, else copied into it as torch copies it, and the output has torch's strides.
"""

from __future__ import annotations

import torch
from torch import Tensor


def layout_strides(shape: tuple[int, int, int], channels_last: bool) -> tuple[int, int, int]:
    """The strides of an (N, C, S) tensor in the kernels' layouts (what their outputs have)."""
    _, c, s = shape
    return (c * s, 1, c) if channels_last else (c * s, s, 1)


def in_layout(t: Tensor, channels_last: bool) -> bool:
    """Whether t (N, C, S) has the layout's strides (a size-1 dim's stride does not matter:
    the kernels never step along it)."""
    want = layout_strides(t.shape, channels_last)
    return all(a == b or size <= 1 for a, b, size in zip(t.stride(), want, t.shape))


def conform(t: Tensor, channels_last: bool) -> Tensor:
    """t (N, C, S) in the layout asked for: itself, or a copy."""
    if in_layout(t, channels_last):
        return t
    return t.transpose(1, 2).contiguous().transpose(1, 2) if channels_last else t.contiguous()


def empty_layout(x: Tensor, channels_last: bool, dtype: torch.dtype | None = None) -> Tensor:
    """A new tensor of x's (N, C, S) shape with the layout's exact strides (as the fake ops)."""
    return torch.empty_strided(x.shape, layout_strides(x.shape, channels_last),
                               dtype=dtype or x.dtype, device=x.device)


def torch_channels_last(x: Tensor, norm: str) -> bool:
    """Whether torch's own op answers x channels last (the kernels then read and write channels
    innermost; else channels first), by torch's CPU rules, checked against its ops for every
    arrangement of 4-D and 5-D strides: group_norm answers in x's suggested memory format,
    batch_norm channels last where x is channels-last contiguous and not contiguous,
    instance_norm never (it normalizes a contiguous view). A transposed (N, L, C) tensor is
    answered contiguous by all three (an output in another layout than torch's fails a view
    torch's allows, and makes the layers after it run in that layout)."""
    if x.dim() not in (4, 5) or norm == "instance":
        return False
    if norm == "group":
        return _strides_like_channels_last(x.shape, x.stride())
    return not x.is_contiguous() and x.is_contiguous(memory_format=_channels_last_format(x))


def _channels_last_format(x: Tensor) -> torch.memory_format:
    """channels_last for a 4-D x, channels_last_3d for a 5-D one."""
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def _strides_like_channels_last(shape, strides) -> bool:
    """torch's `suggest_memory_format` test of a 4-D or 5-D tensor (c10's
    is_channels_last_strides_2d/3d): strides increasing along C, the spatial dims from the
    last, then N, where a size-1 dim does not count for the next one's bound and an N stride
    equal to C's reads as contiguous. (Here rather than torch's Python copy of it, which reads
    `layout`: compiled graphs may not, inside an autograd.Function.)"""
    if strides[1] == 0:
        return False
    low = 0
    for d in (1, *range(len(shape) - 1, 1, -1), 0):
        if shape[d] == 0 or strides[d] < low or (d == 0 and low == strides[1]):
            return False
        low = strides[d] * shape[d] if shape[d] > 1 else strides[d]
    return True


def torch_strides(x: Tensor, norm: str) -> tuple[int, ...]:
    """The strides of torch's output for x: its memory format's (`torch_channels_last`), a
    size-1 dim's stride included."""
    if torch_channels_last(x, norm):  # channels innermost, then the spatial dims, then N
        order = (1, *range(x.dim() - 1, 1, -1), 0)
    else:
        order = tuple(range(x.dim() - 1, -1, -1))
    strides, step = [0] * x.dim(), 1
    for d in order:
        strides[d] = step
        step *= max(x.shape[d], 1)
    return tuple(strides)


def as_ncs(x: Tensor, norm: str) -> tuple[Tensor, bool]:
    """x (N, C, *) as an (N, C, S) view, and whether its channels are innermost: the layout of
    torch's output for `norm` ("group", "batch" or "instance"; see `torch_channels_last`), x
    read in place where its memory is in it, else copied into it. With one position per channel
    both layouts are the same memory: BatchNorm reads it channels last (rows of C)."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c) if n * c else 1
    cl = norm == "batch" if s == 1 else torch_channels_last(x, norm)
    if not cl:
        return (x if x.is_contiguous() else x.contiguous()).view(n, c, s), False
    x3 = x.reshape(n, c, s)
    # (a size-1 batch dim may have any stride: a slice x[i:i + 1] of a channels_last batch; a
    # reshape that had to copy gives channels first, which fails the test)
    if in_layout(x3, True):
        return x3, True
    if x.dim() in (4, 5):  # strided channels last, copied as torch copies it
        return x.contiguous(memory_format=_channels_last_format(x)).reshape(n, c, s), True
    return conform(x3, True), True


def torch_memory_format(x: Tensor, norm: str) -> torch.memory_format:
    """The memory format of torch's output for x (`torch_channels_last`)."""
    if not torch_channels_last(x, norm):
        return torch.contiguous_format
    return _channels_last_format(x)


def plan_input(x: Tensor, norm: str) -> tuple[Tensor, bool, torch.memory_format | None] | None:
    """For a launch plan: `read_in_place(x, norm)` and None, or, where x lies in another layout
    than torch's output (a transposed (N, L, C) tensor, an attention block's reshape), the same
    of x copied into that layout as torch copies it, and the memory format each call copies x
    into; None where neither serves (the general path then)."""
    in_place = read_in_place(x, norm)
    if in_place is not None:
        return (*in_place, None)
    fmt = torch_memory_format(x, norm)
    in_place = read_in_place(x.contiguous(memory_format=fmt), norm)
    return None if in_place is None else (*in_place, fmt)


def read_in_place(x: Tensor, norm: str) -> tuple[Tensor, bool] | None:
    """`as_ncs(x, norm)` where the kernels read x where it lies and their output, made like x
    (`empty_like`), has torch's strides; None where x would be copied into a layout (a launch
    plan then leaves the call to the general path)."""
    x3, cl = as_ncs(x, norm)
    if x3.data_ptr() != x.data_ptr() or x.stride() != torch_strides(x, norm):
        return None
    return x3, cl


def from_layout(t3: Tensor, x: Tensor, norm: str) -> Tensor:
    """The kernels' (N, C, S) output (or gradient) as torch's for x: x's shape, torch's strides
    (the view's differ at most in size-1 dims), and no view: an autograd Function's output that
    is a view cannot be modified in place (a ReLU(inplace=True) after the norm)."""
    y = t3.view(x.shape) if t3.numel() else t3.reshape(x.shape)
    strides = torch_strides(x, norm)
    return (y if y.stride() == strides else y.as_strided(x.shape, strides)).detach()
