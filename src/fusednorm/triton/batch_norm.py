"""BatchNorm in Triton: per-channel statistics over batch and space.

The contract is the one at the top of `cpu/batch_norm.py`. x is seen as (N, C, S) through three
strides (channels first or last; a stride equal to 1 is specialised by Triton, which vectorizes
along it). Work is cut into programs of (sample n, chunk j of positions, block of BLOCK_C
channels); a chunk is S_PER positions swept in tiles of BLOCK_S × BLOCK_C. A channel's
statistics span the whole batch, which no program holds, so x is read twice forward (moments,
then the normalization) and dy and x twice backward (sums, then dx):

- forward: per-(n, j, c) moments (tile-wise corrected two-pass, tiles merged with Chan's formula
  in float64), merged per channel over (n, j) in a fixed order by a second kernel; a third
  normalizes.
- backward: per-(n, j, c) sums Σdy and Σdy·x̂, summed in order into dweight and dbias; then dx.

The tiling depends on (C, S) and the layout only, never on N, the device or an autotuner. No
atomics anywhere: bitwise deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import conform, empty_layout
from ._launch import on_device, rsqrt_rn
from .group_norm import strides

# Tiling (elements of a tile, tiles per chunk). Module constants so that tests can force several
# chunks per sample on small shapes.
TILE = 2048
TILES_PER_CHUNK = 4
MAX_BLOCK_C_LAST = 128  # channels per program, channels last (the contiguous axis)
MAX_BLOCK_S_FIRST = 1024  # positions per tile, channels first (the contiguous axis)
MERGE_BLOCK = 128  # channels per step of the merge and reduction kernels


@triton.jit
def _offsets(n, s, c, sxn, sxs, sxc):
    """64-bit element offsets of the (BLOCK_S, BLOCK_C) tile at positions s, channels c."""
    return (n.to(tl.int64) * sxn + s.to(tl.int64)[:, None] * sxs
            + c.to(tl.int64)[None, :] * sxc)


@triton.jit
def _program_chunk(C, S, S_PER, NSPLIT, BLOCK_C: tl.constexpr):
    """This program's sample n, channels c and their mask, and positions [s_lo, s_hi)."""
    pid = tl.program_id(0)
    n = pid // NSPLIT
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s_lo = (pid % NSPLIT) * S_PER
    return n, c, c < C, s_lo, tl.minimum(S, s_lo + S_PER)


@triton.jit
def _moments_kernel(X, PMEAN, PM2, C, S, sxn, sxc, sxs, S_PER, NSPLIT,
                    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Per (n, j, c): mean and M2 (float64) of x over the chunk's positions.

    Each tile's moments come from a corrected two-pass in the compute type ACC; the tiles are
    merged with Chan's formula in float64 (a few operations per tile and channel): a float32
    running mean would gain a rounding error per merge, which a mean far from zero (1e4 with
    unit spread) turns into visible gradient errors.
    """
    n, c, cmask, s_lo, s_hi = _program_chunk(C, S, S_PER, NSPLIT, BLOCK_C)
    mean = tl.zeros([BLOCK_C], tl.float64)
    m2 = tl.zeros([BLOCK_C], tl.float64)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < s_hi)[:, None] & cmask[None, :]
        x = tl.load(X + _offsets(n, s, c, sxn, sxs, sxc), mask, other=0.0).to(ACC)
        k = tl.minimum(s_hi - s0, BLOCK_S).to(tl.float64)
        prev = (s0 - s_lo).to(tl.float64)
        tmean = tl.sum(x, 0) / k.to(ACC)
        d = tl.where(mask, x - tmean[None, :], 0.0)
        sd = tl.sum(d, 0).to(tl.float64)
        tm2 = tl.sum(d * d, 0).to(tl.float64) - sd * sd / k
        f = k / (prev + k)
        delta = tmean.to(tl.float64) + sd / k - mean
        mean = mean + delta * f
        m2 = m2 + tm2 + delta * delta * prev * f
    out = tl.program_id(0).to(tl.int64) * C + c
    tl.store(PMEAN + out, mean, cmask)
    tl.store(PM2 + out, m2, cmask)


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


@triton.jit
def _channel_stats(MEAN, VAR, c, cmask, eps):
    """(mean, rstd) of channels c, rstd correctly rounded."""
    var = tl.load(VAR + c, cmask, other=0.0)
    return tl.load(MEAN + c, cmask, other=0.0), rsqrt_rn(var + eps, MEAN.dtype.element_ty)


@triton.jit
def _apply_kernel(X, Y, MEAN, VAR, W, B, C, S, sxn, sxc, sxs, eps, S_PER, NSPLIT,
                  BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = x·a + sh, a = rstd·w and sh = b − mean·a per channel."""
    n, c, cmask, s_lo, s_hi = _program_chunk(C, S, S_PER, NSPLIT, BLOCK_C)
    mean, rstd = _channel_stats(MEAN, VAR, c, cmask, eps)
    a = rstd * tl.load(W + c, cmask, other=0.0)
    sh = tl.load(B + c, cmask, other=0.0) - mean * a
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < s_hi)[:, None] & cmask[None, :]
        off = _offsets(n, s, c, sxn, sxs, sxc)
        x = tl.load(X + off, mask, other=0.0).to(mean.dtype)
        tl.store(Y + off, (x * a[None, :] + sh[None, :]).to(Y.dtype.element_ty), mask)


