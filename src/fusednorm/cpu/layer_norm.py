"""Row norms on the CPU in numba: LayerNorm and RMSNorm, with fused residual-add and dropout.

Implements the kernel contract of docs/DESIGN.md (`norm_fwd`, `norm_bwd`, `dropout_keep_mask`).

How the work is laid out, and why:
- Every tensor reaches a kernel as its address, the element count it spans and a tag (a cached
  1-element array of its storage type), plus a row stride; the kernel makes the flat 1-D view
  (`from_address`). So strided, expanded (stride 0) and contiguous rows share one compiled
  specialization, and a call builds no numpy view (each cost microseconds: small calls are
  dominated by such wrapper work). Absent tensors are flagged and point at a tag; dtypes are kind
  codes (see `_dtypes`). A kernel is compiled once per combination of storage types actually
  used, and cached on disk.
- Calls under `_SERIAL_MAX` elements run the serial twin of each kernel (`_launch.serial_twin`:
  the same body without the parallel-region launch) on the same row blocks, so the choice never
  changes a bit of the result.
- Scratch rows and parameter rows are used through unowned views (`_unowned`): references
  taken on owned arrays are atomic operations, which cost more than short rows' arithmetic.
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
    bf16_to_f32,
    f16_to_f32,
    f32_to_bf16,
    f32_to_f16,
    from_address,
    is_bits,
    load,
    load_row,
    store_row,
)
from ._launch import TAG_ADDR, TAGS, serial_twin

# Reassociation (and FMA contraction) for the row reductions only. Never nnan/ninf: NaN and inf
# rows must propagate as in torch.
_REDUCE = {"reassoc", "contract", "arcp"}
_FMA = {"contract"}  # elementwise loops: fused multiply-adds, no reordering
_XHAT_F32 = 3  # xhat rounding codes: 0 none, BF16, F16, or this (float32, for float64 compute)
_MAX_BLOCKS = 64  # row blocks of the backward: the weight-gradient partial rows
_PARTIAL_ELEMENTS = 1 << 18  # ... and the elements of those partial rows, beyond 8 blocks

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


@njit(inline="always", cache=True, error_model="numpy")
def _unowned(a, off, n):
    """a[off:off + n] as a view that holds no reference to a's memory.

    Every reference taken on an owned array (a slice, a row assigned to a variable) is an atomic
    increment and decrement: at short rows they cost more than the row's arithmetic. Views of
    scratch and parameter rows are taken this way. The owner must outlive the view: an argument
    of the function does; a local array is kept by `_keep` after the loops. (Not in the parallel
    kernels: their statement reordering could move that use.)"""
    return from_address(a.ctypes.data + off * a.itemsize, n, a)


@njit(inline="always", cache=True, error_model="numpy")
def _keep(a):
    # a use of the owner after the views' last use: numba frees an array after its last use
    a[0] = a[0]


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
    return _row_stats_from(a, n, cp, is_rms, _sum_sq(a, n) if is_rms else _sum(a, n))


@njit(cache=True, error_model="numpy")
def _row_stats_from(a, n, cp, is_rms, s):
    """`_row_stats` given s, the row's Σa (Σa² for RMSNorm)."""
    eps, inv_n, one, zero = cp[0], cp[1], cp[3], cp[4]
    if is_rms:
        return zero, one / np.sqrt(s * inv_n + eps)
    mu = s * inv_n
    # Corrected two-pass: the deviations' own sum removes the rounding error of the first mean
    # (Chan, Golub & LeVeque), which matters for rows far from zero (mean 1e4 with unit spread).
    sd, ss = _dev_sums(a, n, mu)
    var = (ss - sd * inv_n * sd) * inv_n
    if var < zero:  # not max(): a NaN row must stay NaN
        var = zero
    elif np.isinf(ss):  # squares overflowed: the variance is inf (as in torch), not inf - inf
        var = ss
    return mu + sd * inv_n, one / np.sqrt(var + eps)


def _load_row_sum(src, off, n, kind, dst, sq):
    """`load_row`, returning the row's Σ (Σ of squares when sq) in the same pass."""
    raise NotImplementedError  # only callable from numba code


