"""Row norms in numba: LayerNorm and RMSNorm, with fused residual-add and dropout.

The numba half of `cpu/layer_norm.py`, which launches these kernels and holds their argument
layouts; docs/DESIGN.md has the maths and the contract. A kernel is specialized on the storage
types of its tensors, absent tensors included (their code is left out when compiled), and reads
everything else from its argument block.

How the work is laid out, and why:
- A row is normalized from a float buffer of the compute type (float32, float64 for float64):
  the input row itself when it is stored in that type, else a converted copy (half input, or
  h = residual + dropout(x) rounded to its storage type). The row is re-read from cache for the
  exact two-pass statistics.
- Only the reductions are compiled with reassociation (to let LLVM vectorize them); their order
  then depends on N alone, so a row's result never depends on M or on its position.
- Each thread takes an equal share of the rows (forward) or of the backward's row blocks, whose
  number depends on M and N only; each block sums its dweight/dbias rows into its own partial
  row, and the partial rows are added in block order after a barrier: bitwise deterministic.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.extending import overload

from fusednorm.cpu.kernels._compile import cfunc
from fusednorm.cpu.kernels._dtypes import (
    OPTS,
    at,
    barrier,
    floats,
    ints,
    is_half,
    load,
    my_share,
    round_to,
    row_view,
    storage_type,
    store,
    store_row,
    thread_id,
)
from fusednorm.cpu.layer_norm import (
    BWD_ARGS as BWD,
)
from fusednorm.cpu.layer_norm import (
    FWD_ARGS as FWD,
)
from fusednorm.cpu.layer_norm import (
    MASK_ARGS as KEEP_MASK,
)
from fusednorm.cpu.layer_norm import (
    SCRATCH_ROWS,
)

# Reassociation (and FMA contraction) for the row reductions only. Never nnan/ninf: NaN and inf
# rows must propagate as in torch.
_REDUCE = {"reassoc", "contract", "arcp"}
_FMA = {"contract"}  # elementwise loops: fused multiply-adds, no reordering

# Philox-4x32-10 constants, as in Triton's tl.rand (so the two backends draw the same mask).
_ROUND_A, _ROUND_B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_KEY_A, _KEY_B = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_M32, _SH32 = np.uint64(0xFFFFFFFF), np.uint64(32)


# --- dropout: a counter-based uniform, keyed on (seed, element index) ---------------------------


@njit(**OPTS)
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


def build_keep_mask():
    """The bool mask the kernels' dropout keeps (for tests and the Triton comparison)."""
    out_, m_, n_, lo_, hi_ = KEEP_MASK.slots("out", "m", "n", "seed_lo", "seed_hi")
    p_ = KEEP_MASK.slot("p")
    size = len(KEEP_MASK)

    def entry(block):
        a, f = ints(block, size), floats(block, size)
        m, n, p = a[m_], a[n_], np.float32(f[p_])
        out = at(a[out_], m * n, np.uint8)
        lo, hi = my_share(m)
        for i in range(lo, hi):
            for j in range(n):
                out[i * n + j] = 1 if _uniform(a[lo_], a[hi_], i * n + j) >= p else 0

    return entry


# --- row helpers ---------------------------------------------------------------------------------
# Rows are slices indexed from 0 (numba wraps negative signed indices, so a[o + j] would compile
# to gathers instead of vector loads). Few functions, each compiled once per storage type: a
# numba function costs tens of milliseconds to compile, which a first call waits for. The
# reductions are their own functions because only they are compiled with reassociation.


def _row_sum(src, off, n, dst, sq):
    """(row, Σ row) of src[off:off + n] in dst's float type (Σ of squares when sq): the row
    itself when stored in that type, else converted into dst in the same pass. The order of
    the sum depends on N only."""
    raise NotImplementedError  # only callable from numba code


@overload(_row_sum, jit_options={"fastmath": _REDUCE, **OPTS})
def _row_sum_impl(src, off, n, dst, sq):
    if src.dtype == dst.dtype:

        def in_place(src, off, n, dst, sq):
            a = src[off:off + n]
            acc = a[0] * a[0] if sq else a[0]
            if sq:
                for j in range(1, n):
                    acc += a[j] * a[j]
            else:
                for j in range(1, n):
                    acc += a[j]
            return a, acc

        return in_place

    def converted(src, off, n, dst, sq):
        s = src[off:off + n]
        v = load(s, 0)
        dst[0] = v
        acc = v * v if sq else v
        if sq:
            for j in range(1, n):
                v = load(s, j)
                dst[j] = v
                acc += v * v
        else:
            for j in range(1, n):
                v = load(s, j)
                dst[j] = v
                acc += v
        return dst[:n], acc

    return converted


