"""Row norms on the CPU in numba: LayerNorm and RMSNorm, with fused residual-add and dropout.

Implements the kernel contract of docs/DESIGN.md (`norm_fwd`, `norm_bwd`, `dropout_keep_mask`).

How the work is laid out, and why:
- Every tensor reaches a kernel as a flat 1-D view of the storage it spans plus a row stride, so
  strided, expanded (stride 0) and contiguous rows share one compiled specialization. Absent
  tensors are 1-element dummies with a flag; dtypes are kind codes (see `_dtypes`). A kernel is
  compiled once per combination of storage types actually used, and cached on disk.
- A row is normalized from a float buffer of the compute type (float32, float64 for float64):
  the input row itself when it is stored in that type, else a converted copy (half input, or h =
  residual + dropout(x) rounded to its storage type). The row is re-read from cache for the exact
  two-pass statistics.
- Only the reductions are compiled with reassociation (to let LLVM vectorize them); their order
  then depends on N alone, so a row's result never depends on M or on its position.
- The backward splits the rows into a number of blocks that depends on M only; each block sums
  its dweight/dbias rows in its own float row, and the blocks are added in order afterwards.

Over 500 lines because forward, backward and dropout share the row helpers; split across files,
the one op family would no longer read top to bottom.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange
from numba.extending import overload

from ._dtypes import (
    BF16,
    F16,
    NATIVE,
    as_flat_array,
    bf16_to_f32,
    f16_to_f32,
    f32_to_bf16,
    f32_to_f16,
    is_bits,
    load,
    load_row,
    store_row,
)

# Reassociation (and FMA contraction) for the row reductions only. Never nnan/ninf: NaN and inf
# rows must propagate as in torch.
_REDUCE = {"reassoc", "contract", "arcp"}
_FMA = {"contract"}  # elementwise loops: fused multiply-adds, no reordering
_XHAT_F32 = 3  # xhat rounding codes: 0 none, BF16, F16, or this (float32, for float64 compute)
_MAX_BLOCKS = 64  # row blocks of the backward: the weight-gradient partial rows

# Philox-4x32-10 constants, as in Triton's tl.rand (so the two backends draw the same mask).
_ROUND_A, _ROUND_B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_KEY_A, _KEY_B = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_M32, _SH32 = np.uint64(0xFFFFFFFF), np.uint64(32)


# --- dropout: a counter-based uniform, keyed on (seed, element index) ---------------------------


@njit(inline="always", cache=True, error_model="numpy")
def _uniform(seed_lo, seed_hi, idx):
    """Triton's `tl.rand(seed, idx)`: the first word of Philox on counter (idx, 0, 0, 0), as a
    float32 in [0, 1)."""
    c0, c1 = np.uint64(idx) & _M32, np.uint64(idx) >> _SH32
    c2, c3 = np.uint64(0), np.uint64(0)
    k0, k1 = np.uint64(seed_lo), np.uint64(seed_hi)
    for _ in range(10):
        p0, p2 = _ROUND_B * c2, _ROUND_A * c0  # 32 x 32 -> 64-bit products
        c0, c2 = (p0 >> _SH32) ^ c1 ^ k0, (p2 >> _SH32) ^ c3 ^ k1
        c1, c3 = p0 & _M32, p2 & _M32
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    # read as int32 and fold the negatives (x -> ~x), then scale below 1
    v = c0 if c0 < np.uint64(0x80000000) else _M32 - c0
    return np.float32(np.int64(v)) * np.float32(4.6566127342e-10)


@njit(cache=True, error_model="numpy")
def _dropout_row(buf, n, base, seed_lo, seed_hi, p, scale, zero):
    # multiply by 0 rather than assign it: a dropped inf or NaN gives NaN, as in torch
    for j in range(n):
        buf[j] *= scale if _uniform(seed_lo, seed_hi, base + j) >= p else zero


@njit(parallel=True, cache=True, error_model="numpy", nogil=True)
def _keep_mask_kernel(out, m, n, seed_lo, seed_hi, p):
    for i in prange(m):
        for j in range(n):
            out[i * n + j] = _uniform(seed_lo, seed_hi, i * n + j) >= p


# --- row helpers ---------------------------------------------------------------------------------


def _same_or(a, alt):
    """(a, True) when array a has alt's type (so it can be read or written in place), else
    (alt, False). Decided at compile time."""
    raise NotImplementedError


@overload(_same_or, inline="always")
def _same_or_impl(a, alt):
    if a == alt:
        return lambda a, alt: (a, True)
    return lambda a, alt: (alt, False)


# Helpers take rows as slices (a[o:o + n]) and index them from 0: numba wraps negative signed
# indices, so a[o + j] would compile to gathers instead of vector loads.


@njit(fastmath=_REDUCE, cache=True, error_model="numpy")
def _sum(a, n):
    s = a[0]
    for j in range(1, n):
        s += a[j]
    return s


@njit(fastmath=_REDUCE, cache=True, error_model="numpy")
def _sum_sq(a, n):
    s = a[0] * a[0]
    for j in range(1, n):
        s += a[j] * a[j]
    return s


@njit(fastmath=_REDUCE, cache=True, error_model="numpy")
def _dev_sums(a, n, mu):
    d = a[0] - mu
    s, ss = d, d * d
    for j in range(1, n):
        d = a[j] - mu
        s += d
        ss += d * d
    return s, ss


@njit(cache=True, error_model="numpy")
def _row_stats(a, n, cp, is_rms):
    """(mean, rstd) of the row a; cp holds the compute-type constants (see `_consts`)."""
    eps, inv_n, one, zero = cp[0], cp[1], cp[3], cp[4]
    if is_rms:
        return zero, one / np.sqrt(_sum_sq(a, n) * inv_n + eps)
    mu = _sum(a, n) * inv_n
    # Corrected two-pass: the deviations' own sum removes the rounding error of the first mean
    # (Chan, Golub & LeVeque), which matters for rows far from zero (mean 1e4 with unit spread).
    sd, ss = _dev_sums(a, n, mu)
    var = (ss - sd * inv_n * sd) * inv_n
    if var < zero:  # not max(): a NaN row must stay NaN
        var = zero
    elif np.isinf(ss):  # squares overflowed: the variance is inf (as in torch), not inf - inf
        var = ss
    return mu + sd * inv_n, one / np.sqrt(var + eps)


@njit(cache=True, error_model="numpy")
def _round_row(a, n, code):
    """Round the row a to the xhat dtype in place."""
    if code == BF16:
        for j in range(n):
            a[j] = bf16_to_f32(f32_to_bf16(a[j]))
    elif code == F16:
        for j in range(n):
            a[j] = f16_to_f32(f32_to_f16(a[j]))
    elif code == _XHAT_F32:
        for j in range(n):
            a[j] = np.float32(a[j])


def _normalize_store(a, n, mu, rs, weff, beff, y, yo, ykind):
    """y[yo:yo + n] = x̂·w_eff + b for the row a, rounded to y's storage type as it is stored."""
    raise NotImplementedError  # only callable from numba code