@overload(_load_row_sum, jit_options={"fastmath": _REDUCE})
def _load_row_sum_impl(src, off, n, kind, dst, sq):
    # One pass instead of two over the row; the order of the sum depends on N only, as `_sum`'s.
    if is_bits(src):

        def impl(src, off, n, kind, dst, sq):
            s = src[off : off + n]
            if kind != BF16:  # float16: the slow path, not fused
                for j in range(n):
                    dst[j] = f16_to_f32(s[j])
                return _sum_sq(dst, n) if sq else _sum(dst, n)
            v = bf16_to_f32(s[0])
            dst[0] = v
            if sq:
                acc = v * v
                for j in range(1, n):
                    v = bf16_to_f32(s[j])
                    dst[j] = v
                    acc += v * v
            else:
                acc = v
                for j in range(1, n):
                    v = bf16_to_f32(s[j])
                    dst[j] = v
                    acc += v
            return acc

        return impl

    def native(src, off, n, kind, dst, sq):
        load_row(src, off, n, kind, dst)
        return _sum_sq(dst, n) if sq else _sum(dst, n)

    return native


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
    """[w_eff, b] (2N) in the compute type: 1 + w for a zero-centred weight, 1 and 0 when
    absent."""
    one, zero = cp[3], cp[4]
    wb = np.empty(2 * n, cp.dtype)
    for j in range(n):
        wb[j] = load(w, j, wkind) if has_w else one
        if zc and has_w:
            wb[j] += one
        wb[n + j] = load(b, j, bkind) if has_b else zero
    return wb


# --- forward -------------------------------------------------------------------------------------


@njit(cache=True, error_model="numpy")
def _fwd_rows(
    x, sx, xkind, in_place, r, sr, rkind, has_r, y, ykind, h, hkind, has_h, mean, rstd,
    wb, lo, hi, n, cp, is_rms, p, seed_lo, seed_hi, xhat,
):  # fmt: skip
    """Rows lo..hi-1 of the forward. Both kernels below call this one compiled function, so a
    row's result is bitwise the same whichever runs it."""
    p32 = np.float32(p)
    weff, beff = _unowned(wb, 0, n), _unowned(wb, n, n)  # wb, an argument, outlives them
    scratch = np.empty(2 * n, cp.dtype)
    buf, tmp = _unowned(scratch, 0, n), _unowned(scratch, n, n)
    x0, x_ok = _same_or(x, buf)  # x read in place when stored in the compute type
    for i in range(lo, hi):
        if in_place and x_ok:
            a = x0[i * sx : i * sx + n]
            mu, rs = _row_stats(a, n, cp, is_rms)
        elif in_place:  # converted on load, the first sum taken in the same pass
            a = buf
            mu, rs = _row_stats_from(a, n, cp, is_rms, _load_row_sum(x, i * sx, n, xkind, a, is_rms))
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
    _keep(scratch)


# The kernels take every tensor as (address, element count, tag): see `from_address`.


@njit(parallel=True, cache=True, error_model="numpy", nogil=True)
def _fwd_kernel(
    xp, xlen, xt, sx, xkind, in_place, rp, rlen, rt, sr, rkind, has_r, wp, wt, wkind, has_w,
    bp, bt, bkind, has_b, yp, yt, ykind, hp, ht, hkind, has_h, meanp, rstdp, m, n, cp, is_rms,
    zc, p, seed_lo, seed_hi, xhat, nchunks,
):  # fmt: skip
    x, r = from_address(xp, xlen, xt), from_address(rp, rlen, rt)
    w, b = from_address(wp, n if has_w else 1, wt), from_address(bp, n if has_b else 1, bt)
    y, h = from_address(yp, m * n, yt), from_address(hp, m * n if has_h else 1, ht)
    mean, rstd = from_address(meanp, 1 if is_rms else m, cp), from_address(rstdp, m, cp)
    wb = _effective_params(w, wkind, has_w, b, bkind, has_b, zc, n, cp)
    per = (m + nchunks - 1) // nchunks
    for c in prange(nchunks):
        _fwd_rows(
            x, sx, xkind, in_place, r, sr, rkind, has_r, y, ykind, h, hkind, has_h, mean, rstd,
            wb, c * per, min(m, (c + 1) * per), n, cp, is_rms, p, seed_lo, seed_hi, xhat,
        )  # fmt: skip


_fwd_kernel_serial = serial_twin(_fwd_kernel)


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


