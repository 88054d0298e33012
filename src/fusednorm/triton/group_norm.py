"""GroupNorm and InstanceNorm in Triton, and the channel-statistics kernels BatchNorm shares.

The contract (arguments, outputs, numerics) is the one at the top of `cpu/group_norm.py`:

    group_norm_fwd(x, weight, bias, groups, eps, silu, channels_last) -> (y, mean, var)
    group_norm_bwd(dy, x, weight, bias, mean, var, groups, eps, silu, channels_last)
        -> (dx, dweight, dbias)

Every kernel sees x as (N, C, S) through three strides, so one set of kernels serves channels
first and channels last (a stride equal to 1 is specialised by Triton, which then vectorizes
along that axis), and GroupNorm, InstanceNorm and BatchNorm alike: a per-channel statistic is
found at `stats[n·SN + c // CG]` (GroupNorm SN = G, CG = C/G; BatchNorm SN = 0, CG = 1).

Work is cut into programs of (sample n, spatial chunk j, block of BLOCK_C channels); a chunk is
S_PER positions, swept in tiles of BLOCK_S × BLOCK_C. The tiling is a function of (C, S) and the
layout only, never of N, the device or an autotuner: results do not depend on the batch size.

- forward: per-(n, j, c) moments (tile-wise exact two-pass, tiles merged with Chan's formula),
  merged per group (or per channel) in a fixed order by a second kernel; a third normalizes.
- backward: per-(n, j, c) sums Σg and Σg·x̂; summed over j in order (the per-channel sums give
  dweight and dbias, summed over n in order); the per-group means of w·g and w·g·x̂; then dx.
No atomics anywhere: bitwise deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
def _moments_kernel(X, PMEAN, PM2, C, S, sxn, sxc, sxs, S_PER, NSPLIT,
                    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Per (n, j, c): mean and M2 (float64) of x over the chunk's positions.

    Each tile's moments come from a corrected two-pass in the compute type ACC; the tiles are
    merged with Chan's formula in float64 (a few operations per tile and channel): a float32
    running mean would gain a rounding error per merge, which a mean far from zero (1e4 with
    unit spread) turns into visible gradient errors.
    """
    pid = tl.program_id(0)
    n = pid // NSPLIT
    j = pid % NSPLIT
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    s_lo = j * S_PER
    s_hi = tl.minimum(S, s_lo + S_PER)
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
    out = pid.to(tl.int64) * C + c
    tl.store(PMEAN + out, mean, cmask)
    tl.store(PM2 + out, m2, cmask)