@overload(_normalize_store, jit_options={"fastmath": _FMA})
def _normalize_store_impl(a, n, mu, rs, weff, beff, y, yo, ykind):
    if is_bits(y):

        def impl(a, n, mu, rs, weff, beff, y, yo, ykind):
            d = y[yo : yo + n]
            if ykind == BF16:
                for j in range(n):
                    d[j] = f32_to_bf16((a[j] - mu) * rs * weff[j] + beff[j])
            else:
                for j in range(n):
                    d[j] = f32_to_f16((a[j] - mu) * rs * weff[j] + beff[j])

        return impl

    def native(a, n, mu, rs, weff, beff, y, yo, ykind):
        d = y[yo : yo + n]
        for j in range(n):
            d[j] = (a[j] - mu) * rs * weff[j] + beff[j]

    return native


@njit(cache=True, error_model="numpy")
def _normalize_xhat_row(a, n, mu, rs, weff, beff, xhat, dst):
    """dst = round(x̂)·w_eff + b, x̂ rounded to the xhat dtype first."""
    for j in range(n):
        dst[j] = (a[j] - mu) * rs
    _round_row(dst, n, xhat)
    for j in range(n):
        dst[j] = dst[j] * weff[j] + beff[j]


@njit(cache=True, error_model="numpy")
def _effective_params(w, wkind, has_w, b, bkind, has_b, zc, n, cp):
    """(w_eff, b) in the compute type: 1 + w for a zero-centred weight, 1 and 0 when absent."""
    one, zero = cp[3], cp[4]
    weff, beff = np.empty(n, cp.dtype), np.empty(n, cp.dtype)
    for j in range(n):
        weff[j] = load(w, j, wkind) if has_w else one
        if zc and has_w:
            weff[j] += one
        beff[j] = load(b, j, bkind) if has_b else zero
    return weff, beff