@njit(cache=True, error_model="numpy")
def _bwd_block(
    dy, sdy, dykind, hs, shs, hskind, mean, rstd, dho, sdho, dhokind, has_dho, dx, dxkind,
    dr, drkind, has_dr, dwp, dbp, acc, wb, blk, lo, hi, n, cp, is_rms, p, seed_lo, seed_hi,
    from_output,
):  # fmt: skip
    """Rows lo..hi-1 of the backward, summing their weight gradients into partial row blk. Both
    kernels below call this one compiled function (bitwise the same results)."""
    p32 = np.float32(p)
    inv_n, one, zero = cp[1], cp[3], cp[4]
    # dx goes straight to its output unless other terms are still to be added to dh
    plain = not (has_dho or has_dr or p > 0)
    weff, beff = _unowned(wb, 0, n), _unowned(wb, n, n)  # wb, an argument, outlives them
    scratch = np.empty(4 * n, cp.dtype)
    xh, gb = _unowned(scratch, 0, n), _unowned(scratch, n, n)
    tb, ob = _unowned(scratch, 2 * n, n), _unowned(scratch, 3 * n, n)
    dy0, dy_ok = _same_or(dy, gb)
    hs0, hs_ok = _same_or(hs, ob)
    dw_blk = dwp[blk * n : blk * n + n] if acc >= 1 else dwp
    db_blk = dbp[blk * n : blk * n + n] if acc == 2 else dbp
    if acc >= 1:  # zeroed here, by the thread that fills them, not by a torch op
        dw_blk[:] = zero
    if acc == 2:
        db_blk[:] = zero
    for i in range(lo, hi):
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
    _keep(scratch)


@njit(parallel=True, cache=True, error_model="numpy", nogil=True)
def _bwd_kernel(
    dyp, dylen, dyt, sdy, dykind, hsp, hslen, hst, shs, hskind, wp, wt, wkind, has_w, bp, bt,
    bkind, has_b, meanp, rstdp, dhop, dholen, dhot, sdho, dhokind, has_dho, dxp, dxt, dxkind,
    drp, drt, drkind, has_dr, dwpp, dbpp, dwop, dbop, acc, m, n, cp, is_rms, zc, p, seed_lo,
    seed_hi, from_output, nblocks,
):  # fmt: skip
    dy, hs = from_address(dyp, dylen, dyt), from_address(hsp, hslen, hst)
    w, b = from_address(wp, n if has_w else 1, wt), from_address(bp, n if has_b else 1, bt)
    mean = from_address(meanp, m if (not is_rms and not from_output) else 1, cp)
    rstd, dho = from_address(rstdp, m, cp), from_address(dhop, dholen, dhot)
    dx, dr = from_address(dxp, m * n, dxt), from_address(drp, m * n if has_dr else 1, drt)
    dwp = from_address(dwpp, nblocks * n if acc >= 1 else 1, cp)
    dbp = from_address(dbpp, nblocks * n if acc == 2 else 1, cp)
    wb = _effective_params(w, wkind, has_w, b, bkind, has_b, zc, n, cp)
    per = (m + nblocks - 1) // nblocks
    for blk in prange(nblocks):
        _bwd_block(
            dy, sdy, dykind, hs, shs, hskind, mean, rstd, dho, sdho, dhokind, has_dho, dx,
            dxkind, dr, drkind, has_dr, dwp, dbp, acc, wb, blk, blk * per,
            min(m, (blk + 1) * per), n, cp, is_rms, p, seed_lo, seed_hi, from_output,
        )  # fmt: skip
    if acc >= 1:
        _sum_blocks(dwp, nblocks, n, from_address(dwop, n, cp))
    if acc == 2:
        _sum_blocks(dbp, nblocks, n, from_address(dbop, n, cp))


_bwd_kernel_serial = serial_twin(_bwd_kernel)


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


_CONSTS: dict[tuple, np.ndarray] = {}


