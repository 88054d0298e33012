"""Triton kernels for the row norms, LayerNorm and RMSNorm, forward and backward, with the
residual add and dropout fused in. The contract (arguments, outputs, numerics) is the one in
docs/DESIGN.md, "Kernel contract"; the autograd and torch.library layers live in row_norm.py.

Every byte of x, the residual, dy and the saved input is read from memory once and every output
written once, for any N (tests/test_byte_traffic.py counts them under the interpreter). The
configuration is a fixed function of N and the dtypes (the backward's row blocks also of M),
never of timing or an autotuner: the kernels can be captured in CUDA graphs and the forward is
bitwise batch-invariant.

- Forward, a row that fits (N <= FWD_FUSED_MAX): ROWS rows per program, in registers; exact
  two-pass mean and variance on them. A wider row is cut into K chunks of BLOCK, one program
  each, which keeps its chunk in registers and exchanges the chunk sums with the row's other
  chunks (Σh and Σ(h - chunk mean)² of h - h[row, 0], merged in chunk order by Chan's formula).
- Backward, one launch: program (g, k) walks the rows of block g over column chunk k, reading dy
  and the saved input once, and accumulates its dweight/dbias columns in float32 registers; with
  K > 1 the row sums Σg·x̂ and Σg are exchanged like the forward's. Row blocks are at least
  `_min_rows` rows, so the float32 partial rows (one per block, added by sum_partial_rows in
  block order; none when G = 1) stay a few % of the bytes; the chunks give the GPU its programs.
  No atomics in any sum: bitwise deterministic.

How the chunks of a row exchange their sums, and which path a GPU takes: `_launch.py`. A GPU
runs the cooperative path (each chunk publishes, then waits for the others); Triton's
interpreter runs the leader path (chunk 0 computes all K chunks' sums and the others read them),
which gives the same bits.

(Over 500 lines: the paths share their device helpers, forward and backward share the
configuration, and splitting them would scatter one contract over several files.)
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

from .._checks import compute_dtype
from ._launch import (
    alignment,
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

# Widest row (elements, a power of two) one program holds whole, and the chunk width of wider
# rows. Module constants so that tests can force the split paths on small shapes.
FWD_FUSED_MAX = 8192
FWD_CHUNK = 8192
BWD_FUSED_MAX = 1024
BWD_CHUNK = 1024
MAX_CHUNKS = 64  # chunks widen beyond it: a GPU must hold a row's chunks at once
# Elements a program holds per tensor (ROWS rows of BLOCK), and per warp: 16 per thread forward
# (h, then y), 8 backward (dy, x̂, g and the output), which keeps sm_90 clear of spills.
FWD_TILE, FWD_PER_WARP = 4096, 512
BWD_TILE, BWD_PER_WARP = 2048, 256
# Backward: about three programs per SM of an H100, in row blocks long enough that the float32
# partial rows (written once, read once) stay under PARTIAL_SHARE of the backward's bytes.
TARGET_PROGRAMS = 396
PARTIAL_SHARE = 0.05
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
    """(mean, rstd) per row from (ROWS, K) chunk sums (merge_moments for LayerNorm)."""
    if IS_RMS:
        rstd = rsqrt_rn(tl.sum(s1, axis=1) / N + eps, COMPUTE)
        mean = rstd  # unused
    else:
        mean, var = merge_moments(s1, s2, n_k, k_ok, N)
        rstd = rsqrt_rn(var + eps, COMPUTE)
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
def _store_row_sums(S1, S2, rows, row_ok, k, K, h, mask, shift, N, BLOCK: tl.constexpr,
                    IS_RMS: tl.constexpr):
    """Chunk k's sums of the tile's rows (of h - shift for LayerNorm) into S1, S2[row, k]."""
    if not IS_RMS:
        h = tl.where(mask, h - shift[:, None], 0.0)
    s1, s2 = _chunk_sums(h, mask, tl.minimum(N - k * BLOCK, BLOCK), IS_RMS)
    idx = rows.to(tl.int64) * K + k
    tl.store(S1 + idx, s1, mask=row_ok)
    if not IS_RMS:
        tl.store(S2 + idx, s2, mask=row_ok)


@triton.jit
def _store_grad_sums(C1, C2, rows, row_ok, k, K, g, xhat, IS_RMS: tl.constexpr):
    """Chunk k's Σg·x̂ (and Σg for LayerNorm) of the tile's rows into C1, C2[row, k]."""
    idx = rows.to(tl.int64) * K + k
    tl.store(C1 + idx, tl.sum(g * xhat, axis=1), mask=row_ok)
    if not IS_RMS:
        tl.store(C2 + idx, tl.sum(g, axis=1), mask=row_ok)


# --- forward -------------------------------------------------------------------------------------


# (the row strides are never specialized: a stride of 1 would become a constant, and they are
# widened to 64 bits before they meet ALIGN)
@triton.jit(do_not_specialize=["sx", "sr"])
def _fwd_kernel(X, R, W, B, Y, H, MEAN, RSTD, S1, S2, SYNCBUF,
                sx, sr, M, n_al, K, eps_hi, eps_lo, seed, p, scale_hi, scale_lo,
                ROWS: tl.constexpr, BLOCK: tl.constexpr, KP: tl.constexpr, ALIGN: tl.constexpr,
                IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_H: tl.constexpr,
                ZERO_CENTERED: tl.constexpr, ROUND_XHAT: tl.constexpr, XHAT: tl.constexpr,
                COMPUTE: tl.constexpr, SPLIT: tl.constexpr, LEADER: tl.constexpr,
                SYNC: tl.constexpr):
    """y = norm(h) on a (ROWS, BLOCK) tile: rows tile·ROWS.., columns chunk k. One program per
    (tile, chunk); S1, S2 are the (M, K) chunk sums of a split row (SPLIT), SYNCBUF the ticket
    and arrival counters (SYNC). N and the row strides arrive divided by ALIGN."""
    N = n_al * ALIGN
    # 64 bits before the product: a stride past 2^31 elements arrives as one below, / ALIGN
    stride_x, stride_r = sx.to(tl.int64) * ALIGN, sr.to(tl.int64) * ALIGN
    tile, k = slot(SYNCBUF, K, SYNC)
    rows = tile * ROWS + tl.arange(0, ROWS)
    cols = k * BLOCK + tl.arange(0, BLOCK)
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
        # sums of h - h[row, 0]: with a large row mean (1e4 ± 1) the chunk means would otherwise
        # carry float32 errors of 1e-3 into Chan's merge, which uses them to first order
        shift = tl.zeros([ROWS], COMPUTE)
        if not IS_RMS:
            shift = _row_shift(X, R, H, rows64, row_ok, stride_x, stride_r, N, seed, p, scale,
                               HAS_RESIDUAL, HAS_DROPOUT, STORE_H, COMPUTE)
        if LEADER:
            if k == 0:
                for kk in range(K):
                    kcols = kk * BLOCK + tl.arange(0, BLOCK)
                    kmask = row_ok[:, None] & (kcols < N)[None, :]
                    hk = _load_h(X, R, H, rows64, kcols, kmask, stride_x, stride_r, N, seed, p,
                                 scale, HAS_RESIDUAL, HAS_DROPOUT, STORE_H, COMPUTE)
                    _store_row_sums(S1, S2, rows, row_ok, kk, K, hk, kmask, shift, N, BLOCK,
                                    IS_RMS)
                if SYNC:
                    publish(SYNCBUF, rows, row_ok, K)
        else:
            _store_row_sums(S1, S2, rows, row_ok, k, K, h, mask, shift, N, BLOCK, IS_RMS)
            publish(SYNCBUF, rows, row_ok, 1)
        if SYNC:
            wait(SYNCBUF, rows, row_ok, K)
        ks = tl.arange(0, KP)
        n_k = tl.maximum(tl.minimum(N - ks * BLOCK, BLOCK), 1).to(COMPUTE)[None, :]
        s1 = load_sums(S1, rows, row_ok, K, KP)
        s2 = load_sums(S2, rows, row_ok, K, KP)
        mean, rstd = _merge_sums(s1, s2, n_k, (ks < K)[None, :], N, eps, IS_RMS, COMPUTE)
        mean += shift
    else:
        s1, s2 = _chunk_sums(h, mask, N, IS_RMS)
        mean, rstd = _merge_sums(s1[:, None], s2[:, None], N, True, N, eps, IS_RMS, COMPUTE)
    # every chunk of a row computes the same statistics; the first one stores them
    first = row_ok & (tl.zeros([ROWS], tl.int32) + k == 0)
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


# --- backward ------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["sdy", "sh", "sdho"])
def _bwd_kernel(DY, HX, W, B, MEAN, RSTD, DH_OUT, DX, DRES, DW, DB, C1, C2, SYNCBUF,
                sdy, sh, sdho, M, n_al, K, rows_per_program, seed, p, scale_hi, scale_lo,
                ROWS: tl.constexpr, BLOCK: tl.constexpr, KP: tl.constexpr, ALIGN: tl.constexpr,
                IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                ZERO_CENTERED: tl.constexpr, FROM_OUTPUT: tl.constexpr,
                HAS_DH_OUT: tl.constexpr, STORE_DRES: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                DW_GRAD: tl.constexpr, DB_GRAD: tl.constexpr, COMPUTE: tl.constexpr,
                SPLIT: tl.constexpr, LEADER: tl.constexpr, SYNC: tl.constexpr):
    """dx (and dresidual) for the rows of block `blk`, columns chunk k, and that block's
    dweight/dbias row of those columns (DW, DB: the final gradients when there is one block,
    else (G, N) float32 partial rows). C1, C2: the (M, K) chunk sums of a split row."""
    N = n_al * ALIGN
    stride_dy = sdy.to(tl.int64) * ALIGN  # 64 bits before the product (see _fwd_kernel)
    stride_h, stride_dho = sh.to(tl.int64) * ALIGN, sdho.to(tl.int64) * ALIGN
    blk, k = slot(SYNCBUF, K, SYNC)
    cols = k * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < N
    # the bias only enters x̂ recomputed from the output
    w, b = _params(W, B, cols, col_ok, HAS_W, HAS_B and FROM_OUTPUT, ZERO_CENTERED, BLOCK,
                   COMPUTE)
    scale = tl.cast(scale_hi, COMPUTE) + tl.cast(scale_lo, COMPUTE)
    dw_acc = tl.zeros([BLOCK], COMPUTE)
    db_acc = tl.zeros([BLOCK], COMPUTE)
    row_start = blk * rows_per_program
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
            if LEADER:
                if k == 0:
                    for kk in range(K):
                        kcols = kk * BLOCK + tl.arange(0, BLOCK)
                        kok = kcols < N
                        kmask = row_ok[:, None] & kok[None, :]
                        wk, bk = _params(W, B, kcols, kok, HAS_W, HAS_B and FROM_OUTPUT,
                                         ZERO_CENTERED, BLOCK, COMPUTE)
                        _, xk, gk, _ = _xhat_and_g(DY, HX, MEAN, RSTD, rows, rows64, kcols,
                                                   kmask, row_ok, wk, bk, stride_dy, stride_h,
                                                   IS_RMS, HAS_W, HAS_B, FROM_OUTPUT, COMPUTE)
                        _store_grad_sums(C1, C2, rows, row_ok, kk, K, gk, xk, IS_RMS)
                    if SYNC:
                        publish(SYNCBUF, rows, row_ok, K)
            else:
                _store_grad_sums(C1, C2, rows, row_ok, k, K, g, xhat, IS_RMS)
                publish(SYNCBUF, rows, row_ok, 1)
            if SYNC:
                wait(SYNCBUF, rows, row_ok, K)
            c1 = tl.sum(load_sums(C1, rows, row_ok, K, KP), axis=1) / N
            c2 = c1
            if not IS_RMS:
                c2 = tl.sum(load_sums(C2, rows, row_ok, K, KP), axis=1) / N
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
            dw_acc += tl.sum(dy * xhat, axis=0)
        if DB_GRAD:
            db_acc += tl.sum(dy, axis=0)
    part = blk.to(tl.int64) * N + cols
    if DW_GRAD:
        tl.store(DW + part, dw_acc.to(DW.dtype.element_ty), mask=col_ok)
    if DB_GRAD:
        tl.store(DB + part, db_acc.to(DB.dtype.element_ty), mask=col_ok)


@triton.jit
def _keep_mask_kernel(MASK, N, seed, p, BLOCK: tl.constexpr):
    """Grid (M, cdiv(N, BLOCK)): the dropout keep mask, exactly as the kernels draw it."""
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    idx = tl.program_id(0).to(tl.int64) * N + cols
    tl.store(MASK + idx, _keep(seed, idx, p).to(tl.uint8), mask=cols < N)


# --- configuration: a fixed function of N (and M for the backward's row blocks) -----------------


class _Config(NamedTuple):
    split: bool  # k > 1
    block: int  # columns per program (a power of two)
    rows: int  # rows per tile
    k: int  # chunks per row
    kp: int  # k rounded up to a power of two
    num_warps: int


@functools.cache
def _config(n: int, fused_max: int, chunk: int, max_chunks: int, tile: int,
            per_warp: int) -> _Config:
    block = triton.next_power_of_2(n)
    if block > fused_max:
        block = max(chunk, triton.next_power_of_2(triton.cdiv(n, max_chunks)))
    k = triton.cdiv(n, block)
    rows = max(1, tile // block)
    num_warps = min(32, max(1, rows * block // per_warp))
    return _Config(k > 1, block, rows, k, triton.next_power_of_2(k), num_warps)


def _fwd_config(n: int) -> _Config:
    return _config(n, FWD_FUSED_MAX, FWD_CHUNK, MAX_CHUNKS, FWD_TILE, FWD_PER_WARP)


def _bwd_config(n: int) -> _Config:
    return _config(n, BWD_FUSED_MAX, BWD_CHUNK, MAX_CHUNKS, BWD_TILE, BWD_PER_WARP)


def _min_rows(partial_bytes: int, row_bytes: int) -> int:
    """Rows per block that keep a block's partial row (partial_bytes per column: written once,
    read once) under PARTIAL_SHARE of the bytes its rows move (row_bytes per column)."""
    return max(1, math.ceil(partial_bytes / (PARTIAL_SHARE * row_bytes)))


def _bwd_grid(m: int, cfg: _Config, min_rows: int) -> tuple[int, int]:
    """(G, rows per block): G blocks of contiguous rows, from M, N and the dtypes only."""
    g = max(1, min(triton.cdiv(TARGET_PROGRAMS, cfg.k), m // min_rows))
    per_block = triton.cdiv(triton.cdiv(m, g), cfg.rows) * cfg.rows
    return triton.cdiv(m, per_block), per_block


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


# --- launchers -----------------------------------------------------------------------------------


@on_device
def norm_fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
             eps: float, is_rms: bool, zero_centered: bool, dropout_p: float, seed: int,
             out_dtype: torch.dtype, residual_dtype: torch.dtype | None,
             xhat_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalize the rows of x (M, N); returns (y, h, mean, rstd) as in docs/DESIGN.md."""
    x, residual = _unit_rows(x), _unit_rows(residual)
    m, n = x.shape
    dev = x.device
    compute = compute_dtype(x.dtype)
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
    r = x if residual is None else residual
    align = alignment(n, x.stride(0), r.stride(0))
    leader, sync = sync_flags(dev, cfg.k) if cfg.split else (False, False)
    s1 = s2 = rstd
    if cfg.split:
        s1 = torch.empty((m, cfg.k), dtype=compute, device=dev)
        s2 = s1 if is_rms else torch.empty_like(s1)
    _fwd_kernel[(triton.cdiv(m, cfg.rows), cfg.k)](
        x, r, x if weight is None else weight, x if bias is None else bias, y,
        h if has_h else x, rstd if is_rms else mean, rstd, s1, s2,
        sync_buffer(dev, m, sync, rstd), x.stride(0) // align, r.stride(0) // align, m,
        n // align, cfg.k, *_scalar(eps, compute), _seed(seed), float(dropout_p),
        *_scalar(_dropout_scale(dropout_p), compute),
        ROWS=cfg.rows, BLOCK=cfg.block, KP=cfg.kp, ALIGN=align, IS_RMS=is_rms,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_RESIDUAL=residual is not None,
        HAS_DROPOUT=dropout_p > 0, STORE_H=has_h, ZERO_CENTERED=zero_centered,
        ROUND_XHAT=xhat_dtype is not None and xhat_dtype != compute,
        XHAT=_TL_DTYPE[xhat_dtype or compute], COMPUTE=_TL_DTYPE[compute], SPLIT=cfg.split,
        LEADER=leader, SYNC=sync, num_warps=cfg.num_warps, **_OPTIONS,
    )  # fmt: skip
    return y, h, mean, rstd