# --- forward -------------------------------------------------------------------------------------


@njit(parallel=True, cache=True, error_model="numpy", nogil=True)
def _fwd_kernel(
    x, sx, xkind, in_place, r, sr, rkind, has_r, w, wkind, has_w, b, bkind, has_b,
    y, ykind, h, hkind, has_h, mean, rstd, m, n, cp, is_rms, zc, p, seed_lo, seed_hi, xhat,
    nchunks,
):  # fmt: skip
    weff, beff = _effective_params(w, wkind, has_w, b, bkind, has_b, zc, n, cp)
    per = (m + nchunks - 1) // nchunks
    p32 = np.float32(p)
    for c in prange(nchunks):
        buf, tmp = np.empty(n, cp.dtype), np.empty(n, cp.dtype)
        x0, x_ok = _same_or(x, buf)  # x read in place when stored in the compute type
        for i in range(c * per, min(m, (c + 1) * per)):
            if in_place and x_ok:
                a = x0[i * sx : i * sx + n]
            else:
                # h = residual + dropout(x), rounded to its storage type before the norm
                load_row(x, i * sx, n, xkind, buf)
                if p > 0:
                    _dropout_row(buf, n, i * n, seed_lo, seed_hi, p32, cp[2], cp[4])
                if has_r:
                    load_row(r, i * sr, n, rkind, tmp)
                    for j in range(n):
                        buf[j] += tmp[j]
                if has_h:
                    store_row(h, i * n, n, hkind, buf)
                    load_row(h, i * n, n, hkind, buf)
                a = buf
            mu, rs = _row_stats(a, n, cp, is_rms)
            if not is_rms:
                mean[i] = mu
            rstd[i] = rs
            if xhat == 0:
                _normalize_store(a, n, mu, rs, weff, beff, y, i * n, ykind)
            else:
                _normalize_xhat_row(a, n, mu, rs, weff, beff, xhat, tmp)
                store_row(y, i * n, n, ykind, tmp)


# --- backward ------------------------------------------------------------------------------------


@njit(fastmath=_REDUCE, cache=True, error_model="numpy")
def _grad_pass(a, d, weff, mu, rs, n, xh):
    """One pass over the row: xh = x̂ = (a - mu)·rs and the sums (Σ g, Σ g·x̂), g = dy·w_eff."""
    x0 = (a[0] - mu) * rs
    xh[0] = x0
    g = d[0] * weff[0]
    sg, sgx = g, g * x0
    for j in range(1, n):
        xj = (a[j] - mu) * rs
        xh[j] = xj
        g = d[j] * weff[j]
        sg += g
        sgx += g * xj
    return sg, sgx


@njit(fastmath=_FMA, cache=True, error_model="numpy")
def _accumulate_weight_grads(d, xh, n, dw, db, need_db):
    # Kept apart from _grad_pass: LLVM vectorizes these loops behind run-time alias checks, one
    # per pair of arrays, and gives up past a handful of pairs.
    if need_db:
        for j in range(n):
            dw[j] += d[j] * xh[j]
            db[j] += d[j]
    else:
        for j in range(n):
            dw[j] += d[j] * xh[j]


def _dnorm_store(d, weff, xh, rs, mg, mgx, n, dst, do, kind):
    """dst[do:do + n] = rstd·(g - mean(g) - x̂·mean(g·x̂)), rounded to dst's storage type."""
    raise NotImplementedError  # only callable from numba code


