"""GroupNorm and InstanceNorm in Triton.

The contract (arguments, outputs, numerics) is the one at the top of `cpu/group_norm.py`:

    group_norm_fwd(x, weight, bias, groups, eps, silu, channels_last) -> (y, mean, var)
    group_norm_bwd(dy, x, weight, bias, mean, var, groups, eps, silu, channels_last)
        -> (dx, dweight, dbias)

x is seen as (N, C, S) through three strides, so one set of kernels serves channels first and
channels last (a stride equal to 1 is specialised by Triton, which then vectorizes along that
axis). A program holds one tile of one sample in registers: BS positions × BC channels, the
channels of GT whole groups (CG = C/G each). x is read once forward, x and dy once backward:

- a group that fits in a tile (K = 1): its mean and variance come from an exact two-pass on the
  registers; a larger group is cut into K chunks of BS positions, whose sums (of x - x₀, x₀ the
  group's first element, and of squares around the chunk mean) the chunks exchange as the row
  norms' chunks do (`_launch.py`: cooperative on a GPU, the leader path in the interpreter) and
  merge with Chan's formula in chunk order.
- forward: y = silu?((x − mean)·a + b), a = rstd·w per channel.
- backward: program (sample block, channel block, chunk) walks the samples of its block: g = dy
  (dy·silu'(z), z recomputed), per group Σw·g and Σw·g·x̂ (exchanged between chunks), then
  dx = rstd·(w·g − mean(w·g) − x̂·mean(w·g·x̂)); per channel Σg·x̂ and Σg accumulate in registers
  into one float32 partial row of dweight/dbias per (sample block, chunk), which
  `sum_partial_rows` adds in order (the gradients are written directly when there is one).

The tiling is a function of (C, S, G), the layout and the pass only, never of N, the device or an
autotuner: a sample's results do not depend on the batch. No atomics in any sum: deterministic.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._layout import conform, empty_layout
from ._launch import (
    load_sums,
    merge_moments,
    on_device,
    publish,
    rsqrt_rn,
    slot,
    sum_partial_rows,
    sync_buffer,
    sync_flags,
    wait,
)

# Elements per tile (forward, backward: 16 and 8 per thread), channels per tile in channels-last
# layout (their contiguous axis), chunks per group at most. Module constants so that tests can
# force split groups on small shapes.
FWD_TILE, BWD_TILE, PER_WARP = 4096, 2048, 256
CL_CHANNELS = 32
MAX_CHUNKS = 64
# Backward: about three programs per SM of an H100, in sample blocks long enough that the
# float32 partial rows stay under PARTIAL_SHARE of the backward's bytes.
TARGET_PROGRAMS = 396
PARTIAL_SHARE = 0.05


@triton.jit
def _group_sum(t, member):
    """Per group of the tile ([GTP]) the sum of t ([BS, BC]) over its positions and channels."""
    return tl.sum(tl.where(member, tl.sum(t, axis=0)[None, :], 0.0), axis=1)


@triton.jit
def _per_channel(v, member):
    """A per-group value ([GTP]) spread over the tile's channels ([BC])."""
    return tl.sum(tl.where(member, v[:, None], 0.0), axis=0)


