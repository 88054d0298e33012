"""BatchNorm in numba: per-channel statistics over batch and space, channels first and last.

The numba half of `cpu/batch_norm.py` (the launchers, the argument layouts and the contract).

Channels first, float32 and bfloat16, read in place in memory order (a channel's rows are C·S
apart: walking one channel at a time strides across pages and measured up to 2.5x slower). The
statistics: N is split by its size alone into up to `CHUNKS` chunks of samples; a chunk's rows
(n, c) are read in order, each row's moments taken by a corrected two-pass (`run_moments`) and
merged into its channel's in sample order with Chan's formula; the chunks are merged in order.
Then y over all rows in order. The backward likewise: per-chunk Σdy, Σdy·x̂ per channel, added
in chunk order, then dx in order. float16, whose conversion is too slow to repeat, is one task
per channel instead, read in blocks of `BLOCK` elements that may span rows, gathered and
converted into scratch that keeps a channel of up to `KEEP` elements between the two sweeps.

Channels last: blocks of rows × C (`_cl_blocks.py`), their moments merged over spans of
`SPAN` blocks, then span by span, in order.

Every sum is in an order fixed by the shape: deterministic, whatever the threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from fusednorm.cpu.batch_norm import CF_BWD, CF_FWD, CHUNKS, CL_BWD, CL_FWD, SPAN
from fusednorm.cpu.kernels import _cl_blocks as cl
from fusednorm.cpu.kernels._channels import (
    BLOCK,
    KEEP,
    block_moments,
    chan,
    dest,
    grad_sums,
    run_moments,
    store_affine,
    store_dnorm,
)
from fusednorm.cpu.kernels._compile import cfunc
from fusednorm.cpu.kernels._dtypes import (
    OPTS,
    at,
    barrier,
    ints,
    load_row,
    my_share,
    row_view,
    storage_type,
    thread_id,
)

# --- channels first, float16: one task per channel --------------------------------------------


@njit(**OPTS)
def _gather(x, c, p, k, c_, s_, dst):
    """Elements p..p + k of channel c in (n, s) order, in the compute type: a view of x when they
    lie in one row of it, else gathered into dst."""
    n = p // s_
    if p + k <= (n + 1) * s_:
        return row_view(x, (n * c_ + c) * s_ + p - n * s_, k, dst)
    j = p
    while j < p + k:
        n = j // s_
        e = min(p + k, (n + 1) * s_)
        load_row(x, (n * c_ + c) * s_ + j - n * s_, e - j, dst[j - p:e - p])
        j = e
    return dst[:k]


@njit(**OPTS)
def _gathered(x, c, p, k, c_, s_, dst):
    """What `_gather` returned for the same block, from its kept copy in dst."""
    n = p // s_
    if p + k <= (n + 1) * s_:
        o = (n * c_ + c) * s_ + p - n * s_
        return dest(x[o:o + k], 0, k, dst)
    return dst[:k]


@njit(**OPTS)
def _fwd_channel(x, w, b, y, mean, var, c, n_, c_, s_, cp, training, buf):
    count = n_ * s_
    keep = training and count <= KEEP
    if training:
        mu, m2, cnt = 0.0, 0.0, 0
        for p in range(0, count, BLOCK):
            k = min(BLOCK, count - p)
            q = p if keep else 0
            bm, bm2 = block_moments(_gather(x, c, p, k, c_, s_, buf[q:q + k]), cp)
            mu, m2, cnt = chan(mu, m2, cnt, bm, bm2, k)
        mean[c] = mu
        var[c] = m2 / count
    a = cp[1] / np.sqrt(var[c] + cp[0]) * w[c]
    sh = b[c] - mean[c] * a
    for p in range(0, count, BLOCK):
        k = min(BLOCK, count - p)
        if keep:
            xs = _gathered(x, c, p, k, c_, s_, buf[p:p + k])
        else:
            xs = _gather(x, c, p, k, c_, s_, buf[:k])
        j = p
        while j < p + k:  # the block's row segments
            n = j // s_
            e = min(p + k, (n + 1) * s_)
            store_affine(xs[j - p:e - p], a, sh, False, y, (n * c_ + c) * s_ + j - n * s_,
                         cp[1])
            j = e


@njit(**OPTS)
def _bwd_channel(dy, x, w, mean, var, dx, dw, db, c, n_, c_, s_, cp, training, xb, gb):
    """Sweep 0: dbias[c] = Σdy, dweight[c] = Σdy·x̂; sweep 1: dx = rstd·(w·dy − mg − x̂·mgx),
    mg and mgx the channel means of w·dy and w·dy·x̂ (zero when the statistics are constants)."""
    count = n_ * s_
    keep = count <= KEEP
    mu, r = mean[c], cp[1] / np.sqrt(var[c] + cp[0])
    s1, s2 = cp[2], cp[2]
    for p in range(0, count, BLOCK):
        k = min(BLOCK, count - p)
        q = p if keep else 0
        xs = _gather(x, c, p, k, c_, s_, xb[q:q + k])
        ds = _gather(dy, c, p, k, c_, s_, gb[q:q + k])
        a1, a2 = grad_sums(ds, xs, mu, r, cp)
        s1 += a1
        s2 += a2
    db[c], dw[c] = s1, s2
    mg, mgx = cp[2], cp[2]
    if training:
        mg, mgx = w[c] * s1 / cp.dtype.type(count), w[c] * s2 / cp.dtype.type(count)
    for p in range(0, count, BLOCK):
        k = min(BLOCK, count - p)
        if keep:
            xs = _gathered(x, c, p, k, c_, s_, xb[p:p + k])
            ds = _gathered(dy, c, p, k, c_, s_, gb[p:p + k])
        else:
            xs = _gather(x, c, p, k, c_, s_, xb[:k])
            ds = _gather(dy, c, p, k, c_, s_, gb[:k])
        j = p
        while j < p + k:  # the block's row segments
            n = j // s_
            e = min(p + k, (n + 1) * s_)
            store_dnorm(ds[j - p:e - p], xs[j - p:e - p], mu, r, w[c], mg, mgx, dx,
                        (n * c_ + c) * s_ + j - n * s_)
            j = e


# --- channels first, float32 and bfloat16: in memory order ----------------------------------------


@njit(**OPTS)
def _chunks(n_):
    """(samples per chunk, chunks): N split into up to `CHUNKS` chunks of samples, from N alone."""
    per = (n_ + CHUNKS - 1) // CHUNKS
    return per, (n_ + per - 1) // per


@njit(**OPTS)
def _chunk_moments(x, n0, n1, c_, s_, cp, pm, pm2):
    """Per-channel float64 (mean, M2) of samples n0..n1 into pm, pm2 (C), read in memory order:
    each row's moments (`run_moments`, in place) merged in sample order with Chan's formula."""
    for n in range(n0, n1):
        for c in range(c_):
            o = (n * c_ + c) * s_
            rm, rm2 = run_moments(x[o:o + s_], cp)
            if n == n0:
                pm[c], pm2[c] = rm, rm2
            else:
                pm[c], pm2[c], _ = chan(pm[c], pm2[c], (n - n0) * s_, rm, rm2, s_)


@njit(**OPTS)
def _chunk_grad_sums(dy, x, n0, n1, c_, s_, co, cp, s1, s2):
    """Per-channel Σdy and Σdy·x̂ of samples n0..n1 into s1, s2 (C), dy and x read in place in
    memory order, each row summed whole then added in sample order; co: mean and rstd (2·C)."""
    for n in range(n0, n1):
        for c in range(c_):
            o = (n * c_ + c) * s_
            a1, a2 = grad_sums(dy[o:o + s_], x[o:o + s_], co[c], co[c_ + c], cp)
            if n == n0:
                s1[c], s2[c] = a1, a2
            else:
                s1[c] += a1
                s2[c] += a2


def build_cf_fwd(compute, x):
    ct, xt = storage_type(compute), storage_type(x)
    half = x == "int16"
    size = len(CF_FWD)
    x_, w_, b_, y_, mean_, var_, cp_, scr_, loc_, lb_, n_s, c_s, s_s, tr_ = CF_FWD.slots(
        "x", "weight", "bias", "y", "mean", "var", "consts", "scratch", "local", "local_bytes",
        "n", "c", "s", "training")

    def entry(block):
        a = ints(block, size)
        n_, c_, s_, training = a[n_s], a[c_s], a[s_s], a[tr_] != 0
        total = n_ * c_ * s_
        x, y = at(a[x_], total, xt), at(a[y_], total, xt)
        w, b, cp = at(a[w_], c_, ct), at(a[b_], c_, ct), at(a[cp_], 3, ct)
        mean, var = at(a[mean_], c_, ct), at(a[var_], c_, ct)
        if half:
            k = n_ * s_ if n_ * s_ <= KEEP else BLOCK
            buf = at(a[loc_] + thread_id() * a[lb_], k, ct)
            lo, hi = my_share(c_)
            for c in range(lo, hi):
                _fwd_channel(x, w, b, y, mean, var, c, n_, c_, s_, cp, training, buf)
            return
        # scratch: the chunks' moments (2·chunks·C float64); the coefficients a, sh (2·C)
        per, nch = _chunks(n_)
        pm = at(a[scr_], 2 * nch * c_, np.float64)  # (touched in training only)
        ab = at(a[scr_] + 2 * nch * c_ * 8, 2 * c_, ct)
        if training:
            lo, hi = my_share(nch)
            for k in range(lo, hi):
                _chunk_moments(x, k * per, min(n_, (k + 1) * per), c_, s_, cp,
                               pm[2 * k * c_:(2 * k + 1) * c_],
                               pm[(2 * k + 1) * c_:(2 * k + 2) * c_])
            barrier()
        c0, c1 = my_share(c_)
        for c in range(c0, c1):
            if training:  # the chunks merged in order
                mu, m2, cnt = 0.0, 0.0, 0
                for k in range(nch):
                    mu, m2, cnt = chan(mu, m2, cnt, pm[2 * k * c_ + c], pm[(2 * k + 1) * c_ + c],
                                       (min(n_, (k + 1) * per) - k * per) * s_)
                mean[c] = mu
                var[c] = m2 / cnt
            ab[c] = cp[1] / np.sqrt(var[c] + cp[0]) * w[c]
            ab[c_ + c] = b[c] - mean[c] * ab[c]
        barrier()
        lo, hi = my_share(n_ * c_)
        for q in range(lo, hi):  # y in memory order: the rows (n, c) streamed
            c = q % c_
            store_affine(x[q * s_:(q + 1) * s_], ab[c], ab[c_ + c], False, y, q * s_, cp[1])

    return cfunc(entry)


def build_cf_bwd(compute, x, dy):
    ct, xt, dyt = storage_type(compute), storage_type(x), storage_type(dy)
    half = "int16" in (x, dy)
    csize = np.dtype(ct).itemsize
    size = len(CF_BWD)
    (dy_, x_, w_, mean_, var_, dx_, dw_, db_, cp_, scr_, loc_, lb_, n_s, c_s, s_s,
     tr_) = CF_BWD.slots("dy", "x", "weight", "mean", "var", "dx", "dweight", "dbias", "consts",
                         "scratch", "local", "local_bytes", "n", "c", "s", "training")

    def entry(block):
        a = ints(block, size)
        n_, c_, s_, training = a[n_s], a[c_s], a[s_s], a[tr_] != 0
        total = n_ * c_ * s_
        dy, x, dx = at(a[dy_], total, dyt), at(a[x_], total, xt), at(a[dx_], total, xt)
        w, cp = at(a[w_], c_, ct), at(a[cp_], 3, ct)
        dw, db = at(a[dw_], c_, ct), at(a[db_], c_, ct)
        mean, var = at(a[mean_], c_, ct), at(a[var_], c_, ct)
        if half:
            k = n_ * s_ if n_ * s_ <= KEEP else BLOCK
            mine = at(a[loc_] + thread_id() * a[lb_], 2 * k, ct)
            lo, hi = my_share(c_)
            for c in range(lo, hi):
                _bwd_channel(dy, x, w, mean, var, dx, dw, db, c, n_, c_, s_, cp, training,
                             mine[:k], mine[k:])
            return
        # scratch: per channel mean, rstd, the means of w·dy and w·dy·x̂ (4·C); per chunk
        # Σdy, Σdy·x̂ per channel (2·chunks·C)
        per, nch = _chunks(n_)
        co = at(a[scr_], 4 * c_, ct)
        ps = at(a[scr_] + 4 * c_ * csize, 2 * nch * c_, ct)
        c0, c1 = my_share(c_)
        for c in range(c0, c1):
            co[c], co[c_ + c] = mean[c], cp[1] / np.sqrt(var[c] + cp[0])
        barrier()
        lo, hi = my_share(nch)
        for k in range(lo, hi):
            _chunk_grad_sums(dy, x, k * per, min(n_, (k + 1) * per), c_, s_, co, cp,
                             ps[2 * k * c_:(2 * k + 1) * c_],
                             ps[(2 * k + 1) * c_:(2 * k + 2) * c_])
        barrier()
        for c in range(c0, c1):
            s1, s2 = ps[c], ps[c_ + c]
            for k in range(1, nch):
                s1 += ps[2 * k * c_ + c]
                s2 += ps[(2 * k + 1) * c_ + c]
            db[c], dw[c] = s1, s2
            co[2 * c_ + c], co[3 * c_ + c] = cp[2], cp[2]  # zero: the statistics are constants
            if training:
                co[2 * c_ + c] = w[c] * s1 / cp.dtype.type(n_ * s_)
                co[3 * c_ + c] = w[c] * s2 / cp.dtype.type(n_ * s_)
        barrier()
        lo, hi = my_share(n_ * c_)
        for q in range(lo, hi):  # dx in memory order
            c = q % c_
            o = q * s_
            store_dnorm(dy[o:o + s_], x[o:o + s_], co[c], co[c_ + c], w[c], co[2 * c_ + c],
                        co[3 * c_ + c], dx, o)

    return cfunc(entry)


# --- channels last --------------------------------------------------------------------------------


def build_cl_fwd(compute, x):
    ct, xt = storage_type(compute), storage_type(x)
    size = len(CL_FWD)
    x_, w_, b_, y_, mean_, var_, cp_, scr_, loc_, lb_, m_s, c_s, rows_, tr_ = CL_FWD.slots(
        "x", "weight", "bias", "y", "mean", "var", "consts", "scratch", "local", "local_bytes",
        "m", "c", "rows", "training")

    def entry(block):
        a = ints(block, size)
        m_, c_, rows, training = a[m_s], a[c_s], a[rows_], a[tr_] != 0
        x, y = at(a[x_], m_ * c_, xt), at(a[y_], m_ * c_, xt)
        w, b, cp = at(a[w_], c_, ct), at(a[b_], c_, ct), at(a[cp_], 3, ct)
        mean, var = at(a[mean_], c_, ct), at(a[var_], c_, ct)
        nblk = (m_ + rows - 1) // rows
        nsp = (nblk + SPAN - 1) // SPAN
        # scratch: the spans' moments (2·spans·C float64), a and sh (2·C); per thread the
        # block's moments (2·C float64) and block sums (3·C)
        pieces = at(a[scr_], 2 * nsp * c_, np.float64)
        ab = at(a[scr_] + 2 * nsp * c_ * 8, 2 * c_, ct)
        if training:
            mine = a[loc_] + thread_id() * a[lb_]
            bm, scr = at(mine, 2 * c_, np.float64), at(mine + 2 * c_ * 8, 3 * c_, ct)
            lo, hi = my_share(nsp)
            for j in range(lo, hi):
                pmean, pm2 = pieces[2 * j * c_:(2 * j + 1) * c_], \
                    pieces[(2 * j + 1) * c_:(2 * j + 2) * c_]
                cnt = 0
                for bi in range(j * SPAN, min(nblk, (j + 1) * SPAN)):
                    r0 = bi * rows
                    nr = min(m_, r0 + rows) - r0
                    cl.cl_block_moments(x, r0 * c_, nr, c_, c_, cp, scr, bm[:c_], bm[c_:])
                    cnt = cl.chan_row(pmean, pm2, cnt, bm[:c_], bm[c_:], nr)
            barrier()
        c0, c1 = my_share(c_)
        for c in range(c0, c1):
            if training:  # the spans merged in order, channel by channel
                mu, m2, cnt = 0.0, 0.0, 0
                for j in range(nsp):
                    k = min(m_, (j + 1) * SPAN * rows) - j * SPAN * rows
                    mu, m2, cnt = chan(mu, m2, cnt, pieces[2 * j * c_ + c],
                                       pieces[(2 * j + 1) * c_ + c], k)
                mean[c] = mu
                var[c] = m2 / cnt
            ab[c] = cp[1] / np.sqrt(var[c] + cp[0]) * w[c]
            ab[c_ + c] = b[c] - mean[c] * ab[c]
        barrier()
        lo, hi = my_share(m_)
        cl.apply_rows(x, y, lo * c_, hi - lo, c_, ab[:c_], ab[c_:], False, cp)

    return cfunc(entry)


def build_cl_bwd(compute, x):
    ct, xt = storage_type(compute), storage_type(x)
    csize = np.dtype(ct).itemsize
    size = len(CL_BWD)
    (dy_, x_, w_, mean_, var_, dx_, dw_, db_, cp_, scr_, m_s, c_s, rows_, tr_) = CL_BWD.slots(
        "dy", "x", "weight", "mean", "var", "dx", "dweight", "dbias", "consts", "scratch", "m",
        "c", "rows", "training")

    def entry(block):
        a = ints(block, size)
        m_, c_, rows, training = a[m_s], a[c_s], a[rows_], a[tr_] != 0
        dy, x, dx = at(a[dy_], m_ * c_, xt), at(a[x_], m_ * c_, xt), at(a[dx_], m_ * c_, xt)
        w, cp = at(a[w_], c_, ct), at(a[cp_], 3, ct)
        mean, var = at(a[mean_], c_, ct), at(a[var_], c_, ct)
        dw, db = at(a[dw_], c_, ct), at(a[db_], c_, ct)
        # scratch: m, r, rw, k0, k2 per channel (5·C); per span Σg, Σg·(x − m) (2·spans·C)
        co = at(a[scr_], 5 * c_, ct)
        m, r, rw, k0, k2 = co[:c_], co[c_:2 * c_], co[2 * c_:3 * c_], co[3 * c_:4 * c_], \
            co[4 * c_:]
        span = SPAN * rows
        nsp = (m_ + span - 1) // span
        ps = at(a[scr_] + 5 * c_ * csize, 2 * nsp * c_, ct)
        if thread_id() == 0:
            cl.grad_coefs(mean, var, 0, 1, 0, w, cp, m, r, rw)
        barrier()
        lo, hi = my_share(nsp)
        for j in range(lo, hi):
            cl.cl_grad_sums(dy, x, j * span * c_, min(m_, (j + 1) * span) - j * span, c_, m, rw,
                            w, False, cp, ps[2 * j * c_:(2 * j + 1) * c_],
                            ps[(2 * j + 1) * c_:(2 * j + 2) * c_])
        barrier()
        count = cp.dtype.type(m_)
        c0, c1 = my_share(c_)
        for c in range(c0, c1):
            s1, s2 = ps[c], ps[c_ + c]
            for j in range(1, nsp):
                s1 += ps[2 * j * c_ + c]
                s2 += ps[(2 * j + 1) * c_ + c]
            db[c] = s1
            dw[c] = s2 * r[c]  # Σ g·x̂
            # the means over the channel of w·dy and w·dy·x̂; zero when the statistics are
            # constants
            k0[c] = -r[c] * (w[c] * db[c] / count) if training else cp[2]
            k2[c] = -r[c] * r[c] * (w[c] * dw[c] / count) if training else cp[2]
        barrier()
        lo, hi = my_share(m_)
        cl.dx_rows(dy, x, dx, lo * c_, hi - lo, c_, m, rw, w, k0, k2, False, cp)

    return cfunc(entry)