@njit(fastmath=_REDUCE, **OPTS)
def _dev_sums(a, n, mu):
    """(Σ d, Σ d²), d = a - mu."""
    d = a[0] - mu
    sd, ss = d, d * d
    for j in range(1, n):
        d = a[j] - mu
        sd += d
        ss += d * d
    return sd, ss


@njit(**OPTS)
def _row_stats(a, n, eps, is_rms, s):
    """(mean, rstd) of the row a given s, its Σa (Σa² for RMSNorm). No fast-math here: the
    inf and NaN rows must come out as torch's."""
    one, zero, inv_n = a.dtype.type(1), a.dtype.type(0), a.dtype.type(1) / a.dtype.type(n)
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


def _param_row(p, present, zc, fill, n, out):
    """The parameter row in the compute type: p itself when stored so (and not zero-centred),
    else converted into out (1 + p when zc); `fill` when the parameter is absent (`present`
    false: one kernel serves both, so absent parameters cost no specialization)."""
    raise NotImplementedError  # only callable from numba code


@overload(_param_row, jit_options={"fastmath": _FMA, **OPTS})
def _param_row_impl(p, present, zc, fill, n, out):
    if p.dtype == out.dtype:

        def native(p, present, zc, fill, n, out):
            if present and not zc:
                return p
            one = out.dtype.type(1)
            for j in range(n):
                out[j] = (p[j] + one if zc else p[j]) if present else fill
            return out

        return native

    def convert(p, present, zc, fill, n, out):
        one = out.dtype.type(1)
        for j in range(n):
            out[j] = (load(p, j) + one if zc else load(p, j)) if present else fill
        return out

    return convert


# --- forward -------------------------------------------------------------------------------------


@njit(fastmath=_FMA, **OPTS)
def _fwd_rows(x, sx, r, sr, y, h, mean, rstd, stats, weff, beff, buf, tmp, lo, hi, n, eps,
              is_rms, dropout, xhat):
    """Rows lo..hi-1 of the forward. None, and left out of the compiled code: h when the
    norm's input is x itself; r without a residual; xhat (else a scalar of the type x̂ is
    rounded to). dropout: (p, scale, seed words), applied when p > 0."""
    zero = buf.dtype.type(0)
    for i in range(lo, hi):
        if h is None:  # x in place, or converted with its first sum taken in the same pass
            a, s = _row_sum(x, i * sx, n, buf, is_rms)
        else:
            # h = residual + dropout(x), rounded to its storage type before the norm
            xr = x[i * sx:i * sx + n]
            for j in range(n):
                buf[j] = load(xr, j)
            if dropout[0] > 0:
                _dropout_row(buf, n, i * n, dropout, zero)
            if r is not None:
                rr = r[i * sr:i * sr + n]
                for j in range(n):
                    buf[j] += load(rr, j)
            hr = h[i * n:i * n + n]
            for j in range(n):
                store(hr, j, buf[j])
                buf[j] = load(hr, j)
            a, s = _row_sum(buf, 0, n, buf, is_rms)
        mu, rs = _row_stats(a, n, eps, is_rms, s)
        if stats:
            if not is_rms:
                mean[i] = mu
            rstd[i] = rs
        yr = y[i * n:i * n + n]
        if xhat is None:
            for j in range(n):
                store(yr, j, (a[j] - mu) * rs * weff[j] + beff[j])
        else:  # x̂ rounded first: the cast order of Hugging Face's Llama and T5 norms
            for j in range(n):
                store(yr, j, a.dtype.type(round_to((a[j] - mu) * rs, xhat)) * weff[j] + beff[j])


