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
- Rows read in place (x, and the backward's dy) go a group of 16 rows at a time: the rows'
  statistics or sums first, then the outputs by chunks of 512 columns, so that a chunk of the
  weight and bias (and of the weight gradients' partial rows) stays in L1 over the group.
- Only the sums are reassociated (`radd`, `rfma`: the flag on those instructions alone, to let
  LLVM vectorize them); their order then depends on N alone, so a row's result never depends
  on M or on its position.
- Each kernel is one numba function (see "row helpers" below): its compile time is what a
  first call waits for.
- Each thread takes an equal share of the rows (forward) or of the backward's row blocks, whose
  number depends on M and N only; each block sums its dweight/dbias rows into its own partial
  row, and the partial rows are added in block order after a barrier: bitwise deterministic.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from fusednorm.cpu.kernels._compile import cfunc
from fusednorm.cpu.kernels._dtypes import (
    OPTS,
    at,
    barrier,
    floats,
    idiv,
    ints,
    load,
    my_share,
    radd,
    rfma,
    round_to,
    stack_array,
    storage_type,
    store,
    thread_id,
    view,
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

# rows per group and columns per chunk where x (and dy) are read in place (see by_chunks), and
# the numbers kept per row of a group: mean and rstd (and the backward's mean(g), mean(g·x̂))
_GROUP, _CHUNK = 16, 512
_group_numbers = stack_array(4 * _GROUP)
_FMA = {"contract"}  # fused multiply-adds, no reordering (the sums reassociate by radd, rfma)

# Philox-4x32-10 constants, as in Triton's tl.rand (so the two backends draw the same mask).
_ROUND_A, _ROUND_B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_KEY_A, _KEY_B = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_M32, _SH32 = np.uint64(0xFFFFFFFF), np.uint64(32)


# --- dropout: a counter-based uniform, keyed on (seed, element index) ---------------------------


@njit(inline="always", **OPTS)
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
# Each kernel is one numba function, written out rather than split into helpers: every numba
# function costs a first call ~20 ms to compile however small, and inlining one costs about as
# much. What a specialization leaves out is ruled out by constants of its builder, whose branches
# numba prunes before typing. Rows are slices indexed from 0 (numba wraps negative signed
# indices, so a[o + j] would compile to gathers instead of vector loads). Only the sums are
# reassociated (radd, rfma), so that LLVM vectorizes them; their order then depends on N alone.


@njit(inline="always", **OPTS)
def _param_rows(w, has_w, b, has_b, zc, n, weff, beff):
    """The weight row (1 + w when zc; 1 when absent) and the bias row (0 when absent) in the
    compute type, converted into weff and beff. (One kernel serves present and absent
    parameters, so absent ones cost no specialization.)"""
    one, zero = weff.dtype.type(1), weff.dtype.type(0)
    for j in range(n):
        wj = load(w, j) if has_w else one
        weff[j] = wj + one if zc and has_w else wj
        beff[j] = load(b, j) if has_b else zero


@njit(inline="always", **OPTS)
def _dropout_row(buf, n, base, p, scale, seed_lo, seed_hi):
    # multiply by 0 rather than assign it: a dropped inf or NaN gives NaN, as in torch
    zero = buf.dtype.type(0)
    for j in range(n):
        buf[j] *= scale if _uniform(seed_lo, seed_hi, base + j) >= p else zero


# --- forward -------------------------------------------------------------------------------------


def build_fwd(compute, x, r, params, y, h, xhat):
    """The forward kernel for these storage types ("" for an absent tensor; params: the
    weight's and bias's, whichever are present; xhat: the type x̂ is rounded to, "" for none).

    Row by row: the row to normalize is x itself when stored in the compute type, else x
    converted into scratch, or, with h, h = residual + dropout(x) rounded to h's storage type
    (and read back as rounded); then its statistics, exact two-pass from the cached row, then y."""
    ct, xt, rt, yt, ht, xhatt = (storage_type(s) for s in (compute, x, r, y, h, xhat))
    pt = storage_type(params or compute)
    # The specialization's constants (numba prunes the branches they rule out):
    with_h, with_residual, x_in_place = ht is not None, rt is not None, xt == ct
    params_native, round_xhat = pt == ct, xhatt is not None
    by_chunks = x_in_place and not with_h
    xhat_like = xhatt(0) if round_xhat else ct(0)
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
        is_rms, zc, stats = a[rms_] != 0, a[zc_] != 0, a[st_] != 0
        has_w, has_b = a[hw_] != 0, a[hb_] != 0
        eps, p, scale = ct(f[eps_]), np.float32(f[p_]), ct(f[scale_])
        one, zero, inv_n = ct(1), ct(0), ct(1) / ct(n)
        scratch = at(a[scr_] + thread_id() * SCRATCH_ROWS * n * csize, SCRATCH_ROWS * n, ct)
        w, b = at(a[w_], n, pt), at(a[b_], n, pt)
        if params_native and has_w and has_b and not zc:  # (the launcher gives no scratch then)
            weff, beff = w, b
        else:
            weff, beff = view(scratch, 0, n), view(scratch, n, n)
            _param_rows(w, has_w, b, has_b, zc, n, weff, beff)
        buf = view(scratch, 2 * n, n)
        x_rows, y_rows = at(a[x_], (m - 1) * sx + n, xt), at(a[y_], m * n, yt)
        h_rows, r_rows = at(a[h_], m * n, ht), at(a[r_], (m - 1) * sr + n, rt)
        mean, rstd = at(a[mean_], m, ct), at(a[rstd_], m, ct)
        lo, hi = my_share(m)
        # x read in place (see by_chunks), a group of rows at a time: the group's statistics,
        # then y by column chunks, each chunk of the weight and bias kept in L1 over the group
        group = _GROUP if by_chunks else hi - lo
        coef = _group_numbers(ct)  # mean and rstd per row of the group
        for g0 in range(lo, hi, group if group > 0 else 1):
            g1 = g0 + group
            g1 = g1 if g1 < hi else hi  # noqa: FURB136
            for i in range(g0, g1):
                xr = view(x_rows, i * sx, n)
                if with_h:  # h = residual + dropout(x), rounded to its storage type, then normed
                    for j in range(n):
                        buf[j] = load(xr, j)
                    if p > 0:
                        _dropout_row(buf, n, i * n, p, scale, a[lo_], a[hi_])
                    if with_residual:
                        rr = view(r_rows, i * sr, n)
                        for j in range(n):
                            buf[j] += load(rr, j)
                    hr = view(h_rows, i * n, n)
                    for j in range(n):
                        store(hr, j, buf[j])
                        buf[j] = load(hr, j)
                    row = buf
                elif x_in_place:
                    row = xr
                else:
                    for j in range(n):
                        buf[j] = load(xr, j)
                    row = buf
                # the statistics: Σx (Σx² for RMSNorm), then for LayerNorm the corrected
                # two-pass variance: the deviations' own sum removes the rounding error of the
                # first mean (Chan, Golub & LeVeque), which matters for rows far from zero (mean
                # 1e4, unit spread). Outside the sums IEEE order: inf and NaN rows come out as
                # torch's.
                if is_rms:
                    s = row[0] * row[0]
                    for j in range(1, n):
                        s = rfma(s, row[j], row[j])
                    mu, rs = zero, one / np.sqrt(s * inv_n + eps)
                else:
                    s = row[0]
                    for j in range(1, n):
                        s = radd(s, row[j])
                    mu = s * inv_n
                    d = row[0] - mu
                    sd, ss = d, d * d
                    for j in range(1, n):
                        d = row[j] - mu
                        sd = radd(sd, d)
                        ss = rfma(ss, d, d)
                    var = (ss - sd * inv_n * sd) * inv_n
                    if var < zero:  # not max(): a NaN row must stay NaN
                        var = zero
                    elif np.isinf(ss):  # squares overflowed: the variance is inf, not inf - inf
                        var = ss
                    mu, rs = mu + sd * inv_n, one / np.sqrt(var + eps)
                if stats:
                    if not is_rms:
                        mean[i] = mu
                    rstd[i] = rs
                if by_chunks:
                    coef[2 * (i - g0)], coef[2 * (i - g0) + 1] = mu, rs
                    continue
                yr = view(y_rows, i * n, n)
                if round_xhat:  # x̂ rounded first: the cast order of Hugging Face's Llama, T5
                    for j in range(n):
                        store(yr, j, ct(round_to((row[j] - mu) * rs, xhat_like)) * weff[j]
                              + beff[j])
                else:
                    for j in range(n):
                        store(yr, j, (row[j] - mu) * rs * weff[j] + beff[j])
            if by_chunks:
                for c0 in range(0, n, _CHUNK):
                    c1 = c0 + _CHUNK
                    c = (c1 if c1 < n else n) - c0  # noqa: FURB136
                    wc, bc = view(weff, c0, c), view(beff, c0, c)
                    for i in range(g0, g1):
                        mu, rs = coef[2 * (i - g0)], coef[2 * (i - g0) + 1]
                        xc, yc = view(x_rows, i * sx + c0, c), view(y_rows, i * n + c0, c)
                        if round_xhat:
                            for j in range(c):
                                store(yc, j, ct(round_to((xc[j] - mu) * rs, xhat_like)) * wc[j]
                                      + bc[j])
                        else:
                            for j in range(c):
                                store(yc, j, (xc[j] - mu) * rs * wc[j] + bc[j])

    return cfunc(entry, fastmath=_FMA)


# --- backward ------------------------------------------------------------------------------------


def build_bwd(compute, dy, hs, params, dho, dx, dr, dropout, from_output):
    """The backward kernel for these storage types ("" for an absent tensor; params: the
    weight's and bias's, whichever are present); dropout: "1" when the forward drew a dropout
    mask; from_output: "1" in the memory-saving mode (hs is the forward's output).

    Each thread takes whole blocks of rows (their number depends on M and N only); a block sums
    its rows' weight gradients into its own partial row, and after a barrier each thread adds
    its columns of the partial rows in block order: bitwise deterministic."""
    ct, dyt, hst, dhot, dxt, drt = (storage_type(s) for s in (compute, dy, hs, dho, dx, dr))
    pt = storage_type(params or compute)
    # The specialization's constants (numba prunes the branches they rule out):
    with_dropout, output_mode = bool(dropout), bool(from_output)
    with_dh, with_dres = dhot is not None, drt is not None
    dx_direct = not (with_dh or with_dres or with_dropout)  # dx straight to its output
    dy_in_place, saved_in_place, params_native = dyt == ct, hst == ct, pt == ct
    # dx straight from dy and x read where they lie: the weight gradients and dx by column
    # chunks over a group of rows (see the loop)
    by_chunks = dx_direct and dy_in_place and saved_in_place and not output_mode
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
        is_rms, zc, has_w, has_b = a[rms_] != 0, a[zc_] != 0, a[hw_] != 0, a[hb_] != 0
        p, scale = np.float32(f[p_]), ct(f[scale_])
        one, zero = ct(1), ct(0)
        inv_n = one / ct(n)
        parts = at(a[parts_], 2 * nb * n, ct)  # dweight's partial rows, then dbias's
        scratch = at(a[scr_] + thread_id() * SCRATCH_ROWS * n * csize, SCRATCH_ROWS * n, ct)
        w, b = at(a[w_], n, pt), at(a[b_], n, pt)
        if params_native and has_w and has_b and not zc:
            weff, beff = w, b
        else:
            weff, beff = view(scratch, 0, n), view(scratch, n, n)
            _param_rows(w, has_w, b, has_b, zc, n, weff, beff)
        xh, gb, tb, ob = (view(scratch, 2 * n, n), view(scratch, 3 * n, n),
                          view(scratch, 4 * n, n), view(scratch, 5 * n, n))
        dy_rows, hs_rows = at(a[dy_], (m - 1) * sdy + n, dyt), at(a[hs_], (m - 1) * shs + n, hst)
        dho_rows = at(a[dho_], (m - 1) * sdho + n, dhot)
        dx_rows, dr_rows = at(a[dx_], m * n, dxt), at(a[dr_], m * n, drt)
        mean, rstd = at(a[mean_], m, ct), at(a[rstd_], m, ct)
        per = idiv(m + nb - 1, nb)
        lo, hi = my_share(nb)
        for blk in range(lo, hi):
            dw_blk, db_blk = view(parts, blk * n, n), view(parts, (nb + blk) * n, n)
            if acc >= 1:  # zeroed here, by the thread that fills them, not by a torch op
                for j in range(n):
                    dw_blk[j] = zero
            if acc == 2:
                for j in range(n):
                    db_blk[j] = zero
            end = (blk + 1) * per  # (not min(): a numba function of its own to compile)
            end = end if end < m else m  # noqa: FURB136
            if by_chunks:
                # The rows' sums first, a group of rows at a time; then, chunk by chunk of
                # columns, each row's weight gradients and dx. The chunk of the partial rows and
                # of the weight stays in L1 over the group, where one row after another
                # (x, dy, x̂, dx and two partial rows: 7 rows of N) went through L2: the
                # single-thread backward was bound by L2's bandwidth. Same sums, same order.
                coef = _group_numbers(ct)  # mean, rstd, mean(g), mean(g·x̂) per row
                for g0 in range(blk * per, end, _GROUP):
                    g1 = g0 + _GROUP
                    g1 = g1 if g1 < end else end  # noqa: FURB136
                    for i in range(g0, g1):
                        d = view(dy_rows, i * sdy, n)
                        row = view(hs_rows, i * shs, n)
                        rs = rstd[i]
                        mu = zero if is_rms else mean[i]
                        x0 = (row[0] - mu) * rs
                        sg = d[0] * weff[0]
                        sgx = sg * x0
                        for j in range(1, n):
                            g = d[j] * weff[j]
                            sg = radd(sg, g)
                            sgx = rfma(sgx, g, (row[j] - mu) * rs)
                        k = 4 * (i - g0)
                        coef[k] = mu
                        coef[k + 1] = rs
                        coef[k + 2] = zero if is_rms else sg * inv_n
                        coef[k + 3] = sgx * inv_n
                    for c0 in range(0, n, _CHUNK):
                        c1 = c0 + _CHUNK
                        c = (c1 if c1 < n else n) - c0  # noqa: FURB136
                        wc = view(weff, c0, c)
                        dwc, dbc = view(dw_blk, c0, c), view(db_blk, c0, c)
                        for i in range(g0, g1):
                            k = 4 * (i - g0)
                            mu = coef[k]
                            rs = coef[k + 1]
                            mg = coef[k + 2]
                            mgx = coef[k + 3]
                            d = view(dy_rows, i * sdy + c0, c)
                            row = view(hs_rows, i * shs + c0, c)
                            if acc == 2:
                                for j in range(c):
                                    dwc[j] += d[j] * ((row[j] - mu) * rs)
                                    dbc[j] += d[j]
                            elif acc == 1:
                                for j in range(c):
                                    dwc[j] += d[j] * ((row[j] - mu) * rs)
                            o = view(dx_rows, i * n + c0, c)
                            for j in range(c):
                                store(o, j, rs * (d[j] * wc[j] - mg - ((row[j] - mu) * rs) * mgx))
            else:
                for i in range(blk * per, end):
                    if dy_in_place:
                        d = view(dy_rows, i * sdy, n)
                    else:
                        dyr = view(dy_rows, i * sdy, n)
                        for j in range(n):
                            gb[j] = load(dyr, j)
                        d = gb
                    if saved_in_place:
                        row = view(hs_rows, i * shs, n)
                    else:
                        hsr = view(hs_rows, i * shs, n)
                        for j in range(n):
                            ob[j] = load(hsr, j)
                        row = ob
                    rs = rstd[i]
                    if output_mode:  # row is y: x̂ = (y - b) / w_eff, then taken as it is below
                        for j in range(n):
                            tb[j] = (row[j] - beff[j]) / weff[j]
                        row, mu, r = tb, zero, one
                    else:
                        mu, r = zero if is_rms else mean[i], rs
                    # one pass: xh = x̂ and the sums (Σ g, Σ g·x̂), g = dy·w_eff
                    x0 = (row[0] - mu) * r
                    xh[0] = x0
                    g = d[0] * weff[0]
                    sg, sgx = g, g * x0
                    for j in range(1, n):
                        xj = (row[j] - mu) * r
                        xh[j] = xj
                        g = d[j] * weff[j]
                        sg = radd(sg, g)
                        sgx = rfma(sgx, g, xj)
                    # (apart from the pass above: LLVM vectorizes behind run-time alias checks, one
                    # per pair of arrays, and gives up past a handful of pairs)
                    if acc == 2:
                        for j in range(n):
                            dw_blk[j] += d[j] * xh[j]
                            db_blk[j] += d[j]
                    elif acc == 1:
                        for j in range(n):
                            dw_blk[j] += d[j] * xh[j]
                    mg, mgx = zero if is_rms else sg * inv_n, sgx * inv_n
                    if dx_direct:
                        o = view(dx_rows, i * n, n)
                        for j in range(n):
                            store(o, j, rs * (d[j] * weff[j] - mg - xh[j] * mgx))
                    else:  # dh = dnorm + dh_out; dresidual = dh; dx = dropout'(dh)
                        for j in range(n):
                            tb[j] = rs * (d[j] * weff[j] - mg - xh[j] * mgx)
                        if with_dh:
                            hr = view(dho_rows, i * sdho, n)
                            for j in range(n):
                                tb[j] += load(hr, j)
                        if with_dres:
                            o = view(dr_rows, i * n, n)
                            for j in range(n):
                                store(o, j, tb[j])
                        if with_dropout:
                            _dropout_row(tb, n, i * n, p, scale, a[lo_], a[hi_])
                        o = view(dx_rows, i * n, n)
                        for j in range(n):
                            store(o, j, tb[j])
        if acc > 0:
            barrier()  # every partial row is complete; then each thread sums its columns, the
            c0, c1 = my_share(n)  # partial rows in the order k = 0, 1, ... (deterministic),
            # into dweight and dbias, or for half parameters into the first partial rows, then
            # stored in the parameters' dtype (a cast by torch afterwards cost a small bfloat16
            # call more than the kernel's whole sum)
            if params_native:
                sw, sb = view(at(a[dw_], n, ct), c0, c1 - c0), view(at(a[db_], n, ct), c0, c1 - c0)
                for j in range(c1 - c0):
                    sw[j] = parts[c0 + j]
                    if acc == 2:
                        sb[j] = parts[nb * n + c0 + j]
            else:
                sw, sb = view(parts, c0, c1 - c0), view(parts, nb * n + c0, c1 - c0)
            for k in range(1, nb):
                part = view(parts, k * n + c0, c1 - c0)
                for j in range(c1 - c0):
                    sw[j] += part[j]
                if acc == 2:
                    part = view(parts, (nb + k) * n + c0, c1 - c0)
                    for j in range(c1 - c0):
                        sb[j] += part[j]
            if not params_native:
                dw, db = (view(at(a[dw_], n, pt), c0, c1 - c0),
                          view(at(a[db_], n, pt), c0, c1 - c0))
                for j in range(c1 - c0):
                    store(dw, j, sw[j])
                if acc == 2:
                    for j in range(c1 - c0):
                        store(db, j, sb[j])

    return cfunc(entry, fastmath=_FMA)


__all__ = ["build_bwd", "build_fwd", "build_keep_mask"]