def _consts(ct: torch.dtype, eps: float, n: int, p: float) -> np.ndarray:
    """Scalars in the compute type: eps, 1/N, the dropout scale 1/(1 - p), 1, 0 (cached; the
    kernels only read them)."""
    key = (ct, eps, n, p)
    cp = _CONSTS.get(key)
    if cp is None:
        scale = 1.0 / (1.0 - p) if p < 1 else 0.0
        np_dtype = np.float64 if ct == torch.float64 else np.float32
        cp = np.array([eps, 1.0 / max(n, 1), scale, 1.0, 0.0], dtype=np_dtype)
        if len(_CONSTS) >= 1024:
            _CONSTS.clear()
        _CONSTS[key] = cp
    return cp


def _seed_words(seed: int) -> tuple[int, int]:
    seed &= (1 << 64) - 1
    return seed & 0xFFFFFFFF, seed >> 32


def _unit_rows(t: torch.Tensor | None) -> torch.Tensor | None:
    # the contract promises unit inner stride; a cheap guard for direct callers
    if t is not None and t.dim() == 2 and t.shape[1] > 1 and t.stride(1) != 1:
        return t.contiguous()
    return t


def _param(t: torch.Tensor | None) -> torch.Tensor | None:
    # weight and bias: contiguous (N,) by the contract; a cheap guard for direct callers
    if t is not None and t.numel() > 1 and t.stride(-1) != 1:
        return t.contiguous()
    return t


_SERIAL_MAX = 1 << 15  # up to this many elements a call runs serially (no parallel region)


def _rows_arg(t: torch.Tensor | None, absent: torch.dtype):
    """(address, element span, tag, kind, present) of an (M, N) argument with unit inner stride."""
    if t is None or t.numel() == 0:
        tag = TAGS[absent][0]
        return TAG_ADDR[absent], 1, tag, NATIVE, False
    m, n = t.shape
    tag, kind = TAGS[t.dtype]
    return t.data_ptr(), (m - 1) * t.stride(0) + n, tag, kind, True


def _vec_arg(t: torch.Tensor | None, absent: torch.dtype):
    """(address, tag, kind, present) of a contiguous argument (weight, bias, outputs)."""
    if t is None or t.numel() == 0:
        return TAG_ADDR[absent], TAGS[absent][0], NATIVE, False
    tag, kind = TAGS[t.dtype]
    return t.data_ptr(), tag, kind, True


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _xhat_code(xhat_dtype: torch.dtype | None, ct: torch.dtype) -> int:
    if xhat_dtype is None or xhat_dtype == ct:
        return 0
    return {torch.bfloat16: BF16, torch.float16: F16, torch.float32: _XHAT_F32}[xhat_dtype]