@triton.jit(do_not_specialize=["C", "S", "G", "CG", "S_PER", "NSPLIT"])
def _merge_groups_kernel(PMEAN, PM2, MEAN, VAR, C, S, G, CG, S_PER, NSPLIT,
                         BLOCK_C: tl.constexpr):
    """Per (n, g): the group's moments from its (j, c) pieces, merged in order of (j, c), in
    float64."""
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    zero = tl.zeros([1], tl.float64)
    mean = zero
    m2 = zero
    for j in range(NSPLIT):
        ks = tl.minimum(S_PER, S - j * S_PER).to(tl.float64)  # positions in this chunk
        for c0 in range(0, CG, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            cm = cc < CG
            idx = (n.to(tl.int64) * NSPLIT + j) * C + g * CG + cc
            pm = tl.load(PMEAN + idx, cm, other=0.0)
            pq = tl.load(PM2 + idx, cm, other=0.0)
            kc = tl.minimum(CG - c0, BLOCK_C).to(tl.float64)
            # these pieces all have ks elements: an exact two-pass over them
            vm = tl.sum(pm, 0) / kc
            dv = tl.where(cm, pm - vm, 0.0)
            vq = tl.sum(pq, 0) + ks * tl.sum(dv * dv, 0)
            k = kc * ks
            prev = (zero + j * S_PER) * CG + (zero + c0) * ks  # elements merged so far
            f = k / (prev + k)
            delta = vm - mean
            mean = mean + delta * f
            m2 = m2 + vq + delta * delta * prev * f
    one = tl.arange(0, 1)
    tl.store(MEAN + pid + one, mean.to(MEAN.dtype.element_ty))
    tl.store(VAR + pid + one, (m2 / (S.to(tl.float64) * CG)).to(VAR.dtype.element_ty))


@triton.jit
def _apply_kernel(X, Y, MEAN, VAR, W, B, C, S, sxn, sxc, sxs, SN, CG, eps, S_PER, NSPLIT,
                  BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, SILU: tl.constexpr):
    """y = silu?(x·a + sh), a = rstd·w and sh = b − mean·a per (n, c)."""
    pid = tl.program_id(0)
    n = pid // NSPLIT
    j = pid % NSPLIT
    acc_ty = MEAN.dtype.element_ty
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    si = n.to(tl.int64) * SN + c // CG
    mean = tl.load(MEAN + si, cmask, other=0.0)
    rstd = 1.0 / tl.sqrt(tl.load(VAR + si, cmask, other=0.0) + eps)
    a = rstd * tl.load(W + c, cmask, other=0.0)
    sh = tl.load(B + c, cmask, other=0.0) - mean * a
    s_lo = j * S_PER
    s_hi = tl.minimum(S, s_lo + S_PER)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < s_hi)[:, None] & cmask[None, :]
        off = _offsets(n, s, c, sxn, sxs, sxc)
        x = tl.load(X + off, mask, other=0.0).to(acc_ty)
        z = x * a[None, :] + sh[None, :]
        if SILU:
            z = z / (1.0 + tl.exp(-z))
        tl.store(Y + off, z.to(Y.dtype.element_ty), mask)


@triton.jit
def _grad_tile(DY, X, off, mask, mean, rstd, w, b, SILU: tl.constexpr):
    """(x̂, g) on a tile in the statistics' dtype; g = dy, or dy·silu'(z) with z = x̂·w + b
    recomputed."""
    x = tl.load(X + off, mask, other=0.0).to(mean.dtype)
    g = tl.load(DY + off, mask, other=0.0).to(mean.dtype)
    xh = (x - mean[None, :]) * rstd[None, :]
    if SILU:
        z = xh * w[None, :] + b[None, :]
        sig = 1.0 / (1.0 + tl.exp(-z))
        g = g * sig * (1.0 + z * (1.0 - sig))
    return xh, tl.where(mask, g, 0.0)


@triton.jit
def _grad_sums_kernel(DY, X, MEAN, VAR, W, B, PSDY, PSDYX, C, S, sxn, sxc, sxs, SN, CG, eps,
                      S_PER, NSPLIT, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                      SILU: tl.constexpr):
    """Per (n, j, c): Σ g and Σ g·x̂ over the chunk's positions."""
    pid = tl.program_id(0)
    n = pid // NSPLIT
    j = pid % NSPLIT
    acc_ty = MEAN.dtype.element_ty
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    si = n.to(tl.int64) * SN + c // CG
    mean = tl.load(MEAN + si, cmask, other=0.0)
    rstd = 1.0 / tl.sqrt(tl.load(VAR + si, cmask, other=0.0) + eps)
    w = tl.load(W + c, cmask, other=0.0)
    b = tl.load(B + c, cmask, other=0.0)
    s1 = tl.zeros([BLOCK_C], acc_ty)
    s2 = tl.zeros([BLOCK_C], acc_ty)
    s_lo = j * S_PER
    s_hi = tl.minimum(S, s_lo + S_PER)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < s_hi)[:, None] & cmask[None, :]
        off = _offsets(n, s, c, sxn, sxs, sxc)
        xh, g = _grad_tile(DY, X, off, mask, mean, rstd, w, b, SILU)
        s1 += tl.sum(g, 0)
        s2 += tl.sum(g * xh, 0)
    out = pid.to(tl.int64) * C + c
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