@overload(_dnorm_store, jit_options={"fastmath": _FMA})
def _dnorm_store_impl(d, weff, xh, rs, mg, mgx, n, dst, do, kind):
    if is_bits(dst):

        def impl(d, weff, xh, rs, mg, mgx, n, dst, do, kind):
            o = dst[do : do + n]
            if kind == BF16:
                for j in range(n):
                    o[j] = f32_to_bf16(rs * (d[j] * weff[j] - mg - xh[j] * mgx))
            else:
                for j in range(n):
                    o[j] = f32_to_f16(rs * (d[j] * weff[j] - mg - xh[j] * mgx))

        return impl

    def native(d, weff, xh, rs, mg, mgx, n, dst, do, kind):
        o = dst[do : do + n]
        for j in range(n):
            o[j] = rs * (d[j] * weff[j] - mg - xh[j] * mgx)

    return native


@njit(parallel=True, cache=True, error_model="numpy", nogil=True)
def _bwd_kernel(
    dy, sdy, dykind, hs, shs, hskind, w, wkind, has_w, b, bkind, has_b, mean, rstd,
    dho, sdho, dhokind, has_dho, dx, dxkind, dr, drkind, has_dr, dwp, dbp, dw_out, db_out, acc,
    m, n, cp, is_rms, zc, p, seed_lo, seed_hi, from_output, nblocks,
):  # fmt: skip
    weff, beff = _effective_params(w, wkind, has_w, b, bkind, has_b, zc, n, cp)
    per = (m + nblocks - 1) // nblocks
    p32 = np.float32(p)
    inv_n, one, zero = cp[1], cp[3], cp[4]
    # dx goes straight to its output unless other terms are still to be added to dh
    plain = not (has_dho or has_dr or p > 0)
    for blk in prange(nblocks):
        xh, gb = np.empty(n, cp.dtype), np.empty(n, cp.dtype)
        tb, ob = np.empty(n, cp.dtype), np.empty(n, cp.dtype)
        dy0, dy_ok = _same_or(dy, gb)
        hs0, hs_ok = _same_or(hs, ob)
        dw_blk = dwp[blk * n : blk * n + n] if acc >= 1 else dwp
        db_blk = dbp[blk * n : blk * n + n] if acc == 2 else dbp
        if acc >= 1:  # zeroed here, by the thread that fills them, not by a torch op
            dw_blk[:] = zero
        if acc == 2:
            db_blk[:] = zero
        for i in range(blk * per, min(m, (blk + 1) * per)):
            if dy_ok:
                d = dy0[i * sdy : i * sdy + n]
            else:
                load_row(dy, i * sdy, n, dykind, gb)
                d = gb
            if hs_ok:
                a = hs0[i * shs : i * shs + n]
            else:
                load_row(hs, i * shs, n, hskind, ob)
                a = ob
            rs = rstd[i]
            if from_output:  # a is y: x̂ = (y - b) / w_eff, then taken as it is below
                for j in range(n):
                    tb[j] = (a[j] - beff[j]) / weff[j]
                sg, sgx = _grad_pass(tb, d, weff, zero, one, n, xh)
            else:
                mu = zero if is_rms else mean[i]
                sg, sgx = _grad_pass(a, d, weff, mu, rs, n, xh)
            if acc > 0:
                _accumulate_weight_grads(d, xh, n, dw_blk, db_blk, acc == 2)
            mg = zero if is_rms else sg * inv_n
            if plain:
                _dnorm_store(d, weff, xh, rs, mg, sgx * inv_n, n, dx, i * n, dxkind)
            else:
                _dnorm_store(d, weff, xh, rs, mg, sgx * inv_n, n, tb, 0, NATIVE)
                if has_dho:
                    load_row(dho, i * sdho, n, dhokind, ob)
                    for j in range(n):
                        tb[j] += ob[j]
                if has_dr:
                    store_row(dr, i * n, n, drkind, tb)
                if p > 0:
                    _dropout_row(tb, n, i * n, seed_lo, seed_hi, p32, cp[2], zero)
                store_row(dx, i * n, n, dxkind, tb)
    if acc >= 1:
        _sum_blocks(dwp, nblocks, n, dw_out)
    if acc == 2:
        _sum_blocks(dbp, nblocks, n, db_out)