@triton.jit
def _tile_groups(tile_c, C, G, CG, GT, BC: tl.constexpr, GTP: tl.constexpr):
    """The channel block `tile_c`: its channels c, their validity, its groups, their validity,
    and member[j, i] = channel i belongs to group j."""
    gi = tl.arange(0, GTP)
    grp = tile_c * GT + gi
    grp_ok = (gi < GT) & (grp < G)
    ci = tl.arange(0, BC)
    c = tile_c * GT * CG + ci
    c_ok = (ci < GT * CG) & (c < C)
    member = ((ci // CG)[None, :] == gi[:, None]) & c_ok[None, :]
    return c, c_ok, grp, grp_ok, member


@triton.jit
def _store_group_sums(S1, S2, rows, grp_ok, k, K, x, mask, member, shift, S, CG,
                      BS: tl.constexpr):
    """Chunk k's sums per group: Σ(x - shift) and Σ(x - shift - chunk mean)², into S1, S2."""
    xs = tl.where(mask, x - _per_channel(shift, member)[None, :], 0.0)
    n_k = tl.minimum(S - k * BS, BS) * CG
    s1 = _group_sum(xs, member)
    d = tl.where(mask, xs - _per_channel(s1 / n_k, member)[None, :], 0.0)
    idx = rows.to(tl.int64) * K + k
    tl.store(S1 + idx, s1, mask=grp_ok)
    tl.store(S2 + idx, _group_sum(d * d, member), mask=grp_ok)


@triton.jit
def _fwd_kernel(X, W, B, Y, MEAN, VAR, S1, S2, SYNCBUF, C, S, sxn, sxc, sxs, G, CG, GT, NCB, K,
                eps, BS: tl.constexpr, BC: tl.constexpr, GTP: tl.constexpr, KP: tl.constexpr,
                SILU: tl.constexpr, SPLIT: tl.constexpr, LEADER: tl.constexpr,
                SYNC: tl.constexpr):
    """y for the tile (sample, channel block) of program `tile`, positions chunk k; (N·G, K)
    chunk sums S1, S2 when groups are split."""
    ct: tl.constexpr = MEAN.dtype.element_ty
    tile, k = slot(SYNCBUF, K, SYNC)
    n = tile // NCB
    c, c_ok, grp, grp_ok, member = _tile_groups(tile % NCB, C, G, CG, GT, BC, GTP)
    rows = n * G + grp  # the (sample, group) statistics
    s = k * BS + tl.arange(0, BS)
    mask = (s < S)[:, None] & c_ok[None, :]
    base = n.to(tl.int64) * sxn
    off = base + s.to(tl.int64)[:, None] * sxs + c.to(tl.int64)[None, :] * sxc
    x = tl.load(X + off, mask, other=0.0).to(ct)
    count = S * CG
    if SPLIT:
        # sums of x - x[n, first channel of g, 0]: a mean of 1e4 costs no precision
        shift = tl.load(X + base + (grp * CG).to(tl.int64) * sxc, grp_ok, other=0.0).to(ct)
        if LEADER:
            if k == 0:
                for kk in range(K):
                    ks = kk * BS + tl.arange(0, BS)
                    kmask = (ks < S)[:, None] & c_ok[None, :]
                    koff = base + ks.to(tl.int64)[:, None] * sxs + c.to(tl.int64)[None, :] * sxc
                    xk = tl.load(X + koff, kmask, other=0.0).to(ct)
                    _store_group_sums(S1, S2, rows, grp_ok, kk, K, xk, kmask, member, shift, S,
                                      CG, BS)
                if SYNC:
                    publish(SYNCBUF, rows, grp_ok, K)
        else:
            _store_group_sums(S1, S2, rows, grp_ok, k, K, x, mask, member, shift, S, CG, BS)
            publish(SYNCBUF, rows, grp_ok, 1)
        if SYNC:
            wait(SYNCBUF, rows, grp_ok, K)
        kc = tl.arange(0, KP)
        n_k = (tl.maximum(tl.minimum(S - kc * BS, BS), 1) * CG).to(ct)[None, :]
        mean, var = merge_moments(load_sums(S1, rows, grp_ok, K, KP),
                                  load_sums(S2, rows, grp_ok, K, KP), n_k, (kc < K)[None, :],
                                  count)
        mean += shift
    else:
        mean = _group_sum(x, member) / count
        d = tl.where(mask, x - _per_channel(mean, member)[None, :], 0.0)
        var = _group_sum(d * d, member) / count
    first = grp_ok & (tl.zeros([GTP], tl.int32) + k == 0)
    tl.store(MEAN + rows, mean.to(ct), mask=first)
    tl.store(VAR + rows, var.to(ct), mask=first)
    a = _per_channel(rsqrt_rn(var + eps, ct), member) * tl.load(W + c, c_ok, other=0.0)
    mean_c = _per_channel(mean, member)
    # x - mean first: exact for x near a large mean, where x·a - mean·a would cancel
    z = (x - mean_c[None, :]) * a[None, :] + tl.load(B + c, c_ok, other=0.0)[None, :]
    if SILU:
        z = z / (1.0 + tl.exp(-z))
    tl.store(Y + off, z.to(Y.dtype.element_ty), mask)


@triton.jit
def _grad_tile(DY, X, off, mask, mean, rstd, w, b, SILU: tl.constexpr):
    """(x̂, g) on a tile in the statistics' dtype; g = dy, or dy·silu'(z) with z = x̂·w + b
    recomputed. mean, rstd, w, b: per channel."""
    x = tl.load(X + off, mask, other=0.0).to(mean.dtype)
    g = tl.load(DY + off, mask, other=0.0).to(mean.dtype)
    xh = (x - mean[None, :]) * rstd[None, :]
    if SILU:
        z = xh * w[None, :] + b[None, :]
        sig = 1.0 / (1.0 + tl.exp(-z))
        g = g * sig * (1.0 + z * (1.0 - sig))
    return xh, tl.where(mask, g, 0.0)


@triton.jit
def _store_grad_sums(C1, C2, rows, grp_ok, k, K, sg, sgx, w, member):
    """Chunk k's Σw·g and Σw·g·x̂ per group (from the per-channel Σg, Σg·x̂) into C1, C2."""
    idx = rows.to(tl.int64) * K + k
    tl.store(C1 + idx, tl.sum(tl.where(member, (w * sg)[None, :], 0.0), axis=1), mask=grp_ok)
    tl.store(C2 + idx, tl.sum(tl.where(member, (w * sgx)[None, :], 0.0), axis=1), mask=grp_ok)


@triton.jit
def _bwd_kernel(DY, X, W, B, MEAN, VAR, DX, DW, DB, C1, C2, SYNCBUF, NS, C, S, sxn, sxc, sxs,
                G, CG, GT, NCB, K, eps, samples_per_program,
                BS: tl.constexpr, BC: tl.constexpr, GTP: tl.constexpr, KP: tl.constexpr,
                SILU: tl.constexpr, SPLIT: tl.constexpr, LEADER: tl.constexpr,
                SYNC: tl.constexpr):
    """dx for the samples of block tile // NCB, channel block tile % NCB, positions chunk k, and
    that (block, chunk)'s partial row of dweight/dbias over the block's channels (DW, DB: the
    gradients themselves when there is one partial row)."""
    ct: tl.constexpr = MEAN.dtype.element_ty
    tile, k = slot(SYNCBUF, K, SYNC)
    sb = tile // NCB
    c, c_ok, grp, grp_ok, member = _tile_groups(tile % NCB, C, G, CG, GT, BC, GTP)
    w = tl.load(W + c, c_ok, other=0.0)
    b = w  # the bias enters only SiLU's recomputed z
    if SILU:
        b = tl.load(B + c, c_ok, other=0.0)
    s = k * BS + tl.arange(0, BS)
    mask = (s < S)[:, None] & c_ok[None, :]
    soff = s.to(tl.int64)[:, None] * sxs + c.to(tl.int64)[None, :] * sxc
    count = S * CG
    dw_acc = tl.zeros([BC], ct)
    db_acc = tl.zeros([BC], ct)
    n_start = sb * samples_per_program
    for n in range(n_start, tl.minimum(n_start + samples_per_program, NS)):
        rows = n * G + grp
        mean = tl.load(MEAN + rows, grp_ok, other=0.0)
        rstd = rsqrt_rn(tl.load(VAR + rows, grp_ok, other=0.0) + eps, ct)
        mean_c, rstd_c = _per_channel(mean, member), _per_channel(rstd, member)
        base = tl.cast(n, tl.int64) * sxn
        xh, g = _grad_tile(DY, X, base + soff, mask, mean_c, rstd_c, w, b, SILU)
        sg, sgx = tl.sum(g, axis=0), tl.sum(g * xh, axis=0)
        if SPLIT:
            if LEADER:
                if k == 0:
                    for kk in range(K):
                        ks = kk * BS + tl.arange(0, BS)
                        kmask = (ks < S)[:, None] & c_ok[None, :]
                        koff = (base + ks.to(tl.int64)[:, None] * sxs
                                + c.to(tl.int64)[None, :] * sxc)
                        kxh, kg = _grad_tile(DY, X, koff, kmask, mean_c, rstd_c, w, b, SILU)
                        _store_grad_sums(C1, C2, rows, grp_ok, kk, K, tl.sum(kg, axis=0),
                                         tl.sum(kg * kxh, axis=0), w, member)
                    if SYNC:
                        publish(SYNCBUF, rows, grp_ok, K)
            else:
                _store_grad_sums(C1, C2, rows, grp_ok, k, K, sg, sgx, w, member)
                publish(SYNCBUF, rows, grp_ok, 1)
            if SYNC:
                wait(SYNCBUF, rows, grp_ok, K)
            t1 = tl.sum(load_sums(C1, rows, grp_ok, K, KP), axis=1)
            t2 = tl.sum(load_sums(C2, rows, grp_ok, K, KP), axis=1)
        else:
            t1 = tl.sum(tl.where(member, (w * sg)[None, :], 0.0), axis=1)
            t2 = tl.sum(tl.where(member, (w * sgx)[None, :], 0.0), axis=1)
        mg = _per_channel(t1 / count, member)
        mgx = _per_channel(t2 / count, member)
        dx = rstd_c[None, :] * (w[None, :] * g - mg[None, :] - xh * mgx[None, :])
        tl.store(DX + base + soff, dx.to(DX.dtype.element_ty), mask)
        dw_acc += sgx
        db_acc += sg
    part = (sb * K + k).to(tl.int64) * C + c
    tl.store(DW + part, dw_acc.to(DW.dtype.element_ty), mask=c_ok)
    tl.store(DB + part, db_acc.to(DB.dtype.element_ty), mask=c_ok)


# --- tiling and launchers -------------------------------------------------------------------------


class Tiling(NamedTuple):
    bs: int  # positions per tile (a power of two)
    bc: int  # channels per tile (GT whole groups, rounded up to a power of two)
    gt: int  # groups per tile
    k: int  # chunks of a group's positions
    num_warps: int

    @property
    def split(self) -> bool:
        return self.k > 1


def tiling(c: int, s: int, groups: int, channels_last: bool, tile: int) -> Tiling:
    """The tile of a sample, from (C, S, G), the layout and the tile size only: the contiguous
    axis gets the longer side; small groups are packed several to a tile, large ones split."""
    cg = c // groups
    p2 = triton.next_power_of_2
    if channels_last:
        gt = max(1, min(groups, CL_CHANNELS // cg))
        bc = p2(gt * cg)
        bs = min(p2(s), max(1, tile // bc))
    else:
        bs = min(p2(s), tile)
        gt = max(1, min(groups, tile // (bs * cg)))
        bc = p2(gt * cg)
        bs = min(bs, max(1, tile // bc))
    bs = max(bs, p2(triton.cdiv(s, MAX_CHUNKS)))
    return Tiling(bs, bc, gt, triton.cdiv(s, bs), min(32, max(1, bs * bc // PER_WARP)))


def strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(n, c, s) strides of an (N, C, S) tensor."""
    return x.stride(0), x.stride(1), x.stride(2)


def _flags(x: torch.Tensor, t: Tiling) -> dict:
    leader, sync = sync_flags(x.device, t.k) if t.split else (False, False)
    return {"BS": t.bs, "BC": t.bc, "GTP": triton.next_power_of_2(t.gt),
            "KP": triton.next_power_of_2(t.k), "SPLIT": t.split, "LEADER": leader, "SYNC": sync,
            "num_warps": t.num_warps, "num_stages": 1, "enable_fp_fusion": True}


@on_device
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
    t = tiling(c, s, groups, channels_last, FWD_TILE)
    ncb = triton.cdiv(groups, t.gt)
    flags = _flags(x, t)
    s1 = s2 = mean
    if t.split:
        s1 = torch.empty((n * groups, t.k), dtype=ct, device=x.device)
        s2 = torch.empty_like(s1)
    _fwd_kernel[(n * ncb, t.k)](
        x, weight, bias, y, mean, var, s1, s2,
        sync_buffer(x.device, n * groups, flags["SYNC"], mean), c, s, *strides(x), groups, c // groups, t.gt, ncb, t.k, eps, SILU=silu, **flags,
    )
    return y, mean, var


@on_device
def group_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   mean: torch.Tensor, var: torch.Tensor, groups: int, eps: float, silu: bool,
                   channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = conform(x, channels_last)
    dy = conform(dy, channels_last)
    n, c, s = x.shape
    ct = weight.dtype
    dx = empty_layout(x, channels_last)
    dw, db = torch.empty_like(weight), torch.empty_like(bias)
    if x.numel() == 0:
        return dx, dw.zero_(), db.zero_()
    t = tiling(c, s, groups, channels_last, BWD_TILE)
    ncb = triton.cdiv(groups, t.gt)
    flags = _flags(x, t)
    # sample blocks: a (block, chunk)'s partial row costs 2·4 bytes per channel twice; its
    # samples move t.bs·(|dy| + |x| + |dx|) bytes per channel
    row_bytes = t.bs * (dy.element_size() + x.element_size() + dx.element_size())
    min_samples = max(1, math.ceil(4 * ct.itemsize / (PARTIAL_SHARE * row_bytes)))
    blocks = max(1, min(triton.cdiv(TARGET_PROGRAMS, ncb * t.k), n // min_samples))
    per_block = triton.cdiv(n, blocks)
    blocks = triton.cdiv(n, per_block)
    parts = blocks * t.k
    pw = dw if parts == 1 else torch.empty((parts, c), dtype=ct, device=x.device)
    pb = db if parts == 1 else torch.empty((parts, c), dtype=ct, device=x.device)
    c1 = c2 = mean
    if t.split:
        c1 = torch.empty((n * groups, t.k), dtype=ct, device=x.device)
        c2 = torch.empty_like(c1)
    _bwd_kernel[(blocks * ncb, t.k)](
        dy, x, weight, bias, mean, var, dx, pw, pb, c1, c2,
        sync_buffer(x.device, n * groups, flags["SYNC"], mean), n, c, s, *strides(x), groups,
        c // groups, t.gt, ncb, t.k, eps, per_block, SILU=silu, **flags,
    )
    if parts > 1:
        sum_partial_rows(pw, pb, dw, db)
    return dx, dw, db