@triton.jit(do_not_specialize=["C", "G", "CG", "count"])
def _group_means_kernel(SDY, SDYX, W, MG, MGX, C, G, CG, count, BLOCK_C: tl.constexpr):
    """Per (n, g): the group means of w·g and w·g·x̂ from the per-(n, c) sums."""
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    acc_ty = MG.dtype.element_ty
    a1 = tl.zeros([1], acc_ty)
    a2 = tl.zeros([1], acc_ty)
    for c0 in range(0, CG, BLOCK_C):
        cc = g * CG + c0 + tl.arange(0, BLOCK_C)
        cm = c0 + tl.arange(0, BLOCK_C) < CG
        w = tl.load(W + cc, cm, other=0.0)
        a1 += tl.sum(w * tl.load(SDY + n.to(tl.int64) * C + cc, cm, other=0.0), 0)
        a2 += tl.sum(w * tl.load(SDYX + n.to(tl.int64) * C + cc, cm, other=0.0), 0)
    one = tl.arange(0, 1)
    tl.store(MG + pid + one, a1 / count.to(acc_ty))
    tl.store(MGX + pid + one, a2 / count.to(acc_ty))


@triton.jit
def _dx_kernel(DY, X, DX, MEAN, VAR, MG, MGX, W, B, C, S, sxn, sxc, sxs, SN, CG, eps, S_PER,
               NSPLIT, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, SILU: tl.constexpr):
    """dx = rstd·(w·g − mg − x̂·mgx), mg and mgx per statistic."""
    pid = tl.program_id(0)
    n = pid // NSPLIT
    j = pid % NSPLIT
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    si = n.to(tl.int64) * SN + c // CG
    mean = tl.load(MEAN + si, cmask, other=0.0)
    rstd = 1.0 / tl.sqrt(tl.load(VAR + si, cmask, other=0.0) + eps)
    mg = tl.load(MG + si, cmask, other=0.0)
    mgx = tl.load(MGX + si, cmask, other=0.0)
    w = tl.load(W + c, cmask, other=0.0)
    b = tl.load(B + c, cmask, other=0.0)
    s_lo = j * S_PER
    s_hi = tl.minimum(S, s_lo + S_PER)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < s_hi)[:, None] & cmask[None, :]
        off = _offsets(n, s, c, sxn, sxs, sxc)
        xh, g = _grad_tile(DY, X, off, mask, mean, rstd, w, b, SILU)
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


def strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(n, c, s) strides of an (N, C, S) tensor."""
    return x.stride(0), x.stride(1), x.stride(2)


def layout_strides(shape, channels_last: bool) -> tuple[int, int, int]:
    _, c, s = shape
    return (c * s, 1, c) if channels_last else (c * s, s, 1)


def conform(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """t (N, C, S) in the layout asked for (strides of size-1 dims do not matter)."""
    want = layout_strides(t.shape, channels_last)
    if all(a == b or size <= 1 for a, b, size in zip(t.stride(), want, t.shape)):
        return t
    return t.transpose(1, 2).contiguous().transpose(1, 2) if channels_last else t.contiguous()


def empty_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A new tensor of x's shape and dtype with the layout's exact strides (as the fake ops)."""
    return torch.empty_strided(x.shape, layout_strides(x.shape, channels_last), dtype=x.dtype,
                               device=x.device)


def moments(x: torch.Tensor, channels_last: bool, ct: torch.dtype):
    """Per-(n, chunk, c) moments in float64: (pmean, pm2, tiling)."""
    n, c, s = x.shape
    block_s, block_c, s_per, nsplit = tiling(c, s, channels_last)
    pmean = torch.empty((n, nsplit, c), dtype=torch.float64, device=x.device)
    pm2 = torch.empty_like(pmean)
    _moments_kernel[(n * nsplit, triton.cdiv(c, block_c))](
        x, pmean, pm2, c, s, *strides(x), s_per, nsplit, BLOCK_S=block_s, BLOCK_C=block_c,
        ACC=tl.float64 if ct == torch.float64 else tl.float32,
    )
    return pmean, pm2, (block_s, block_c, s_per, nsplit)


