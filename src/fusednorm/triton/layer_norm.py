"""Triton kernels for the row norms, LayerNorm and RMSNorm, forward and backward, with the
residual add and dropout fused in. The contract (arguments, outputs, numerics) is the one in
docs/DESIGN.md, "Kernel contract"; the autograd and torch.library layers live in row_norm.py.

Every configuration is a fixed function of N (forward) or of N and M (the backward's row blocks),
never of the device, of timing or of an autotuner, so kernels can be captured in CUDA graphs and
the forward is bitwise batch-invariant. Two paths, chosen from N:

- fused: the whole row sits in registers (N <= FWD_MAX_BLOCK forward, BWD_MAX_BLOCK backward,
  which also holds dy and two gradient accumulators). Narrow rows are packed ROWS to a program so
  that each program still moves a few KB. Exact two-pass mean/variance on the registers.
- split, for wider rows (no ceiling on N): a row is cut into K chunks of SPLIT_BLOCK, one program
  per (row, chunk), so even one row of 1M elements fills the GPU. A first kernel writes per-chunk
  sums (forward: Σh and Σ(h - chunk mean)², merged exactly by Chan's formula; backward: Σg·x̂ and
  Σg), the second re-reads its chunk and finishes. That costs one extra read of the row: Triton
  has no way to share one row between programs (quack uses thread-block clusters for it).

Backward dweight/dbias: the rows are cut into G contiguous blocks (G from M and N only, see
_bwd_grid); each program accumulates its block in float32 registers, writes one partial row, and
_sum_partials_kernel adds the G partial rows in a fixed order. No atomics: bitwise deterministic.

(Over 500 lines: the two paths' kernels share their device helpers, forward and backward share
the configuration, and splitting them would scatter one contract over several files.)
"""

from __future__ import annotations

import functools
import math
import struct
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

# Widest row (elements, a power of two) kept in registers; wider rows take the split path. Module
# constants rather than literals so that tests can force the split path on small shapes.
FWD_MAX_BLOCK = 16384
BWD_MAX_BLOCK = 8192
SPLIT_BLOCK = 4096  # chunk width of the split path
FWD_TILE, BWD_TILE = 4096, 2048  # elements per program for narrow rows (ROWS rows of BLOCK)
# Backward row blocks: at least ~256 programs, blocks of >= 16 rows once M is large (a partial
# row costs 8 bytes of traffic per column, so 16 rows keep it near 3% of the bf16 traffic), at
# most 1024 programs and 16 MiB of float32 partials (which then stay in L2 for the final sum).
# The final sum reads SUM_ROWS partial rows at a time.
SUM_ROWS = 32
BWD_MIN_PROGRAMS, BWD_MAX_PROGRAMS, BWD_BLOCK_ROWS, PARTIAL_BUDGET = 256, 1024, 16, 1 << 22
# FMA contraction stated rather than left to Triton's default, which changes in Triton 3.10
_OPTIONS = {"enable_fp_fusion": True}

_TL_DTYPE = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


# --- shared device helpers ---------------------------------------------------------------------


@triton.jit
def _keep(seed, idx, p):
    """Dropout keeps element idx = i*N + j (int64) iff its counter-based uniform is >= p."""
    return tl.rand(seed, idx) >= p


@triton.jit
def _rsqrt(v, COMPUTE: tl.constexpr):
    # correctly rounded: tl.rsqrt and tl.sqrt are approximations in float32
    if COMPUTE == tl.float64:
        return 1.0 / tl.sqrt(v)
    else:
        return tl.div_rn(1.0, tl.sqrt_rn(v))


