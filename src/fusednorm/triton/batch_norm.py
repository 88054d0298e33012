"""BatchNorm in Triton: per-channel statistics over batch and space.

The contract is the one at the top of `cpu/batch_norm.py`. The kernels are those of
`triton/group_norm.py` with one statistic per channel (SN = 0, CG = 1): per-(n, chunk, c)
moments, merged here per channel over (n, chunk) in a fixed order; the same apply, gradient-sum
and dx kernels. Deterministic, no atomics; the tiling depends on (C, S) and the layout only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .group_norm import (
    MERGE_BLOCK,
    apply,
    conform,
    dx_apply,
    empty_layout,
    grad_sums,
    moments,
    sum_parts,
    tiling,
)


@triton.jit(do_not_specialize=["C", "S", "P", "S_PER", "NSPLIT"])
def _merge_channels_kernel(PMEAN, PM2, MEAN, VAR, C, S, P, S_PER, NSPLIT,
                           BLOCK_C: tl.constexpr):
    """Per channel: the float64 moments of its P = N·NSPLIT pieces, merged in order
    (n, chunk)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean = tl.zeros([BLOCK_C], tl.float64)
    m2 = tl.zeros([BLOCK_C], tl.float64)
    for p in range(P):
        j = p % NSPLIT
        k = tl.minimum(S_PER, S - j * S_PER).to(tl.float64)
        prev = (p // NSPLIT).to(tl.float64) * S + (j * S_PER).to(tl.float64)
        off = p * C.to(tl.int64) + c
        pm = tl.load(PMEAN + off, cmask, other=0.0)
        pq = tl.load(PM2 + off, cmask, other=0.0)
        f = k / (prev + k)
        delta = pm - mean
        mean = mean + delta * f
        m2 = m2 + pq + delta * delta * prev * f
    tl.store(MEAN + c, mean.to(MEAN.dtype.element_ty), cmask)
    var = m2 / ((P // NSPLIT).to(tl.float64) * S)
    tl.store(VAR + c, var.to(VAR.dtype.element_ty), cmask)


def batch_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   mean: torch.Tensor | None, var: torch.Tensor | None, eps: float,
                   channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = conform(x, channels_last)
    n, c, s = x.shape
    ct = weight.dtype
    y = empty_layout(x, channels_last)
    training = mean is None
    if training:
        mean = torch.empty(c, dtype=ct, device=x.device)
        var = torch.empty_like(mean)
    if x.numel() == 0:
        if training:
            mean.fill_(float("nan"))
            var.fill_(float("nan"))
        return y, mean, var
    if training:
        pmean, pm2, tile = moments(x, channels_last, ct)
        _merge_channels_kernel[(triton.cdiv(c, MERGE_BLOCK),)](
            pmean, pm2, mean, var, c, s, n * tile[3], tile[2], tile[3], BLOCK_C=MERGE_BLOCK,
        )
    else:
        tile = tiling(c, s, channels_last)
    apply(x, y, mean, var, weight, bias, 0, 1, eps, tile, False)
    return y, mean, var


def batch_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   mean: torch.Tensor, var: torch.Tensor, eps: float, training: bool,
                   channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = conform(x, channels_last)
    dy = conform(dy, channels_last)
    n, c, s = x.shape
    dx = empty_layout(x, channels_last)
    if x.numel() == 0:
        return dx, torch.zeros_like(weight), torch.zeros_like(bias)
    tile = tiling(c, s, channels_last)
    sdy, sdyx = grad_sums(dy, x, mean, var, weight, bias, 0, 1, eps, tile, False)
    db = sum_parts(sdy.view(1, n, c)).view(c)
    dw = sum_parts(sdyx.view(1, n, c)).view(c)
    if training:  # the means over the channel of w·dy and w·dy·x̂
        mg, mgx = weight * db / (n * s), weight * dw / (n * s)
    else:  # running statistics are constants
        mg, mgx = torch.zeros_like(db), torch.zeros_like(dw)
    dx_apply(dy, x, dx, mean, var, mg, mgx, weight, bias, 0, 1, eps, tile, False)
    return dx, dw, db
