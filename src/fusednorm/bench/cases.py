"""What is measured: the ops, the shapes swept, the inputs, the float64 answers and the bytes moved.

Every case is an op on M rows of N elements. The channel norms read the same (M, N) as
(B, C, H, W) with G = 32 groups: M = B·G rows (one per group), N = (C/G)·H·W elements per
group; group_norm normalizes each group (group_norm_silu then applies SiLU: fused in
fusednorm, torch's F.silu after its group_norm), batch_norm (training) each channel over batch
and space. The *_nhwc ops take the same input in channels_last memory (the output keeps it).
A shape given as BxCxHxW is that input itself (the channel norms only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fusednorm.reference import (
    add_norm_ref,
    batch_norm_ref,
    group_norm_ref,
    layer_norm_ref,
    rms_norm_ref,
)

CHANNEL_OPS = ("group_norm", "group_norm_nhwc", "group_norm_silu", "group_norm_silu_nhwc",
               "batch_norm", "batch_norm_nhwc")
OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm") + CHANNEL_OPS
ALIASES = {"add_norm": ("add_layer_norm", "add_rms_norm"), "channel_norms": CHANNEL_OPS}
MODES = ("fwd", "bwd", "fwdbwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EPS, RMS_EPS = 1e-5, 1e-6
GROUPS = 32

# The headline shapes, measured in every run (quick included).
HEADLINE = ((4096, 4096), (32768, 768), (8192, 1024))
# A tiny call measures eager per-call overhead; a channel norm's is 1x32x1x2, same
# numel.
TINY = dict.fromkeys(CHANNEL_OPS, (32, 2))
TINY_ROWS = (1, 64)
CPU_NS = (256, 512, 768, 1024, 2048, 3000, 4096, 8192, 16384, 32768, 65536)
CUDA_NS = (256, 512, 768, 1024, 2048, 3000, 4096, 5120, 8192, 12288, 16384, 32768, 65536,
           131072, 262144)
SMALL_BATCHES = (1, 2, 4, 8, 16, 32, 64)  # rows at N = 4096 on CUDA, against an empty launch


@dataclass(frozen=True)
class Shape:
    M: int
    N: int
    tag: str  # "sweep", "headline", "tiny" (per-call overhead), "small" (CUDA batches), "custom"
    dims: tuple[int, ...] | None = None  # a channel norm's input as given (BxCxHxW)

    def __str__(self) -> str:
        return "x".join(map(str, self.dims)) if self.dims else f"{self.M}x{self.N}"


def default_shapes(device: str, dtype: torch.dtype, quick: bool) -> list[Shape]:
    """The sweep: CPU at ~32 MB per tensor, CUDA at M·N >= 16M; M a multiple of 32 (channel norms)."""
    s = torch.finfo(dtype).bits // 8
    shapes = [Shape(m, n, "headline") for m, n in HEADLINE]
    if not quick and device == "cpu":
        shapes += [Shape(_round32(2**25 / (n * s)), n, "sweep") for n in CPU_NS]
    if not quick and device == "cuda":
        shapes += [Shape(_round32(math.ceil(2**24 / n)), n, "sweep") for n in CUDA_NS]
        shapes += [Shape(m, 4096, "small") for m in SMALL_BATCHES]
    return shapes + [Shape(*TINY_ROWS, "tiny")]


def parse_shapes(text: str) -> list[Shape]:
    shapes = []
    for item in text.split(","):
        dims = tuple(int(v) for v in item.lower().split("x"))
        if len(dims) > 2:  # a channel norm's input: M = B·G rows of its groups
            shapes.append(Shape(dims[0] * GROUPS, math.prod(dims) // (dims[0] * GROUPS),
                                "custom", dims))
            continue
        m, n = dims
        shapes.append(Shape(m, n, "tiny" if (m, n) == TINY_ROWS else "custom"))
    return shapes


def _round32(m: float) -> int:
    return max(32, round(m / 32) * 32)


def input_shape(op: str, shape: Shape) -> tuple[int, ...] | None:
    """The input tensor's shape for this op, or None where the op cannot take this (M, N)."""
    if shape.dims:
        return shape.dims if op in CHANNEL_OPS and shape.dims[1] % GROUPS == 0 else None
    m, n = (TINY[op] if shape.tag == "tiny" and op in TINY else (shape.M, shape.N))
    if op not in CHANNEL_OPS:
        return (m, n)
    if m % GROUPS:
        return None
    per_group = 8 if n % 8 == 0 else 1  # channels per group
    hw = n // per_group
    h = max(d for d in range(1, math.isqrt(hw) + 1) if hw % d == 0)
    return (m // GROUPS, GROUPS * per_group, h, hw // h)


@dataclass
class Inputs:
    args: tuple  # (x, weight, bias, residual); absent ones are None
    grad_outs: tuple  # (dy,) or (dy, dh): add-norm's h output also receives a gradient

    @property
    def leaves(self) -> list[torch.Tensor]:
        return [t for t in self.args if t is not None]

    def clone(self) -> Inputs:
        def c(t):
            return None if t is None else t.detach().clone().requires_grad_(t.requires_grad)
        return Inputs(tuple(c(t) for t in self.args), tuple(c(t) for t in self.grad_outs))


def make_inputs(op: str, dtype: torch.dtype, shape: tuple[int, ...], device: str) -> Inputs:
    """x ~ N(0, 1); weight ~ 1 + N(0, 0.1²) and bias ~ N(0, 0.1²) in x's dtype."""
    g = torch.Generator().manual_seed(0)

    def randn(*size, scale=1.0, shift=0.0):
        t = torch.randn(*size, generator=g, dtype=torch.float32) * scale + shift
        return t.to(device=device, dtype=dtype)

    n_param = shape[1] if op in CHANNEL_OPS else shape[-1]
    x, w = randn(*shape), randn(n_param, scale=0.1, shift=1.0)
    b = None if "rms" in op else randn(n_param, scale=0.1)
    r = randn(*shape) if op.startswith("add_") else None
    grads = (randn(*shape),) + ((randn(*shape),) if r is not None else ())
    if op.endswith("_nhwc"):
        x, grads = _channels_last(x), tuple(_channels_last(g) for g in grads)
    return Inputs((x, w, b, r), grads)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def reference(op: str, x, w, b, r) -> tuple[torch.Tensor, ...]:
    """float64 outputs of the op: (y,) or (y, h)."""
    if op.startswith("group_norm"):
        return (group_norm_ref(x, GROUPS, w, b, EPS, "silu" if "silu" in op else None),)
    if op.startswith("batch_norm"):
        return (batch_norm_ref(x, None, None, w, b, training=True, eps=EPS)[0],)
    if "rms" in op:
        norm, kw = rms_norm_ref, {"weight": w, "eps": RMS_EPS}
    else:
        norm, kw = layer_norm_ref, {"weight": w, "bias": b, "eps": EPS}
    if r is None:
        return (norm(x, x.shape[-1:], **kw),)
    return add_norm_ref(x, r, None, 0.0, norm, normalized_shape=x.shape[-1:], **kw)


# Bytes every implementation must move, in units of one (M, N) tensor: x and y forward; x, dy
# read and dx written backward. Add-norm forward reads x, r and writes y, h. Its backward reads
# dy, dh (the gradient reaching the h output) and h, and writes one tensor: without dropout and
# with residual in x's dtype, dx = dresidual = dh, so a fused kernel can return it twice.
TENSORS_MOVED = {"fwd": {"add": 4, "norm": 2}, "bwd": {"add": 4, "norm": 3}}


def bytes_moved(op: str, mode: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """The floor of bytes read and written; parameters counted (weight, bias read forward;
    weight read and their gradients written backward), the tiny mean/rstd not."""
    numel, s = math.prod(shape), torch.finfo(dtype).bits // 8
    kind = "add" if op.startswith("add_") else "norm"
    n_param = shape[1] if op in CHANNEL_OPS else shape[-1]
    params = 1 if "rms" in op else 2
    total = 0
    for m in ("fwd", "bwd") if mode == "fwdbwd" else (mode,):
        total += TENSORS_MOVED[m][kind] * numel * s
        total += (params if m == "fwd" else params + 1) * n_param * s
    return total