@njit(cache=True, error_model="numpy")
def _sum_blocks(parts, nb, n, out):
    """out = Σ_k parts[k] over the nb partial rows, in the order k = 0, 1, ... (deterministic).

    Serial: it is small next to the kernel, and a second parallel region costs more than it saves.
    """
    for j in range(n):
        out[j] = parts[j]
    for k in range(1, nb):
        part = parts[k * n : k * n + n]
        for j in range(n):
            out[j] += part[j]


# --- launchers -----------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _consts(ct: torch.dtype, eps: float, n: int, p: float) -> np.ndarray:
    """Scalars in the compute type: eps, 1/N, the dropout scale 1/(1 - p), 1, 0."""
    scale = 1.0 / (1.0 - p) if p < 1 else 0.0
    np_dtype = np.float64 if ct == torch.float64 else np.float32
    return np.array([eps, 1.0 / max(n, 1), scale, 1.0, 0.0], dtype=np_dtype)


def _seed_words(seed: int) -> tuple[int, int]:
    seed &= (1 << 64) - 1
    return seed & 0xFFFFFFFF, seed >> 32


def _arg(t: torch.Tensor | None, dummy: np.ndarray) -> tuple[np.ndarray, int, bool]:
    """(flat array, kind, present) for a kernel argument; absent ones are 1-element dummies."""
    if t is None or t.numel() == 0:
        return dummy, NATIVE, False
    arr, kind = as_flat_array(t)
    return arr, kind, True


def _unit_rows(t: torch.Tensor | None) -> torch.Tensor | None:
    # the contract promises unit inner stride; a cheap guard for direct callers
    if t is not None and t.dim() == 2 and t.shape[1] > 1 and t.stride(1) != 1:
        return t.contiguous()
    return t


_DUMMIES: dict[torch.dtype, np.ndarray] = {}


def _dummy_like(t: torch.Tensor) -> np.ndarray:
    """A 1-element array of t's storage type, so that absent arguments add no specialization.
    Kernels never write to it."""
    if t.dtype not in _DUMMIES:
        _DUMMIES[t.dtype] = as_flat_array(torch.zeros(1, dtype=t.dtype))[0]
    return _DUMMIES[t.dtype]


def _xhat_code(xhat_dtype: torch.dtype | None, ct: torch.dtype) -> int:
    if xhat_dtype is None or xhat_dtype == ct:
        return 0
    return {torch.bfloat16: BF16, torch.float16: F16, torch.float32: _XHAT_F32}[xhat_dtype]


def norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    is_rms: bool,
    zero_centered: bool,
    dropout_p: float,
    seed: int,
    out_dtype: torch.dtype,
    residual_dtype: torch.dtype | None,
    xhat_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalize the rows of x (M, N); returns (y, h, mean, rstd) as in docs/DESIGN.md."""
    x, residual = _unit_rows(x), _unit_rows(residual)
    m, n = x.shape
    ct = _compute_dtype(x.dtype)
    has_h = residual is not None or dropout_p > 0
    h_dtype = residual_dtype or x.dtype
    y = torch.empty((m, n), dtype=out_dtype)
    h = torch.empty((m, n) if has_h else (0,), dtype=h_dtype)
    mean = torch.empty(0 if is_rms else m, dtype=ct)
    rstd = torch.empty(m, dtype=ct)
    if m == 0 or n == 0:
        mean.zero_()
        rstd.fill_(float("nan"))  # torch's statistics of an empty row
        return y, h, mean, rstd
    dummy = _dummy_like(x)
    xa, xkind, _ = _arg(x, dummy)
    ra, rkind, has_r = _arg(residual, dummy)
    wa, wkind, has_w = _arg(weight, dummy)
    ba, bkind, has_b = _arg(bias, dummy)
    ya, ykind, _ = _arg(y, dummy)
    ha, hkind, _ = _arg(h, dummy)
    rstd_a = as_flat_array(rstd)[0]
    mean_a = rstd_a if is_rms else as_flat_array(mean)[0]
    seed_lo, seed_hi = _seed_words(seed)
    _fwd_kernel(
        xa, x.stride(0), xkind, not has_h, ra, residual.stride(0) if has_r else 0, rkind, has_r,
        wa, wkind, has_w, ba, bkind, has_b, ya, ykind, ha, hkind, has_h, mean_a, rstd_a,
        m, n, _consts(ct, eps, n, dropout_p), is_rms, zero_centered, float(dropout_p),
        seed_lo, seed_hi, _xhat_code(xhat_dtype, ct), min(m, numba.get_num_threads()),
    )  # fmt: skip
    return y, h, mean, rstd


def norm_bwd(
    dy: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dh_out: torch.Tensor | None,
    eps: float,
    is_rms: bool,
    zero_centered: bool,
    dropout_p: float,
    seed: int,
    has_residual: bool,
    x_dtype: torch.dtype,
    residual_dtype: torch.dtype | None,
    need_weight_grad: bool,
    from_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dx, dresidual, dweight, dbias) of `norm_fwd`, as in docs/DESIGN.md."""
    dy, h, dh_out = _unit_rows(dy), _unit_rows(h), _unit_rows(dh_out)
    m, n = dy.shape
    ct = rstd.dtype
    dx = torch.empty((m, n), dtype=x_dtype)
    dr_dtype = residual_dtype or x_dtype
    dres = torch.empty((m, n) if has_residual else (0,), dtype=dr_dtype)
    need_dw = need_weight_grad and weight is not None
    need_db = need_weight_grad and bias is not None
    # acc: 0 no weight gradients, 1 dweight, 2 dweight and dbias (a bias without a weight gets a
    # scratch dweight: rare enough not to deserve its own loop)
    acc = 2 if need_db else int(need_dw)
    nblocks = min(m, _MAX_BLOCKS)  # depends on M only: the weight gradients' summation order
    parts = (nblocks, n) if acc else (1,)
    dwp, dbp = torch.empty(parts, dtype=ct), torch.empty(parts if acc == 2 else (1,), dtype=ct)
    dw = torch.zeros(n if acc else 1, dtype=ct)  # zeros: the result when M == 0
    db = torch.zeros(n if acc == 2 else 1, dtype=ct)
    if m > 0 and n > 0:
        dummy = _dummy_like(dy)
        dya, dykind, _ = _arg(dy, dummy)
        ha, hkind, _ = _arg(h, dummy)
        wa, wkind, has_w = _arg(weight, dummy)
        ba, bkind, has_b = _arg(bias, dummy)
        oa, okind, has_o = _arg(dh_out, dummy)
        dxa, dxkind, _ = _arg(dx, dummy)
        dra, drkind, _ = _arg(dres, dummy)
        rstd_a = as_flat_array(rstd)[0]
        mean_a = as_flat_array(mean)[0] if mean.numel() else rstd_a
        seed_lo, seed_hi = _seed_words(seed)
        _bwd_kernel(
            dya, dy.stride(0), dykind, ha, h.stride(0), hkind, wa, wkind, has_w, ba, bkind,
            has_b, mean_a, rstd_a, oa, dh_out.stride(0) if has_o else 0, okind, has_o,
            dxa, dxkind, dra, drkind, has_residual, as_flat_array(dwp)[0],
            as_flat_array(dbp)[0], dw.numpy(), db.numpy(), acc, m, n,
            _consts(ct, eps, n, dropout_p), is_rms, zero_centered, float(dropout_p),
            seed_lo, seed_hi, from_output, nblocks,
        )  # fmt: skip
    dweight = dw.to(weight.dtype) if need_dw else None
    dbias = db.to(bias.dtype) if need_db else None
    return dx, dres, dweight, dbias


def dropout_keep_mask(seed: int, M: int, N: int, p: float, device="cpu") -> torch.Tensor:
    """The (M, N) bool mask of the elements the kernels keep for dropout probability p."""
    out = torch.empty((M, N), dtype=torch.bool)
    if M * N:
        seed_lo, seed_hi = _seed_words(seed)
        _keep_mask_kernel(out.numpy().reshape(-1), M, N, seed_lo, seed_hi, np.float32(p))
    return out.to(device)
