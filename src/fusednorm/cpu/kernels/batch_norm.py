"""BatchNorm over channels-first input, in numba (channels last: `channels_last.py`).

The numba half of `cpu/batch_norm.py` (the launchers, the argument layouts and the contract).
Every dtype is read in place in memory order: a channel's rows are C·S apart, and walking one
channel at a time strode across pages (up to 2.5x slower). Each kernel is one numba function
(see `layer_norm.py` for why).

- Forward: N is split by its size alone into up to `CHUNKS` chunks of samples; a chunk's rows
  (n, c) are read in order, two at a time, block by block (`BLOCK` elements: the deviations'
  sums about a pilot value, `FAR`), each block merged into its channel's moments in float64
  (`chan`);
  the chunks are merged in order per channel. Then y over all rows in memory order.
- Backward: per chunk and channel Σdy and Σdy·(x - mean), the chunks added in order, then dx
  over all rows in memory order.

Every sum is in an order fixed by the shape: deterministic, whatever the threads.
"""

from __future__ import annotations

import numpy as np

from fusednorm.cpu._channels import BLOCK
from fusednorm.cpu.batch_norm import CF_BWD as BWD
from fusednorm.cpu.batch_norm import CF_FWD as FWD
from fusednorm.cpu.batch_norm import CHUNKS
from fusednorm.cpu.kernels._channels import FAR, chan, moments, pilot
from fusednorm.cpu.kernels._compile import cfunc
from fusednorm.cpu.kernels._dtypes import (
    at,
    barrier,
    floats,
    idiv,
    imin,
    imod,
    ints,
    load,
    my_share,
    radd,
    rfma,
    storage_type,
    store,
    view,
)


def build_fwd(compute, x, params):
    """The forward kernel for x stored as `x`, weight and bias as `params`, computing in
    `compute`."""
    ct, xt, pt = storage_type(compute), storage_type(x), storage_type(params)
    size, eps_ = len(FWD), FWD.slot("eps")
    x_, w_, b_, y_, mean_, var_, scr_ = FWD.slots(
        "x", "weight", "bias", "y", "mean", "var", "scratch")
    n_s, c_s, s_s, tr_ = FWD.slots("n", "c", "s", "training")

    def entry(block):
        a, f = ints(block, size), floats(block, size)
        n_, c_, s_, training = a[n_s], a[c_s], a[s_s], a[tr_] != 0
        eps, one = ct(f[eps_]), ct(1)
        x, y = at(a[x_], n_ * c_ * s_, xt), at(a[y_], n_ * c_ * s_, xt)
        w, b = at(a[w_], c_, pt), at(a[b_], c_, pt)
        mean, var = at(a[mean_], c_, ct), at(a[var_], c_, ct)
        per = idiv(n_ + CHUNKS - 1, CHUNKS)  # samples per chunk
        nch = idiv(n_ + per - 1, per)
        # scratch: the chunks' moments per channel (2·chunks·C float64); the scales and shifts
        pieces = at(a[scr_], 2 * nch * c_, np.float64)
        coef = at(a[scr_] + 16 * nch * c_, 2 * c_, ct)
        if training:
            lo, hi = my_share(nch)
            for k in range(lo, hi):
                for n in range(k * per, imin(n_, (k + 1) * per)):
                    # two channels' rows at a time (an odd C's last one twice): a short row's
                    # cost is its chain of latencies (horizontal sums, then the float64 merge),
                    # which two independent rows overlap (S = 256, one thread: 53 -> 47 µs)
                    for c in range(0, c_, 2):
                        e = imin(c + 1, c_ - 1)
                        i, i2 = k * c_ + c, k * c_ + e
                        cnt = (n - k * per) * s_
                        mu, m2, mu2, m22 = (pieces[i], pieces[nch * c_ + i], pieces[i2],
                                            pieces[nch * c_ + i2])
                        row, row2 = view(x, (n * c_ + c) * s_, s_), view(x, (n * c_ + e) * s_, s_)
                        for o in range(0, s_, BLOCK):
                            kb = imin(s_ - o, BLOCK)
                            blk, blk2 = view(row, o, kb), view(row2, o, kb)
                            # the deviations' sums about pilot values, read once (again about
                            # a block's mean where its pilot lies far: `FAR`)
                            mid = idiv(kb, 2)
                            bm = pilot(load(blk, 0), load(blk, mid), load(blk, kb - 1))
                            bm_2 = pilot(load(blk2, 0), load(blk2, mid), load(blk2, kb - 1))
                            for _ in range(3):  # (twice at most, in practice)
                                d, d2 = load(blk, 0) - bm, load(blk2, 0) - bm_2
                                sd, ss, sd2, ss2 = d, d * d, d2, d2 * d2
                                for j in range(1, kb):
                                    d, d2 = load(blk, j) - bm, load(blk2, j) - bm_2
                                    sd, sd2 = radd(sd, d), radd(sd2, d2)
                                    ss, ss2 = rfma(ss, d, d), rfma(ss2, d2, d2)
                                # (False for inf and NaN)
                                far = sd * sd > FAR * ct(kb) * ss
                                far2 = sd2 * sd2 > FAR * ct(kb) * ss2
                                if not (far or far2):
                                    break
                                if far:
                                    bm += sd / ct(kb)
                                if far2:
                                    bm_2 += sd2 / ct(kb)
                            bmean, bm2 = moments(bm, sd, ss, kb)
                            bmean2, bm22 = moments(bm_2, sd2, ss2, kb)
                            mu2, m22, _ = chan(mu2, m22, cnt, bmean2, bm22, kb)
                            mu, m2, cnt = chan(mu, m2, cnt, bmean, bm2, kb)
                        pieces[i2], pieces[nch * c_ + i2] = mu2, m22
                        pieces[i], pieces[nch * c_ + i] = mu, m2
            barrier()
        c0, c1 = my_share(c_)
        for c in range(c0, c1):
            if training:  # the chunks merged in order
                mu, m2, cnt = 0.0, 0.0, 0
                for k in range(nch):
                    mu, m2, cnt = chan(mu, m2, cnt, pieces[k * c_ + c],
                                       pieces[(nch + k) * c_ + c],
                                       (imin(n_, (k + 1) * per) - k * per) * s_)
                mean[c] = mu
                var[c] = m2 / cnt
            sc = one / np.sqrt(var[c] + eps) * load(w, c)
            coef[c], coef[c_ + c] = sc, load(b, c) - mean[c] * sc
        barrier()
        lo, hi = my_share(n_ * c_)
        for q in range(lo, hi):  # y in memory order, no fused multiply-add (as GroupNorm's)
            sc, sh = coef[imod(q, c_)], coef[c_ + imod(q, c_)]
            xs, ys = view(x, q * s_, s_), view(y, q * s_, s_)
            for j in range(s_):
                store(ys, j, load(xs, j) * sc + sh)

    return cfunc(entry)