def build_fwd(compute, x, r, params, y, h, xhat):
    """The forward kernel for these storage types ("" for an absent tensor; params: the
    weight's and bias's, whichever are present; xhat: the type x̂ is rounded to, "" for none)."""
    ct, xt, rt, yt, ht, xhatt = (storage_type(s) for s in (compute, x, r, y, h, xhat))
    pt = storage_type(params or compute)
    xhat_like = None if xhatt is None else xhatt(0)
    csize = np.dtype(ct).itemsize
    size, eps_, p_, scale_ = len(FWD), *FWD.slots("eps", "p", "scale")
    x_, r_, w_, b_, y_, h_, mean_, rstd_, scr_ = FWD.slots(
        "x", "residual", "weight", "bias", "y", "h", "mean", "rstd", "scratch")
    m_, n_, sx_, sr_, rms_, zc_, st_, lo_, hi_, hw_, hb_ = FWD.slots(
        "m", "n", "sx", "sr", "is_rms", "zero_centered", "stats", "seed_lo", "seed_hi",
        "has_weight", "has_bias")

    def entry(block):
        a, f = ints(block, size), floats(block, size)
        m, n, sx, sr = a[m_], a[n_], a[sx_], a[sr_]
        scratch = at(a[scr_] + thread_id() * SCRATCH_ROWS * n * csize, SCRATCH_ROWS * n, ct)
        weff = _param_row(at(a[w_], n, pt), a[hw_] != 0, a[zc_] != 0, ct(1), n, scratch[:n])
        beff = _param_row(at(a[b_], n, pt), a[hb_] != 0, False, ct(0), n, scratch[n:2 * n])
        drop = (np.float32(f[p_]), ct(f[scale_]), a[lo_], a[hi_])
        lo, hi = my_share(m)
        _fwd_rows(at(a[x_], (m - 1) * sx + n, xt), sx, at(a[r_], (m - 1) * sr + n, rt), sr,
                  at(a[y_], m * n, yt), at(a[h_], m * n, ht), at(a[mean_], m, ct),
                  at(a[rstd_], m, ct), a[st_] != 0, weff, beff, scratch[2 * n:3 * n],
                  scratch[3 * n:4 * n], lo, hi, n, ct(f[eps_]), a[rms_] != 0, drop, xhat_like)

    return cfunc(entry)


@njit(**OPTS)
def _dropout_row(buf, n, base, dropout, zero):
    # multiply by 0 rather than assign it: a dropped inf or NaN gives NaN, as in torch
    p, scale, seed_lo, seed_hi = dropout
    for j in range(n):
        buf[j] *= scale if _uniform(seed_lo, seed_hi, base + j) >= p else zero


# --- backward ------------------------------------------------------------------------------------


@njit(fastmath=_REDUCE, **OPTS)
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


@njit(fastmath=_FMA, **OPTS)
def _bwd_block(dy, sdy, hs, shs, mean, rstd, dho, sdho, dx, dr, dw_blk, db_blk, acc, weff,
               beff, xh, gb, tb, ob, lo, hi, n, is_rms, dropout, from_output):
    """Rows lo..hi-1 of the backward, their weight gradients summed into dw_blk, db_blk. dho
    (the gradient flowing into h), dr (dresidual), dropout and from_output (the memory-saving
    mode: hs is y) are None when absent, and then left out of the compiled code."""
    one, zero = gb.dtype.type(1), gb.dtype.type(0)
    inv_n = one / gb.dtype.type(n)
    if acc >= 1:  # zeroed here, by the thread that fills them, not by a torch op
        dw_blk[:] = zero
    if acc == 2:
        db_blk[:] = zero
    for i in range(lo, hi):
        d, a = row_view(dy, i * sdy, n, gb), row_view(hs, i * shs, n, ob)
        rs = rstd[i]
        if from_output is not None:  # a is y: x̂ = (y - b) / w_eff, then taken as it is below
            for j in range(n):
                tb[j] = (a[j] - beff[j]) / weff[j]
            sg, sgx = _grad_pass(tb, d, weff, zero, one, n, xh)
        else:
            sg, sgx = _grad_pass(a, d, weff, zero if is_rms else mean[i], rs, n, xh)
        # (apart from _grad_pass: LLVM vectorizes behind run-time alias checks, one per pair
        # of arrays, and gives up past a handful of pairs)
        if acc == 2:
            for j in range(n):
                dw_blk[j] += d[j] * xh[j]
                db_blk[j] += d[j]
        elif acc == 1:
            for j in range(n):
                dw_blk[j] += d[j] * xh[j]
        mg, mgx = zero if is_rms else sg * inv_n, sgx * inv_n
        if dho is None and dr is None and dropout is None:  # dx straight to its output
            o = dx[i * n:i * n + n]
            for j in range(n):
                store(o, j, rs * (d[j] * weff[j] - mg - xh[j] * mgx))
        else:  # dh = dnorm + dh_out; dresidual = dh; dx = dropout'(dh)
            for j in range(n):
                tb[j] = rs * (d[j] * weff[j] - mg - xh[j] * mgx)
            if dho is not None:
                hr = dho[i * sdho:i * sdho + n]
                for j in range(n):
                    tb[j] += load(hr, j)
            if dr is not None:
                store_row(dr, i * n, n, tb)
            if dropout is not None:
                _dropout_row(tb, n, i * n, dropout, zero)
            store_row(dx, i * n, n, tb)