@triton.jit
def _grad_tile(DY, X, n, s, s_hi, c, cmask, mean, rstd, sxn, sxs, sxc):
    """Offsets, mask, x̂ and dy (in the statistics' dtype) of the tile at positions s < s_hi."""
    mask = (s < s_hi)[:, None] & cmask[None, :]
    off = _offsets(n, s, c, sxn, sxs, sxc)
    xh = (tl.load(X + off, mask, other=0.0).to(mean.dtype) - mean[None, :]) * rstd[None, :]
    return off, mask, xh, tl.load(DY + off, mask, other=0.0).to(mean.dtype)


@triton.jit
def _grad_sums_kernel(DY, X, MEAN, VAR, PSDY, PSDYX, C, S, sxn, sxc, sxs, eps, S_PER, NSPLIT,
                      BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per (n, j, c): Σdy and Σdy·x̂ over the chunk's positions."""
    n, c, cmask, s_lo, s_hi = _program_chunk(C, S, S_PER, NSPLIT, BLOCK_C)
    mean, rstd = _channel_stats(MEAN, VAR, c, cmask, eps)
    s1 = tl.zeros([BLOCK_C], mean.dtype)
    s2 = tl.zeros([BLOCK_C], mean.dtype)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        _, _, xh, g = _grad_tile(DY, X, n, s0 + tl.arange(0, BLOCK_S), s_hi, c, cmask, mean,
                                 rstd, sxn, sxs, sxc)
        s1 += tl.sum(g, 0)
        s2 += tl.sum(g * xh, 0)
    out = tl.program_id(0).to(tl.int64) * C + c
    tl.store(PSDY + out, s1, cmask)
    tl.store(PSDYX + out, s2, cmask)


@triton.jit
def _sum_parts_kernel(PARTS, OUT, P, C, BLOCK_C: tl.constexpr):
    """out[r, c] = Σ_p parts[r, p, c] over p = 0, 1, ... in order."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    acc = tl.zeros([BLOCK_C], OUT.dtype.element_ty)
    for p in range(P):
        acc += tl.load(PARTS + (r * P + p) * C + c, cmask, other=0.0)
    tl.store(OUT + r * C + c, acc, cmask)


@triton.jit
def _dx_kernel(DY, X, DX, MEAN, VAR, MG, MGX, W, C, S, sxn, sxc, sxs, eps, S_PER, NSPLIT,
               BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = rstd·(w·dy − mg − x̂·mgx), mg and mgx per channel."""
    n, c, cmask, s_lo, s_hi = _program_chunk(C, S, S_PER, NSPLIT, BLOCK_C)
    mean, rstd = _channel_stats(MEAN, VAR, c, cmask, eps)
    mg = tl.load(MG + c, cmask, other=0.0)
    mgx = tl.load(MGX + c, cmask, other=0.0)
    w = tl.load(W + c, cmask, other=0.0)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        off, mask, xh, g = _grad_tile(DY, X, n, s0 + tl.arange(0, BLOCK_S), s_hi, c, cmask,
                                      mean, rstd, sxn, sxs, sxc)
        dx = rstd[None, :] * (w[None, :] * g - mg[None, :] - xh * mgx[None, :])
        tl.store(DX + off, dx.to(DX.dtype.element_ty), mask)


# --- launchers ------------------------------------------------------------------------------------


def tiling(c: int, s: int, channels_last: bool) -> tuple[int, int, int, int]:
    """(BLOCK_S, BLOCK_C, S_PER, NSPLIT) from C, S and the layout: the contiguous axis gets the
    longer side of the tile."""
    if channels_last:
        block_c = min(triton.next_power_of_2(c), MAX_BLOCK_C_LAST)
        block_s = min(triton.next_power_of_2(s), max(1, TILE // block_c))
    else:
        block_s = min(triton.next_power_of_2(s), MAX_BLOCK_S_FIRST, TILE)
        block_c = min(triton.next_power_of_2(c), max(1, TILE // block_s))
    s_per = block_s * TILES_PER_CHUNK
    return block_s, block_c, s_per, triton.cdiv(s, s_per)


def _grid(x: torch.Tensor, tile) -> tuple[int, int]:
    n, c, _ = x.shape
    return n * tile[3], triton.cdiv(c, tile[1])


def _sum_parts(parts: torch.Tensor) -> torch.Tensor:
    """(R, P, C) -> (R, C), summing over P in order."""
    r, p, c = parts.shape
    out = torch.empty((r, c), dtype=parts.dtype, device=parts.device)
    _sum_parts_kernel[(r, triton.cdiv(c, MERGE_BLOCK))](parts, out, p, c, BLOCK_C=MERGE_BLOCK)
    return out


@on_device
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
    tile = tiling(c, s, channels_last)
    block_s, block_c, s_per, nsplit = tile
    if training:
        pmean = torch.empty((n, nsplit, c), dtype=torch.float64, device=x.device)
        pm2 = torch.empty_like(pmean)
        _moments_kernel[_grid(x, tile)](
            x, pmean, pm2, c, s, *strides(x), s_per, nsplit, BLOCK_S=block_s, BLOCK_C=block_c,
            ACC=tl.float64 if ct == torch.float64 else tl.float32,
        )
        _merge_channels_kernel[(triton.cdiv(c, MERGE_BLOCK),)](
            pmean, pm2, mean, var, c, s, n * nsplit, s_per, nsplit, BLOCK_C=MERGE_BLOCK,
        )
    _apply_kernel[_grid(x, tile)](
        x, y, mean, var, weight, bias, c, s, *strides(x), eps, s_per, nsplit,
        BLOCK_S=block_s, BLOCK_C=block_c,
    )
    return y, mean, var


@on_device
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
    block_s, block_c, s_per, nsplit = tile
    psdy = torch.empty((n, nsplit, c), dtype=mean.dtype, device=x.device)
    psdyx = torch.empty_like(psdy)
    _grad_sums_kernel[_grid(x, tile)](
        dy, x, mean, var, psdy, psdyx, c, s, *strides(x), eps, s_per, nsplit,
        BLOCK_S=block_s, BLOCK_C=block_c,
    )
    # per (n, c) over the chunks, then per c over the samples: both in order
    db = _sum_parts(_sum_parts(psdy).view(1, n, c)).view(c)
    dw = _sum_parts(_sum_parts(psdyx).view(1, n, c)).view(c)
    if training:  # the means over the channel of w·dy and w·dy·x̂
        mg, mgx = weight * db / (n * s), weight * dw / (n * s)
    else:  # running statistics are constants
        mg, mgx = torch.zeros_like(db), torch.zeros_like(dw)
    _dx_kernel[_grid(x, tile)](
        dy, x, dx, mean, var, mg, mgx, weight, c, s, *strides(x), eps, s_per, nsplit,
        BLOCK_S=block_s, BLOCK_C=block_c,
    )
    return dx, dw, db