def build_bwd(compute, x, params):
    """The backward kernel for x (and dy, dx) stored as `x`, weight and the parameters'
    gradients as `params`, computing in `compute`."""
    ct, xt, pt = storage_type(compute), storage_type(x), storage_type(params)
    csize = np.dtype(ct).itemsize
    size, eps_ = len(BWD), BWD.slot("eps")
    dy_, x_, w_, mean_, var_, dx_, dw_, db_, scr_ = BWD.slots(
        "dy", "x", "weight", "mean", "var", "dx", "dweight", "dbias", "scratch")
    n_s, c_s, s_s, tr_ = BWD.slots("n", "c", "s", "training")

    def entry(block):
        a, f = ints(block, size), floats(block, size)
        n_, c_, s_, training = a[n_s], a[c_s], a[s_s], a[tr_] != 0
        eps, one, zero = ct(f[eps_]), ct(1), ct(0)
        total = n_ * c_ * s_
        dy, x, dx = at(a[dy_], total, xt), at(a[x_], total, xt), at(a[dx_], total, xt)
        w = at(a[w_], c_, pt)
        mean, var = at(a[mean_], c_, ct), at(a[var_], c_, ct)
        dw, db = at(a[dw_], c_, pt), at(a[db_], c_, pt)
        per = idiv(n_ + CHUNKS - 1, CHUNKS)
        nch = idiv(n_ + per - 1, per)
        # scratch: per channel rstd, rstd·w, k0, k2 (4·C); per chunk and channel Σdy and
        # Σdy·(x - mean) (2·chunks·C)
        co = at(a[scr_], 4 * c_, ct)
        pieces = at(a[scr_] + 4 * c_ * csize, 2 * nch * c_, ct)
        c0, c1 = my_share(c_)
        for c in range(c0, c1):
            co[c] = one / np.sqrt(var[c] + eps)
            co[c_ + c] = co[c] * load(w, c)
        barrier()
        lo, hi = my_share(nch)
        for k in range(lo, hi):
            for n in range(k * per, imin(n_, (k + 1) * per)):
                for c in range(c_):
                    o, mu = (n * c_ + c) * s_, mean[c]
                    xs, gs = view(x, o, s_), view(dy, o, s_)
                    s1, s2 = zero, zero
                    for j in range(s_):
                        g = load(gs, j)
                        s1 = radd(s1, g)
                        s2 = rfma(s2, g, load(xs, j) - mu)
                    i = 2 * k * c_ + c
                    if n == k * per:
                        pieces[i], pieces[i + c_] = s1, s2
                    else:
                        pieces[i] += s1
                        pieces[i + c_] += s2
        barrier()
        count = ct(n_ * s_)
        for c in range(c0, c1):
            s1, s2 = pieces[c], pieces[c_ + c]
            for k in range(1, nch):
                s1 += pieces[2 * k * c_ + c]
                s2 += pieces[(2 * k + 1) * c_ + c]
            r, wc = co[c], load(w, c)
            s2 *= r
            store(db, c, s1)  # Σdy, Σdy·x̂, rounded once to the parameters' dtype
            store(dw, c, s2)
            # dx = rstd·(w·dy - mean(w·dy) - x̂·mean(w·dy·x̂)) = rstd·w·dy + k0 + (x - mean)·k2,
            # the means zero when the statistics are given (they do not depend on x)
            co[2 * c_ + c] = -r * (wc * s1 / count) if training else zero
            co[3 * c_ + c] = -r * r * (wc * s2 / count) if training else zero
        barrier()
        lo, hi = my_share(n_ * c_)
        for q in range(lo, hi):  # dx in memory order
            c = imod(q, c_)
            mu, rw, k0, k2 = mean[c], co[c_ + c], co[2 * c_ + c], co[3 * c_ + c]
            xs, gs, ds = view(x, q * s_, s_), view(dy, q * s_, s_), view(dx, q * s_, s_)
            for j in range(s_):
                store(ds, j, rw * load(gs, j) + (k0 + (load(xs, j) - mu) * k2))

    return cfunc(entry)
