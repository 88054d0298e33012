"""The two layouts the channel-norm kernels read, shared by the op layer and every backend.

The channel norms view their input as (N, C, S), S the product of the spatial sizes, either
channels first (contiguous) or channels innermost (channels_last, or a transposed (N, L, C)
tensor), and answer in the same layout.
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


def as_ncs(x: Tensor, prefer_channels_last: bool = False) -> tuple[Tensor, bool]:
    """x (N, C, *) as an (N, C, S) view, and whether its channels are innermost.

    Channels-innermost input (channels_last, or a transposed (N, L, C) tensor) is read in place
    by the channels-last kernels; anything else is made contiguous. With one position per
    channel both layouts are the same memory: `prefer_channels_last` picks.
    """
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c) if n * c else 1
    if x.is_contiguous() and (s > 1 or not prefer_channels_last):
        return x.view(n, c, s), False  # the common case, without the checks below
    x3 = x.reshape(n, c, s)
    # a size-1 batch dim may have any stride (a slice x[i:i + 1] of a channels_last batch)
    if c > 1 and s > 1 and in_layout(x3, True):
        return x3, True
    cl = s == 1 and prefer_channels_last
    return x.contiguous().as_strided((n, c, s), layout_strides((n, c, s), cl)), cl


def read_in_place(x: Tensor, prefer_channels_last: bool = False) -> tuple[Tensor, bool] | None:
    """`as_ncs(x)` where the kernels read x where it lies and their output, made like x
    (`empty_like`), has the layout's strides; None where x would be copied into a layout (a
    launch plan then leaves the call to the general path)."""
    x3, cl = as_ncs(x, prefer_channels_last)
    if x3.data_ptr() != x.data_ptr() or torch.empty_like(x).stride() != x.stride():
        return None
    return x3, cl


def from_layout(t3: Tensor, shape: torch.Size) -> Tensor:
    """The kernels' (N, C, S) output viewed back as the input's shape."""
    return t3.view(shape) if t3.numel() else t3.reshape(shape)