@njit(**OPTS)
def _sum_blocks(parts, nb, n, lo, hi, out):
    """out[lo:hi] = Σ_k parts[k, lo:hi] over the nb partial rows, in the order k = 0, 1, ...
    (deterministic whatever the split of the columns between threads)."""
    for j in range(lo, hi):
        out[j] = parts[j]
    for k in range(1, nb):
        part = parts[k * n + lo:k * n + hi]
        o = out[lo:hi]
        for j in range(hi - lo):
            o[j] += part[j]


def build_bwd(compute, dy, hs, params, dho, dx, dr, dropout, from_output):
    """The backward kernel for these storage types ("" for an absent tensor; params: the
    weight's and bias's, whichever are present); dropout: "1" when the forward drew a dropout
    mask; from_output: "1" in the memory-saving mode (hs is the forward's output)."""
    output_mode = 1 if from_output else None
    ct, dyt, hst, dhot, dxt, drt = (storage_type(s) for s in (compute, dy, hs, dho, dx, dr))
    pt = storage_type(params or compute)
    with_dropout = bool(dropout)
    csize = np.dtype(ct).itemsize
    size, p_, scale_ = len(BWD), *BWD.slots("p", "scale")
    dy_, hs_, w_, b_, mean_, rstd_, dho_, dx_, dr_, parts_, dw_, db_, scr_ = BWD.slots(
        "dy", "saved", "weight", "bias", "mean", "rstd", "dh_out", "dx", "dresidual", "parts",
        "dweight", "dbias", "scratch")
    m_, n_, sdy_, shs_, sdho_, rms_, zc_, acc_, nb_, lo_, hi_, hw_, hb_ = BWD.slots(
        "m", "n", "sdy", "ssaved", "sdh", "is_rms", "zero_centered", "acc", "nblocks",
        "seed_lo", "seed_hi", "has_weight", "has_bias")

    def entry(block):
        a, f = ints(block, size), floats(block, size)
        m, n, nb, acc = a[m_], a[n_], a[nb_], a[acc_]
        sdy, shs, sdho = a[sdy_], a[shs_], a[sdho_]
        parts = at(a[parts_], 2 * nb * n, ct)  # dweight's partial rows, then dbias's
        scratch = at(a[scr_] + thread_id() * SCRATCH_ROWS * n * csize, SCRATCH_ROWS * n, ct)
        weff = _param_row(at(a[w_], n, pt), a[hw_] != 0, a[zc_] != 0, ct(1), n, scratch[:n])
        beff = _param_row(at(a[b_], n, pt), a[hb_] != 0, False, ct(0), n, scratch[n:2 * n])
        drop = (np.float32(f[p_]), ct(f[scale_]), a[lo_], a[hi_]) if with_dropout else None
        per = (m + nb - 1) // nb
        lo, hi = my_share(nb)
        for blk in range(lo, hi):
            _bwd_block(at(a[dy_], (m - 1) * sdy + n, dyt), sdy, at(a[hs_], (m - 1) * shs + n, hst),
                       shs, at(a[mean_], m, ct), at(a[rstd_], m, ct),
                       at(a[dho_], (m - 1) * sdho + n, dhot), sdho, at(a[dx_], m * n, dxt),
                       at(a[dr_], m * n, drt), parts[blk * n:(blk + 1) * n],
                       parts[(nb + blk) * n:(nb + blk + 1) * n], acc, weff, beff,
                       scratch[2 * n:3 * n], scratch[3 * n:4 * n], scratch[4 * n:5 * n],
                       scratch[5 * n:], blk * per, min(m, (blk + 1) * per), n, a[rms_] != 0,
                       drop, output_mode)
        if acc > 0:
            barrier()  # every partial row is complete; then each thread sums its columns
            c0, c1 = my_share(n)
            _sum_blocks(parts, nb, n, c0, c1, at(a[dw_], n, ct))
            if acc == 2:
                _sum_blocks(parts[nb * n:], nb, n, c0, c1, at(a[db_], n, ct))

    return cfunc(entry)


__all__ = ["build_bwd", "build_fwd", "build_keep_mask", "is_half"]