def apply(x, y, mean, var, weight, bias, sn, cg, eps, tile, silu):
    n, c, s = x.shape
    block_s, block_c, s_per, nsplit = tile
    _apply_kernel[(n * nsplit, triton.cdiv(c, block_c))](
        x, y, mean, var, weight, bias, c, s, *strides(x), sn, cg, eps, s_per, nsplit,
        BLOCK_S=block_s, BLOCK_C=block_c, SILU=silu,
    )


def grad_sums(dy, x, mean, var, weight, bias, sn, cg, eps, tile, silu):
    """Per-(n, c) sums Σg and Σg·x̂ (summed over the chunks in order)."""
    n, c, s = x.shape
    block_s, block_c, s_per, nsplit = tile
    psdy = torch.empty((n, nsplit, c), dtype=mean.dtype, device=x.device)
    psdyx = torch.empty_like(psdy)
    _grad_sums_kernel[(n * nsplit, triton.cdiv(c, block_c))](
        dy, x, mean, var, weight, bias, psdy, psdyx, c, s, *strides(x), sn, cg, eps, s_per,
        nsplit, BLOCK_S=block_s, BLOCK_C=block_c, SILU=silu,
    )
    return sum_parts(psdy), sum_parts(psdyx)


def sum_parts(parts: torch.Tensor) -> torch.Tensor:
    """(R, P, C) -> (R, C), summing over P in order."""
    r, p, c = parts.shape
    out = torch.empty((r, c), dtype=parts.dtype, device=parts.device)
    _sum_parts_kernel[(r, triton.cdiv(c, MERGE_BLOCK))](parts, out, p, c, BLOCK_C=MERGE_BLOCK)
    return out


def dx_apply(dy, x, dx, mean, var, mg, mgx, weight, bias, sn, cg, eps, tile, silu):
    n, c, s = x.shape
    block_s, block_c, s_per, nsplit = tile
    _dx_kernel[(n * nsplit, triton.cdiv(c, block_c))](
        dy, x, dx, mean, var, mg, mgx, weight, bias, c, s, *strides(x), sn, cg, eps, s_per,
        nsplit, BLOCK_S=block_s, BLOCK_C=block_c, SILU=silu,
    )


def group_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                   eps: float, silu: bool, channels_last: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = conform(x, channels_last)
    n, c, s = x.shape
    ct = weight.dtype
    y = empty_layout(x, channels_last)
    mean = torch.empty((n, groups), dtype=ct, device=x.device)
    var = torch.empty_like(mean)
    if x.numel() == 0:
        return y, mean.fill_(float("nan")), var.fill_(float("nan"))
    cg = c // groups
    pmean, pm2, tile = moments(x, channels_last, ct)
    _merge_groups_kernel[(n * groups,)](
        pmean, pm2, mean, var, c, s, groups, cg, tile[2], tile[3], BLOCK_C=MERGE_BLOCK,
    )
    apply(x, y, mean, var, weight, bias, groups, cg, eps, tile, silu)
    return y, mean, var


def group_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   mean: torch.Tensor, var: torch.Tensor, groups: int, eps: float, silu: bool,
                   channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = conform(x, channels_last)
    dy = conform(dy, channels_last)
    n, c, s = x.shape
    ct = weight.dtype
    dx = empty_layout(x, channels_last)
    if x.numel() == 0:
        return dx, torch.zeros_like(weight), torch.zeros_like(bias)
    cg = c // groups
    tile = tiling(c, s, channels_last)
    sdy, sdyx = grad_sums(dy, x, mean, var, weight, bias, groups, cg, eps, tile, silu)
    mg = torch.empty((n, groups), dtype=ct, device=x.device)
    mgx = torch.empty_like(mg)
    _group_means_kernel[(n * groups,)](sdy, sdyx, weight, mg, mgx, c, groups, cg, cg * s,
                                       BLOCK_C=MERGE_BLOCK)
    dx_apply(dy, x, dx, mean, var, mg, mgx, weight, bias, groups, cg, eps, tile, silu)
    dw = sum_parts(sdyx.view(1, n, c)).view(c)
    db = sum_parts(sdy.view(1, n, c)).view(c)
    return dx, dw, db