@triton.jit
def _params(W, B, cols, col_ok, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
            ZERO_CENTERED: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    """The effective weight (1 + w for zero-centred weights, added in the compute type) and bias
    of the columns `cols`; 1 and 0 when absent."""
    w = tl.full([BLOCK], 1.0, COMPUTE)
    b = tl.zeros([BLOCK], COMPUTE)
    if HAS_W:  # 1 past the row's end too: from_output divides by it
        if ZERO_CENTERED:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(COMPUTE) + 1.0
        else:
            w = tl.load(W + cols, mask=col_ok, other=1.0).to(COMPUTE)
    if HAS_B:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(COMPUTE)
    return w, b


@triton.jit
def _load_h(X, R, H, rows64, cols, mask, stride_x, stride_r, N, seed, p, scale,
            HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_H: tl.constexpr,
            COMPUTE: tl.constexpr):
    """h = residual + dropout(x) on a (ROWS, BLOCK) tile, rounded to h's dtype when there is an
    h to return, so that the norm sees exactly the h that is returned."""
    h = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    if HAS_DROPOUT:
        # multiply by 0 rather than select it: a dropped inf or NaN gives NaN, as in torch
        h = h * tl.where(_keep(seed, rows64 * N + cols[None, :], p), scale, 0.0)
    if HAS_RESIDUAL:
        h += tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    if HAS_H:
        h = h.to(H.dtype.element_ty).to(COMPUTE)
    return h


@triton.jit
def _row_shift(X, R, H, rows64, row_ok, stride_x, stride_r, N, seed, p, scale,
               HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_H: tl.constexpr,
               COMPUTE: tl.constexpr):
    """h[row, 0] per row of the tile: the shift of the split path's LayerNorm sums."""
    h0 = _load_h(X, R, H, rows64, tl.zeros([1], tl.int32), row_ok[:, None], stride_x, stride_r,
                 N, seed, p, scale, HAS_RESIDUAL, HAS_DROPOUT, HAS_H, COMPUTE)
    return tl.sum(h0, axis=1)


@triton.jit
def _chunk_sums(h, mask, n, IS_RMS: tl.constexpr):
    """Per row of the tile: Σh² (RMS), or Σh and Σ(h - mean)² around this chunk's own mean
    (two passes over the registers, never E[h²] - E[h]²). n: the valid elements per row."""
    if IS_RMS:
        s1 = tl.sum(h * h, axis=1)
        s2 = s1
    else:
        s1 = tl.sum(h, axis=1)
        d = tl.where(mask, h - (s1 / n)[:, None], 0.0)
        s2 = tl.sum(d * d, axis=1)
    return s1, s2


@triton.jit
def _merge_sums(s1, s2, n_k, k_ok, N, eps, IS_RMS: tl.constexpr, COMPUTE: tl.constexpr):
    """(mean, rstd) per row from (ROWS, K) chunk sums: Chan's exact merge of the chunk means and
    squared deviations. For K = 1 it reduces bit for bit to the plain two-pass formulas."""
    if IS_RMS:
        rstd = _rsqrt(tl.sum(s1, axis=1) / N + eps, COMPUTE)
        mean = rstd  # unused
    else:
        mean = tl.sum(s1, axis=1) / N
        dev = s1 / n_k - mean[:, None]
        var = tl.sum(tl.where(k_ok, s2 + n_k * dev * dev, 0.0), axis=1) / N
        rstd = _rsqrt(var + eps, COMPUTE)
    return mean, rstd


@triton.jit
def _xhat_and_g(DY, HX, MEAN, RSTD, rows, rows64, cols, mask, row_ok, w, b, stride_dy, stride_h,
                IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                FROM_OUTPUT: tl.constexpr, COMPUTE: tl.constexpr):
    """dy, x̂ (0 outside the tile's valid part), g = dy·w_eff and rstd for a backward tile."""
    dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    hx = tl.load(HX + rows64 * stride_h + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    if FROM_OUTPUT:  # hx is the output y = x̂·w_eff + b
        xhat = hx
        if HAS_B:
            xhat = xhat - b[None, :]
        if HAS_W:
            xhat = xhat / w[None, :]
    elif IS_RMS:
        xhat = hx * rstd[:, None]
    else:
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        xhat = (hx - mean[:, None]) * rstd[:, None]
    xhat = tl.where(mask, xhat, 0.0)
    g = dy
    if HAS_W:
        g = dy * w[None, :]
    return dy, xhat, g, rstd


@triton.jit
def _load_chunk_sums(S, rows, row_ok, K, KP: tl.constexpr):
    """The (ROWS, KP) chunk sums S[row, k], zero beyond K."""
    ks = tl.arange(0, KP)
    ok = row_ok[:, None] & (ks < K)[None, :]
    return tl.load(S + rows.to(tl.int64)[:, None] * K + ks[None, :], mask=ok, other=0.0)


# --- forward -------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(X, R, W, B, Y, H, MEAN, RSTD, S1, S2,
                stride_x, stride_r, M, N, K, eps_hi, eps_lo, seed, p, scale_hi, scale_lo,
                ROWS: tl.constexpr, BLOCK: tl.constexpr, KP: tl.constexpr,
                IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_H: tl.constexpr,
                ZERO_CENTERED: tl.constexpr, ROUND_XHAT: tl.constexpr, XHAT: tl.constexpr,
                COMPUTE: tl.constexpr, SPLIT: tl.constexpr):
    """y = norm(h) on a (ROWS, BLOCK) tile. Grid (cdiv(M, ROWS), 1) fused; (M, K) split, where X
    is the already-stored h (or x) and S1, S2 hold the (M, K) chunk sums of _fwd_stats_kernel."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row_ok, col_ok = rows < M, cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]  # 64-bit offsets: tensors over 2^31 elements
    scale = tl.cast(scale_hi, COMPUTE) + tl.cast(scale_lo, COMPUTE)
    eps = tl.cast(eps_hi, COMPUTE) + tl.cast(eps_lo, COMPUTE)
    h = _load_h(X, R, H, rows64, cols, mask, stride_x, stride_r, N, seed, p, scale,
                HAS_RESIDUAL, HAS_DROPOUT, STORE_H, COMPUTE)
    if STORE_H:
        tl.store(H + rows64 * N + cols[None, :], h.to(H.dtype.element_ty), mask=mask)
    if SPLIT:
        ks = tl.arange(0, KP)
        n_k = tl.maximum(tl.minimum(N - ks * BLOCK, BLOCK), 1).to(COMPUTE)[None, :]
        s1 = _load_chunk_sums(S1, rows, row_ok, K, KP)
        s2 = _load_chunk_sums(S2, rows, row_ok, K, KP)
        mean, rstd = _merge_sums(s1, s2, n_k, (ks < K)[None, :], N, eps, IS_RMS, COMPUTE)
        if not IS_RMS:  # the chunk sums are of h - h[row, 0]
            mean += _row_shift(X, R, H, rows64, row_ok, stride_x, stride_r, N, seed, p, scale,
                               HAS_RESIDUAL, HAS_DROPOUT, STORE_H, COMPUTE)
    else:
        s1, s2 = _chunk_sums(h, mask, N, IS_RMS)
        mean, rstd = _merge_sums(s1[:, None], s2[:, None], N, True, N, eps, IS_RMS, COMPUTE)
    # every chunk of a row computes the same statistics; the first one stores them
    first = row_ok & (tl.zeros([ROWS], tl.int32) == tl.program_id(1))
    tl.store(RSTD + rows, rstd, mask=first)
    if IS_RMS:
        xhat = h * rstd[:, None]
    else:
        tl.store(MEAN + rows, mean, mask=first)
        xhat = (h - mean[:, None]) * rstd[:, None]
    if ROUND_XHAT:  # Llama/T5 cast order: x̂ back to the input dtype before the weight
        xhat = xhat.to(XHAT).to(COMPUTE)
    w, b = _params(W, B, cols, col_ok, HAS_W, HAS_B, ZERO_CENTERED, BLOCK, COMPUTE)
    y = xhat
    if HAS_W:
        y = y * w[None, :]
    if HAS_B:
        y = y + b[None, :]
    tl.store(Y + rows64 * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_stats_kernel(X, R, H, S1, S2, stride_x, stride_r, M, N, K, seed, p, scale_hi,
                      scale_lo, BLOCK: tl.constexpr, IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                      HAS_DROPOUT: tl.constexpr, STORE_H: tl.constexpr, COMPUTE: tl.constexpr):
    """Split path, grid (M, K): h for one chunk of a row (stored, rounded), and its sums."""
    rows = tl.program_id(0) + tl.arange(0, 1)
    k = tl.program_id(1)
    cols = k * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    scale = tl.cast(scale_hi, COMPUTE) + tl.cast(scale_lo, COMPUTE)
    h = _load_h(X, R, H, rows64, cols, mask, stride_x, stride_r, N, seed, p, scale,
                HAS_RESIDUAL, HAS_DROPOUT, STORE_H, COMPUTE)
    if STORE_H:
        tl.store(H + rows64 * N + cols[None, :], h.to(H.dtype.element_ty), mask=mask)
    if not IS_RMS:
        # sums of h - h[row, 0]: with a large row mean (1e4 ± 1) the chunk means would otherwise
        # carry float32 errors of 1e-3 into Chan's merge, which uses them to first order
        shift = _row_shift(X, R, H, rows64, row_ok, stride_x, stride_r, N, seed, p, scale,
                           HAS_RESIDUAL, HAS_DROPOUT, STORE_H, COMPUTE)
        h = tl.where(mask, h - shift[:, None], 0.0)
    s1, s2 = _chunk_sums(h, mask, tl.minimum(N - k * BLOCK, BLOCK), IS_RMS)
    idx = rows.to(tl.int64) * K + k
    tl.store(S1 + idx, s1, mask=row_ok)
    if not IS_RMS:
        tl.store(S2 + idx, s2, mask=row_ok)


# --- backward ------------------------------------------------------------------------------------


@triton.jit
def _bwd_stats_kernel(DY, HX, W, B, MEAN, RSTD, C1, C2, stride_dy, stride_h, M, N, K,
                      BLOCK: tl.constexpr, IS_RMS: tl.constexpr, HAS_W: tl.constexpr,
                      HAS_B: tl.constexpr, ZERO_CENTERED: tl.constexpr,
                      FROM_OUTPUT: tl.constexpr, COMPUTE: tl.constexpr):
    """Split path, grid (M, K): Σg·x̂ and Σg over one chunk of a row."""
    rows = tl.program_id(0) + tl.arange(0, 1)
    k = tl.program_id(1)
    cols = k * BLOCK + tl.arange(0, BLOCK)
    row_ok, col_ok = rows < M, cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    w, b = _params(W, B, cols, col_ok, HAS_W, HAS_B, ZERO_CENTERED, BLOCK, COMPUTE)
    _, xhat, g, _ = _xhat_and_g(DY, HX, MEAN, RSTD, rows, rows.to(tl.int64)[:, None], cols,
                                mask, row_ok, w, b, stride_dy, stride_h,
                                IS_RMS, HAS_W, HAS_B, FROM_OUTPUT, COMPUTE)
    idx = rows.to(tl.int64) * K + k
    tl.store(C1 + idx, tl.sum(g * xhat, axis=1), mask=row_ok)
    if not IS_RMS:
        tl.store(C2 + idx, tl.sum(g, axis=1), mask=row_ok)


@triton.jit
def _bwd_kernel(DY, HX, W, B, MEAN, RSTD, DH_OUT, DX, DRES, DW_PART, DB_PART, C1, C2,
                stride_dy, stride_h, stride_dho, M, N, K, rows_per_program, seed, p,
                scale_hi, scale_lo,
                ROWS: tl.constexpr, BLOCK: tl.constexpr, KP: tl.constexpr,
                IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                ZERO_CENTERED: tl.constexpr, FROM_OUTPUT: tl.constexpr,
                HAS_DH_OUT: tl.constexpr, STORE_DRES: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                DW_GRAD: tl.constexpr, DB_GRAD: tl.constexpr, COMPUTE: tl.constexpr,
                SPLIT: tl.constexpr):
    """dx (and dresidual) for the rows of block program_id(0), columns chunk program_id(1), and
    that block's dweight/dbias partial row. Grid (G, 1) fused; (G, K) split, where C1, C2 hold
    the (M, K) chunk sums of _bwd_stats_kernel."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < N
    w, b = _params(W, B, cols, col_ok, HAS_W, HAS_B, ZERO_CENTERED, BLOCK, COMPUTE)
    scale = tl.cast(scale_hi, COMPUTE) + tl.cast(scale_lo, COMPUTE)
    # (ROWS, BLOCK) accumulators, reduced over rows once at the end rather than every tile
    dw_acc = tl.zeros([ROWS, BLOCK], COMPUTE)
    db_acc = tl.zeros([ROWS, BLOCK], COMPUTE)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r0 in range(row_start, row_end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        dy, xhat, g, rstd = _xhat_and_g(DY, HX, MEAN, RSTD, rows, rows64, cols, mask, row_ok,
                                        w, b, stride_dy, stride_h,
                                        IS_RMS, HAS_W, HAS_B, FROM_OUTPUT, COMPUTE)
        if SPLIT:
            c1 = tl.sum(_load_chunk_sums(C1, rows, row_ok, K, KP), axis=1) / N
            c2 = tl.sum(_load_chunk_sums(C2, rows, row_ok, K, KP), axis=1) / N
        else:
            c1 = tl.sum(g * xhat, axis=1) / N
            c2 = tl.sum(g, axis=1) / N
        if IS_RMS:  # dh = rstd·(g - x̂·mean(g·x̂))
            dh = (g - xhat * c1[:, None]) * rstd[:, None]
        else:  # dh = rstd·(g - mean(g) - x̂·mean(g·x̂))
            dh = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DH_OUT:  # the gradient flowing into the returned h
            dh += tl.load(DH_OUT + rows64 * stride_dho + cols[None, :], mask=mask,
                          other=0.0).to(COMPUTE)
        out = rows64 * N + cols[None, :]
        if STORE_DRES:
            tl.store(DRES + out, dh.to(DRES.dtype.element_ty), mask=mask)
        if HAS_DROPOUT:  # the mask regenerated from (seed, i·N + j)
            dh = dh * tl.where(_keep(seed, out, p), scale, 0.0)
        tl.store(DX + out, dh.to(DX.dtype.element_ty), mask=mask)
        if DW_GRAD:
            dw_acc += dy * xhat
        if DB_GRAD:
            db_acc += dy
    part = pid.to(tl.int64) * N + cols
    if DW_GRAD:
        tl.store(DW_PART + part, tl.sum(dw_acc, axis=0), mask=col_ok)
    if DB_GRAD:
        tl.store(DB_PART + part, tl.sum(db_acc, axis=0), mask=col_ok)


@triton.jit
def _sum_partials_kernel(DW_PART, DB_PART, DW, DB, G, N, GB: tl.constexpr, RB: tl.constexpr,
                         DW_GRAD: tl.constexpr, DB_GRAD: tl.constexpr, COMPUTE: tl.constexpr):
    """dweight/dbias = the sum of the G partial rows, in a fixed order, for RB columns."""
    cols = tl.program_id(0) * RB + tl.arange(0, RB)
    col_ok = cols < N
    acc_w = tl.zeros([GB, RB], COMPUTE)
    acc_b = tl.zeros([GB, RB], COMPUTE)
    for g0 in range(0, G, GB):
        gs = g0 + tl.arange(0, GB)
        ok = (gs < G)[:, None] & col_ok[None, :]
        offs = gs.to(tl.int64)[:, None] * N + cols[None, :]
        if DW_GRAD:
            acc_w += tl.load(DW_PART + offs, mask=ok, other=0.0)
        if DB_GRAD:
            acc_b += tl.load(DB_PART + offs, mask=ok, other=0.0)
    if DW_GRAD:
        tl.store(DW + cols, tl.sum(acc_w, axis=0).to(DW.dtype.element_ty), mask=col_ok)
    if DB_GRAD:
        tl.store(DB + cols, tl.sum(acc_b, axis=0).to(DB.dtype.element_ty), mask=col_ok)


@triton.jit
def _keep_mask_kernel(MASK, N, seed, p, BLOCK: tl.constexpr):
    """Grid (M, cdiv(N, BLOCK)): the dropout keep mask, exactly as the kernels draw it."""
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    idx = tl.program_id(0).to(tl.int64) * N + cols
    tl.store(MASK + idx, _keep(seed, idx, p).to(tl.uint8), mask=cols < N)


# --- configuration: a fixed function of N (and M for the backward's row blocks) -----------------


class _Config(NamedTuple):
    split: bool
    block: int  # columns per program (a power of two)
    rows: int  # rows per tile
    k: int  # chunks per row (1 unless split)
    kp: int  # k rounded up to a power of two
    num_warps: int


@functools.cache
def _config(n: int, max_block: int, split_block: int, tile: int, per_warp: int) -> _Config:
    block = triton.next_power_of_2(n)
    if block <= max_block:
        split, rows, k = False, max(1, tile // block), 1
    else:
        split, block, rows, k = True, split_block, 1, triton.cdiv(n, split_block)
    # warps grow with the tile: per_warp elements per warp (16 per thread forward, 8 backward,
    # which also holds dy and the gradient accumulators) keep sm_90 below its register limit
    num_warps = min(32, max(1, rows * block // per_warp))
    return _Config(split, block, rows, k, triton.next_power_of_2(k), num_warps)


def _fwd_config(n: int) -> _Config:
    return _config(n, FWD_MAX_BLOCK, SPLIT_BLOCK, FWD_TILE, 512)


def _bwd_config(n: int) -> _Config:
    return _config(n, BWD_MAX_BLOCK, SPLIT_BLOCK, BWD_TILE, 256)


def _bwd_grid(m: int, n: int, rows: int, k: int) -> tuple[int, int]:
    """(G, rows per program): G contiguous blocks of rows, from M and N only."""
    limits = (BWD_MIN_PROGRAMS, BWD_MAX_PROGRAMS, BWD_BLOCK_ROWS, PARTIAL_BUDGET)
    return _row_blocks(m, n, rows, k, *limits)


@functools.lru_cache(maxsize=4096)
def _row_blocks(m: int, n: int, rows: int, k: int, min_programs: int, max_programs: int,
                block_rows: int, budget: int) -> tuple[int, int]:
    g = min(
        triton.cdiv(m, rows),
        max(triton.cdiv(min_programs, k), triton.cdiv(m, block_rows)),
        max(1, max_programs // k),
        max(1, budget // n),
    )
    per_program = triton.cdiv(triton.cdiv(m, g), rows) * rows
    return triton.cdiv(m, per_program), per_program


@functools.lru_cache(maxsize=64)
def _hi_lo(v: float) -> tuple[float, float]:
    """v as float32 hi + lo: Triton passes float scalars as float32; for float64 compute the
    kernels add the two back (about 48 bits)."""
    hi = struct.unpack("f", struct.pack("f", v))[0]
    return hi, v - hi


def _seed(seed: int) -> int:
    """The 64-bit seed as the int64 Triton passes (tl.rand reinterprets it as uint64)."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _scalar(v: float, compute: torch.dtype) -> tuple[float, float]:
    """v as the (hi, lo) pair of kernel arguments for the compute type."""
    return _hi_lo(v) if compute == torch.float64 else (v, 0.0)


def _dropout_scale(p: float) -> float:
    return 1.0 / (1.0 - p) if p < 1 else 0.0


def _unit_rows(t: Tensor | None) -> Tensor | None:
    # the contract promises unit inner stride; a cheap guard for direct callers
    if t is not None and t.dim() == 2 and t.shape[1] > 1 and t.stride(1) != 1:
        return t.contiguous()
    return t


def _on_device(fn):
    """Launch on the input's GPU (Triton launches on the current device), so cuda:1 works."""

    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        if first.is_cuda and first.device.index != torch.cuda.current_device():
            with torch.cuda.device(first.device):
                return fn(first, *args, **kwargs)
        return fn(first, *args, **kwargs)

    return wrapper


# --- launchers -----------------------------------------------------------------------------------


@_on_device
def norm_fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
             eps: float, is_rms: bool, zero_centered: bool, dropout_p: float, seed: int,
             out_dtype: torch.dtype, residual_dtype: torch.dtype | None,
             xhat_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalize the rows of x (M, N); returns (y, h, mean, rstd) as in docs/DESIGN.md."""
    x, residual = _unit_rows(x), _unit_rows(residual)
    m, n = x.shape
    dev = x.device
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    has_h = residual is not None or dropout_p > 0
    y = torch.empty((m, n), dtype=out_dtype, device=dev)
    h = torch.empty((m, n) if has_h else (0,), dtype=residual_dtype or x.dtype, device=dev)
    mean = torch.empty((0 if is_rms else m,), dtype=compute, device=dev)
    rstd = torch.empty((m,), dtype=compute, device=dev)
    if m == 0 or n == 0:
        mean.zero_()
        rstd.fill_(math.nan)  # torch's statistics of an empty row
        return y, h, mean, rstd
    cfg = _fwd_config(n)
    p, scale = float(dropout_p), _scalar(_dropout_scale(dropout_p), compute)
    eps = _scalar(eps, compute)
    seed = _seed(seed)
    r = x if residual is None else residual
    flags = {
        "IS_RMS": is_rms, "HAS_W": weight is not None, "HAS_B": bias is not None,
        "ZERO_CENTERED": zero_centered,
        "ROUND_XHAT": xhat_dtype is not None and xhat_dtype != compute,
        "XHAT": _TL_DTYPE[xhat_dtype or compute], "COMPUTE": _TL_DTYPE[compute],
        "BLOCK": cfg.block, "ROWS": cfg.rows, "KP": cfg.kp, "SPLIT": cfg.split,
        "num_warps": cfg.num_warps, **_OPTIONS,
    }  # fmt: skip
    w = x if weight is None else weight
    b = x if bias is None else bias
    mean_arg = rstd if is_rms else mean  # never read for RMSNorm
    if not cfg.split:
        _fwd_kernel[(triton.cdiv(m, cfg.rows), 1)](
            x, r, w, b, y, h if has_h else x, mean_arg, rstd, rstd, rstd,
            x.stride(0), r.stride(0), m, n, 1, *eps, seed, p, *scale,
            HAS_RESIDUAL=residual is not None, HAS_DROPOUT=dropout_p > 0, STORE_H=has_h,
            **flags,
        )  # fmt: skip
        return y, h, mean, rstd
    s1 = torch.empty((m, cfg.k), dtype=compute, device=dev)
    s2 = s1 if is_rms else torch.empty_like(s1)
    _fwd_stats_kernel[(m, cfg.k)](
        x, r, h if has_h else x, s1, s2, x.stride(0), r.stride(0), m, n, cfg.k, seed, p, *scale,
        BLOCK=cfg.block, IS_RMS=is_rms, HAS_RESIDUAL=residual is not None,
        HAS_DROPOUT=dropout_p > 0, STORE_H=has_h, COMPUTE=flags["COMPUTE"],
        num_warps=cfg.num_warps, **_OPTIONS,
    )  # fmt: skip
    src = h if has_h else x  # the second pass reads the stored h
    _fwd_kernel[(m, cfg.k)](
        src, src, w, b, y, src, mean_arg, rstd, s1, s2,
        src.stride(0), src.stride(0), m, n, cfg.k, *eps, seed, p, *scale,
        HAS_RESIDUAL=False, HAS_DROPOUT=False, STORE_H=False, **flags,
    )  # fmt: skip
    return y, h, mean, rstd


@_on_device
def norm_bwd(dy: Tensor, h: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
             rstd: Tensor, dh_out: Tensor | None, eps: float, is_rms: bool, zero_centered: bool,
             dropout_p: float, seed: int, has_residual: bool, x_dtype: torch.dtype,
             residual_dtype: torch.dtype | None, need_weight_grad: bool, from_output: bool = False
             ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Gradients (dx, dresidual, dweight, dbias) of `norm_fwd`, as in docs/DESIGN.md."""
    dy, h, dh_out = _unit_rows(dy), _unit_rows(h), _unit_rows(dh_out)
    m, n = dy.shape
    dev = dy.device
    compute = rstd.dtype
    dx = torch.empty((m, n), dtype=x_dtype, device=dev)
    dres = torch.empty((m, n) if has_residual else (0,), dtype=residual_dtype or x_dtype,
                       device=dev)
    dw_grad = need_weight_grad and weight is not None
    db_grad = need_weight_grad and bias is not None
    if m == 0 or n == 0:
        dw = torch.zeros(n, dtype=weight.dtype, device=dev) if dw_grad else None
        db = torch.zeros(n, dtype=bias.dtype, device=dev) if db_grad else None
        return dx, dres, dw, db
    cfg = _bwd_config(n)
    g, per_program = _bwd_grid(m, n, cfg.rows, cfg.k)
    p, scale = float(dropout_p), _scalar(_dropout_scale(dropout_p), compute)
    w = dy if weight is None else weight
    b = dy if bias is None else bias
    mean_arg = mean if mean.numel() else rstd  # never read for RMSNorm or from_output
    flags = {
        "IS_RMS": is_rms, "HAS_W": weight is not None, "HAS_B": bias is not None,
        "ZERO_CENTERED": zero_centered, "FROM_OUTPUT": from_output,
        "COMPUTE": _TL_DTYPE[compute], "BLOCK": cfg.block, "num_warps": cfg.num_warps,
        **_OPTIONS,
    }  # fmt: skip
    c1 = c2 = rstd
    if cfg.split:
        c1 = torch.empty((m, cfg.k), dtype=compute, device=dev)
        c2 = c1 if is_rms else torch.empty_like(c1)
        _bwd_stats_kernel[(m, cfg.k)](
            dy, h, w, b, mean_arg, rstd, c1, c2, dy.stride(0), h.stride(0), m, n, cfg.k,
            **flags,
        )  # fmt: skip
    dw_part = torch.empty((g, n), dtype=compute, device=dev) if dw_grad else rstd
    db_part = torch.empty((g, n), dtype=compute, device=dev) if db_grad else rstd
    dho = dy if dh_out is None else dh_out
    _bwd_kernel[(g, cfg.k)](
        dy, h, w, b, mean_arg, rstd, dho, dx, dres if has_residual else dx, dw_part, db_part,
        c1, c2, dy.stride(0), h.stride(0), dho.stride(0), m, n, cfg.k, per_program,
        _seed(seed), p, *scale,
        ROWS=cfg.rows, KP=cfg.kp, HAS_DH_OUT=dh_out is not None, STORE_DRES=has_residual,
        HAS_DROPOUT=dropout_p > 0, DW_GRAD=dw_grad, DB_GRAD=db_grad, SPLIT=cfg.split,
        num_stages=1, **flags,
    )  # fmt: skip
    dw = db = None
    if dw_grad or db_grad:
        dw = torch.empty(n, dtype=weight.dtype, device=dev) if dw_grad else None
        db = torch.empty(n, dtype=bias.dtype, device=dev) if db_grad else None
        rb = min(64, triton.next_power_of_2(n))  # narrow column blocks: many programs
        _sum_partials_kernel[(triton.cdiv(n, rb),)](
            dw_part, db_part, dw if dw_grad else dx, db if db_grad else dx, g, n,
            GB=SUM_ROWS, RB=rb, DW_GRAD=dw_grad, DB_GRAD=db_grad, COMPUTE=_TL_DTYPE[compute],
            num_warps=4, num_stages=1, **_OPTIONS,
        )  # fmt: skip
    return dx, dres, dw, db


def dropout_keep_mask(seed: int, M: int, N: int, p: float, device="cpu") -> Tensor:
    """The (M, N) bool mask of the elements the kernels keep for dropout probability p."""
    mask = torch.empty((M, N), dtype=torch.bool, device=device)
    if M * N == 0:
        return mask
    _launch_keep_mask(mask.view(torch.uint8), _seed(seed), float(p))
    return mask


@_on_device
def _launch_keep_mask(mask: Tensor, seed: int, p: float) -> None:
    m, n = mask.shape
    block = min(SPLIT_BLOCK, triton.next_power_of_2(n))
    _keep_mask_kernel[(m, triton.cdiv(n, block))](mask, n, seed, p, BLOCK=block, **_OPTIONS)