def _workers(m: int, n: int) -> int:
    """Parallel chunks for a call: 1 (the serial kernel) for small calls. Only the speed
    depends on it: a row's result is the same either way."""
    if m * n <= _SERIAL_MAX:
        return 1
    return min(m, numba.get_num_threads())


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
    weight, bias = _param(weight), _param(bias)
    m, n = x.shape
    xdt = x.dtype
    ct = torch.float64 if xdt == torch.float64 else torch.float32
    has_h = residual is not None or dropout_p > 0
    y = torch.empty((m, n), dtype=out_dtype)
    h = torch.empty((m, n) if has_h else (0,), dtype=residual_dtype or xdt)
    mean = torch.empty(0 if is_rms else m, dtype=ct)
    rstd = torch.empty(m, dtype=ct)
    if m == 0 or n == 0:
        mean.zero_()
        rstd.fill_(float("nan"))  # torch's statistics of an empty row
        return y, h, mean, rstd
    xp, xlen, xt, xkind, _ = _rows_arg(x, xdt)
    rp, rlen, rt, rkind, has_r = _rows_arg(residual, xdt)
    wp, wt, wkind, has_w = _vec_arg(weight, xdt)
    bp, bt, bkind, has_b = _vec_arg(bias, xdt)
    yt, ykind = TAGS[out_dtype]
    hp, ht, hkind, _ = _vec_arg(h, xdt)
    rstdp = rstd.data_ptr()
    meanp = rstdp if is_rms else mean.data_ptr()
    seed_lo, seed_hi = _seed_words(seed) if dropout_p > 0 else (0, 0)
    nchunks = _workers(m, n)
    kernel = _fwd_kernel if nchunks > 1 else _fwd_kernel_serial
    kernel(
        xp, xlen, xt, x.stride(0), xkind, not has_h, rp, rlen, rt,
        residual.stride(0) if has_r else 0, rkind, has_r, wp, wt, wkind, has_w, bp, bt, bkind,
        has_b, y.data_ptr(), yt, ykind, hp, ht, hkind, has_h, meanp, rstdp, m, n,
        _consts(ct, eps, n, dropout_p), is_rms, zero_centered, float(dropout_p), seed_lo,
        seed_hi, _xhat_code(xhat_dtype, ct) if xhat_dtype is not None else 0, nchunks,
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
    weight, bias = _param(weight), _param(bias)
    m, n = dy.shape
    ct = rstd.dtype
    dx = torch.empty((m, n), dtype=x_dtype)
    dres = torch.empty((m, n) if has_residual else (0,), dtype=residual_dtype or x_dtype)
    need_dw = need_weight_grad and weight is not None
    need_db = need_weight_grad and bias is not None
    # acc: 0 no weight gradients, 1 dweight, 2 dweight and dbias (a bias without a weight gets a
    # scratch dweight: rare enough not to deserve its own loop)
    acc = 2 if need_db else int(need_dw)
    if m == 0 or n == 0:
        dw = torch.zeros(n, dtype=ct) if need_dw else None  # the gradients of no rows
        db = torch.zeros(n, dtype=ct) if need_db else None
    else:
        # depends on M and N only (the weight gradients' summation order); long rows get fewer
        # blocks, so that the partial rows stay in cache and their final sum stays short
        nblocks = min(m, _MAX_BLOCKS, max(8, _PARTIAL_ELEMENTS // max(n, 1)))
        # the partial rows: dweight's, then dbias's, in one scratch tensor
        parts = torch.empty(acc * nblocks * n, dtype=ct) if acc else None
        dw = torch.empty(n, dtype=ct) if acc else None
        db = torch.empty(n, dtype=ct) if acc == 2 else None
        adt = dy.dtype
        dyp, dylen, dyt, dykind, _ = _rows_arg(dy, adt)
        hp, hlen, hst, hkind, _ = _rows_arg(h, adt)
        wp, wt, wkind, has_w = _vec_arg(weight, adt)
        bp, bt, bkind, has_b = _vec_arg(bias, adt)
        op, olen, ot, okind, has_o = _rows_arg(dh_out, adt)
        dxt, dxkind = TAGS[x_dtype]
        drp, drt, drkind, _ = _vec_arg(dres, adt)
        rstdp = rstd.data_ptr()
        meanp = mean.data_ptr() if mean.numel() else rstdp
        cdummy = TAG_ADDR[ct]
        dwpp = parts.data_ptr() if acc else cdummy
        dbpp = dwpp + nblocks * n * parts.element_size() if acc == 2 else cdummy
        seed_lo, seed_hi = _seed_words(seed) if dropout_p > 0 else (0, 0)
        kernel = _bwd_kernel if _workers(m, n) > 1 else _bwd_kernel_serial
        kernel(
            dyp, dylen, dyt, dy.stride(0), dykind, hp, hlen, hst, h.stride(0), hkind, wp, wt,
            wkind, has_w, bp, bt, bkind, has_b, meanp, rstdp, op, olen, ot,
            dh_out.stride(0) if has_o else 0, okind, has_o, dx.data_ptr(), dxt, dxkind, drp, drt,
            drkind, has_residual, dwpp, dbpp, dw.data_ptr() if acc else cdummy,
            db.data_ptr() if acc == 2 else cdummy, acc, m, n, _consts(ct, eps, n, dropout_p),
            is_rms, zero_centered, float(dropout_p), seed_lo, seed_hi, from_output, nblocks,
        )  # fmt: skip
    dweight = (dw if weight.dtype == ct else dw.to(weight.dtype)) if need_dw else None
    dbias = (db if bias.dtype == ct else db.to(bias.dtype)) if need_db else None
    return dx, dres, dweight, dbias


def dropout_keep_mask(seed: int, M: int, N: int, p: float, device="cpu") -> torch.Tensor:
    """The (M, N) bool mask of the elements the kernels keep for dropout probability p."""
    out = torch.empty((M, N), dtype=torch.bool)
    if M * N:
        seed_lo, seed_hi = _seed_words(seed)
        _keep_mask_kernel(out.numpy().reshape(-1), M, N, seed_lo, seed_hi, np.float32(p))
    return out.to(device)