@on_device
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
    dw = torch.empty(n, dtype=weight.dtype, device=dev) if dw_grad else None
    db = torch.empty(n, dtype=bias.dtype, device=dev) if db_grad else None
    if m == 0 or n == 0:
        return dx, dres, dw if dw is None else dw.zero_(), db if db is None else db.zero_()
    cfg = _bwd_config(n)
    dho = dy if dh_out is None else dh_out
    row_bytes = (dy.element_size() + h.element_size() + dx.element_size()
                 + (dh_out is not None) * dho.element_size() + has_residual * dres.element_size())
    partial_bytes = 2 * torch.finfo(compute).bits // 8 * (dw_grad + db_grad)
    g, per_block = _bwd_grid(m, cfg, _min_rows(partial_bytes, row_bytes))
    align = alignment(n, dy.stride(0), h.stride(0), dho.stride(0))
    leader, sync = sync_flags(dev, cfg.k) if cfg.split else (False, False)
    c1 = c2 = rstd
    if cfg.split:
        c1 = torch.empty((m, cfg.k), dtype=compute, device=dev)
        c2 = c1 if is_rms else torch.empty_like(c1)
    # one block: its rows are all the rows, and it writes the gradients themselves
    dw_part = dw if g == 1 or not dw_grad else torch.empty((g, n), dtype=compute, device=dev)
    db_part = db if g == 1 or not db_grad else torch.empty((g, n), dtype=compute, device=dev)
    _bwd_kernel[(g, cfg.k)](
        dy, h, dy if weight is None else weight, dy if bias is None else bias,
        mean if mean.numel() else rstd, rstd, dho, dx, dres if has_residual else dx,
        dx if dw_part is None else dw_part, dx if db_part is None else db_part, c1, c2,
        sync_buffer(dev, m, sync, rstd), dy.stride(0) // align, h.stride(0) // align,
        dho.stride(0) // align, m, n // align, cfg.k, per_block, _seed(seed), float(dropout_p),
        *_scalar(_dropout_scale(dropout_p), compute),
        ROWS=cfg.rows, BLOCK=cfg.block, KP=cfg.kp, ALIGN=align, IS_RMS=is_rms,
        HAS_W=weight is not None, HAS_B=bias is not None, ZERO_CENTERED=zero_centered,
        FROM_OUTPUT=from_output, HAS_DH_OUT=dh_out is not None, STORE_DRES=has_residual,
        HAS_DROPOUT=dropout_p > 0, DW_GRAD=dw_grad, DB_GRAD=db_grad,
        COMPUTE=_TL_DTYPE[compute], SPLIT=cfg.split, LEADER=leader, SYNC=sync,
        num_warps=cfg.num_warps, num_stages=1, **_OPTIONS,
    )  # fmt: skip
    if g > 1 and (dw_grad or db_grad):
        sum_partial_rows(dw_part if dw_grad else None, db_part if db_grad else None, dw, db)
    return dx, dres, dw, db


def dropout_keep_mask(seed: int, M: int, N: int, p: float, device="cpu") -> Tensor:
    """The (M, N) bool mask of the elements the kernels keep for dropout probability p."""
    mask = torch.empty((M, N), dtype=torch.bool, device=device)
    if M * N == 0:
        return mask
    _launch_keep_mask(mask.view(torch.uint8), _seed(seed), float(p))
    return mask


@on_device
def _launch_keep_mask(mask: Tensor, seed: int, p: float) -> None:
    m, n = mask.shape
    block = min(FWD_TILE, triton.next_power_of_2(n))
    _keep_mask_kernel[(m, triton.cdiv(n, block))](mask, n, seed, p, BLOCK=block, **_OPTIONS)
