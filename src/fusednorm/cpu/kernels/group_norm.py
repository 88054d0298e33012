"""GroupNorm and InstanceNorm in numba, channels first and channels last.

The numba half of `cpu/group_norm.py` (the launchers, the argument layouts and the contract).

Channels first: one task per (n, g), whose group is one contiguous run of C/G·S elements.
float32 and bfloat16 groups are read where they lie (`_fwd_direct`, `_bwd_direct`): a bfloat16
value converts by a shift, cheaper to redo in each sweep than to copy. float16 (and SiLU's
backward) is read in blocks of `BLOCK` elements that may span channels (`_fwd_group`,
`_bwd_group`): sweep 1 takes each block's moments while it is in L1 and merges the blocks in
order with Chan's formula, sweep 2 normalizes each block channel segment by channel segment; a
group of up to `KEEP` elements keeps its conversion in scratch between the sweeps.

Channels last: the rows are read in blocks of `rows` = 4096 // C positions (a shape-only split);
a block's per-channel sums give per-(n, block, group) moments merged in float64 in block order
(`_cl_blocks.py`). GroupNorm runs one task per sample when there are samples for every thread
(the sample stays in L2 between statistics and normalization), else tasks per (n, block): both
use the same block functions in the same order, so the same bits.

Every sum is in an order fixed by the shape: the results are bitwise deterministic, whatever
the threads, and a sample's results do not depend on the batch.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from fusednorm.cpu.group_norm import CF_BWD, CF_FWD, CL_BWD, CL_FWD
from fusednorm.cpu.kernels import _cl_blocks as cl
from fusednorm.cpu.kernels._channels import (
    BLOCK,
    KEEP,
    chan,
    dest,
    grad_sums,
    load_grad_sums,
    load_moments,
    run_moments,
    silu_grad,
    store_affine,
    store_dnorm,
    sum_over_n,
)
from fusednorm.cpu.kernels._compile import cfunc
from fusednorm.cpu.kernels._dtypes import (
    OPTS,
    at,
    barrier,
    ints,
    my_share,
    row_view,
    storage_type,
    thread_id,
)

# --- channels first: one task per (n, g) ---------------------------------------------------------


@njit(**OPTS)
def _fwd_group(x, w, b, y, mean, var, t, c_, s_, groups, cp, silu, buf):
    """Group t = (n, g), blocked: its moments (sweep 1), then y (sweep 2)."""
    cg = c_ // groups
    size = cg * s_
    keep = size <= KEEP
    base, c0 = t * size, (t % groups) * cg
    mu, m2, cnt = 0.0, 0.0, 0
    for o in range(0, size, BLOCK):
        k = min(BLOCK, size - o)
        q = o if keep else 0
        bm, bm2 = load_moments(x, base + o, k, buf[q:q + k], cp)
        mu, m2, cnt = chan(mu, m2, cnt, bm, bm2, k) if o else (bm, bm2, k)
    mean[t] = mu
    var[t] = m2 / size
    m, r = mean[t], cp[1] / np.sqrt(var[t] + cp[0])  # rounded as the backward will read them
    for o in range(0, size, BLOCK):
        k = min(BLOCK, size - o)
        if keep:
            xs = dest(x[base + o:base + o + k], 0, k, buf[o:o + k])  # x, or its kept copy
        else:
            xs = row_view(x, base + o, k, buf)
        j = o
        while j < o + k:  # the block's channel segments
            ci = j // s_
            e = min(o + k, (ci + 1) * s_)
            a = r * w[c0 + ci]
            store_affine(xs[j - o:e - o], a, b[c0 + ci] - m * a, silu, y, base + j, cp[1])
            j = e


@njit(**OPTS)
def _fwd_direct(xs, w, b, y, mean, var, t, c0, cg, s_, cp, silu):
    """Group t read where it lies (xs: its float or bfloat16 run): moments, then y channel by
    channel."""
    size = cg * s_
    mu, m2 = run_moments(xs, cp)
    mean[t] = mu
    var[t] = m2 / size
    m, r = mean[t], cp[1] / np.sqrt(var[t] + cp[0])  # rounded as the backward will read them
    for ci in range(cg):
        a = r * w[c0 + ci]
        store_affine(xs[ci * s_:(ci + 1) * s_], a, b[c0 + ci] - m * a, silu, y,
                     t * size + ci * s_, cp[1])


def build_cf_fwd(compute, x):
    ct, xt = storage_type(compute), storage_type(x)
    blocked = x == "int16"  # float16: converted once into scratch, not per sweep
    size = len(CF_FWD)
    x_, w_, b_, y_, mean_, var_, cp_, loc_, lb_, n_s, c_s, s_s, g_s, silu_ = CF_FWD.slots(
        "x", "weight", "bias", "y", "mean", "var", "consts", "local", "local_bytes", "n", "c",
        "s", "groups", "silu")


    def entry(block):
        a = ints(block, size)
        n_, c_, s_, groups = a[n_s], a[c_s], a[s_s], a[g_s]
        total, silu = n_ * c_ * s_, a[silu_] != 0
        x, y = at(a[x_], total, xt), at(a[y_], total, xt)
        w, b, cp = at(a[w_], c_, ct), at(a[b_], c_, ct), at(a[cp_], 3, ct)
        mean, var = at(a[mean_], n_ * groups, ct), at(a[var_], n_ * groups, ct)
        cg = c_ // groups
        kept = cg * s_ if cg * s_ <= KEEP else BLOCK
        lo, hi = my_share(n_ * groups)
        if blocked:
            buf = at(a[loc_] + thread_id() * a[lb_], kept, ct)
            for t in range(lo, hi):
                _fwd_group(x, w, b, y, mean, var, t, c_, s_, groups, cp, silu, buf)
        else:
            for t in range(lo, hi):
                _fwd_direct(x[t * cg * s_:(t + 1) * cg * s_], w, b, y, mean, var, t,
                            (t % groups) * cg, cg, s_, cp, silu)

    return cfunc(entry)


@njit(**OPTS)
def _group_grad_means(w, c0, sdy, sdyx, size, cp):
    """The group's means of w·dy and w·dy·x̂ from its channels' Σg, Σg·x̂ (sdy, sdyx: the
    group's cg entries; weights from channel c0), in channel order."""
    gs, gsx = cp[2], cp[2]
    for ci in range(sdy.size):
        gs += w[c0 + ci] * sdy[ci]
        gsx += w[c0 + ci] * sdyx[ci]
    return gs / cp.dtype.type(size), gsx / cp.dtype.type(size)


@njit(**OPTS)
def _bwd_group(dy, x, w, b, mean, var, dx, sdy, sdyx, t, c_, s_, groups, cp, silu, xb, gb,
               db):
    """Backward of group t, blocked: sweep 0 sums Σg, Σg·x̂ per channel, sweep 1 writes dx,
    block by block and, within a block, channel segment by segment. xb and gb keep converted x
    and g between the sweeps (g = dy·silu'(z), else dy); db takes a block of converted dy when
    silu (never aliasing gb, so the silu loop vectorizes)."""
    cg = c_ // groups
    size = cg * s_
    keep = size <= KEEP
    base, c0 = t * size, (t % groups) * cg
    p0 = (t // groups) * c_ + c0  # the group's first (n, c) in sdy, sdyx
    mu, r = mean[t], cp[1] / np.sqrt(var[t] + cp[0])
    zero = cp[2]
    for ci in range(cg):
        sdy[p0 + ci] = zero
        sdyx[p0 + ci] = zero
    mg, mgx = zero, zero
    for sweep in range(2):
        if sweep == 1:
            mg, mgx = _group_grad_means(w, c0, sdy[p0:p0 + cg], sdyx[p0:p0 + cg], size, cp)
        fresh = sweep == 0 or not keep  # x and g are (re)computed, not kept
        for o in range(0, size, BLOCK):
            e1 = min(o + BLOCK, size)
            j = o
            while j < e1:  # the block's channel segments [j, e)
                ci = j // s_
                e = min(e1, (ci + 1) * s_)
                c, k, q = c0 + ci, e - j, j if keep else j - o
                xq, gq = xb[q:q + k], gb[q:q + k]
                a1, a2 = zero, zero
                if fresh and silu:
                    xs = row_view(x, base + j, k, xq)
                    g = row_view(dy, base + j, k, db[j - o:e - o])
                    g = silu_grad(g, xs, mu, r, w[c], b[c], gq, cp)
                    if sweep == 0:
                        a1, a2 = grad_sums(g, xs, mu, r, cp)
                elif sweep == 0:
                    g, xs, a1, a2 = load_grad_sums(dy, x, base + j, k, gq, xq, mu, r, cp)
                elif fresh:
                    xs, g = row_view(x, base + j, k, xq), row_view(dy, base + j, k, gq)
                else:
                    xs = dest(x[base + j:base + j + k], 0, k, xq)
                    g = gq if silu else dest(dy[base + j:base + j + k], 0, k, gq)
                if sweep == 0:
                    sdy[p0 + ci] += a1
                    sdyx[p0 + ci] += a2
                else:
                    store_dnorm(g, xs, mu, r, w[c], mg, mgx, dx, base + j)
                j = e


@njit(**OPTS)
def _bwd_direct(g, xs, w, mean, var, dx, sdy, sdyx, t, c0, cg, s_, cp):
    """Backward of group t without SiLU, dy and x read where they lie (g, xs: the group's float
    or bfloat16 runs, cheaper to read twice than to copy): Σg, Σg·x̂ per channel, then dx."""
    mu, r = mean[t], cp[1] / np.sqrt(var[t] + cp[0])
    for ci in range(cg):
        sdy[ci], sdyx[ci] = grad_sums(g[ci * s_:(ci + 1) * s_], xs[ci * s_:(ci + 1) * s_], mu,
                                      r, cp)
    mg, mgx = _group_grad_means(w, c0, sdy, sdyx, cg * s_, cp)
    for ci in range(cg):
        lo, hi = ci * s_, (ci + 1) * s_
        store_dnorm(g[lo:hi], xs[lo:hi], mu, r, w[c0 + ci], mg, mgx, dx, t * cg * s_ + lo)


def build_cf_bwd(compute, x, dy):
    ct, xt, dyt = storage_type(compute), storage_type(x), storage_type(dy)
    halves = "int16" in (x, dy)  # float16 goes through the blocked path
    size = len(CF_BWD)
    (dy_, x_, w_, b_, mean_, var_, dx_, dw_, db_, cp_, scr_, loc_, lb_, n_s, c_s, s_s, g_s,
     silu_) = CF_BWD.slots("dy", "x", "weight", "bias", "mean", "var", "dx", "dweight", "dbias",
                           "consts", "scratch", "local", "local_bytes", "n", "c", "s", "groups",
                           "silu")


    def entry(block):
        a = ints(block, size)
        n_, c_, s_, groups = a[n_s], a[c_s], a[s_s], a[g_s]
        total, silu, nc = n_ * c_ * s_, a[silu_] != 0, n_ * c_
        dy, x, dx = at(a[dy_], total, dyt), at(a[x_], total, xt), at(a[dx_], total, xt)
        w, b, cp = at(a[w_], c_, ct), at(a[b_], c_, ct), at(a[cp_], 3, ct)
        mean, var = at(a[mean_], n_ * groups, ct), at(a[var_], n_ * groups, ct)
        cg = c_ // groups
        # scratch: Σg, Σg·x̂ per (n, c); per thread the kept x and g, and a block of dy
        sums = at(a[scr_], 2 * nc, ct)
        sdy, sdyx = sums[:nc], sums[nc:]
        kept = cg * s_ if cg * s_ <= KEEP else BLOCK
        mine = at(a[loc_] + thread_id() * a[lb_], 2 * kept + BLOCK, ct)
        xb, gb, dbk = mine[:kept], mine[kept:2 * kept], mine[2 * kept:]
        lo, hi = my_share(n_ * groups)
        for t in range(lo, hi):
            if halves or silu:
                _bwd_group(dy, x, w, b, mean, var, dx, sdy, sdyx, t, c_, s_, groups, cp, silu,
                           xb, gb, dbk)
            else:
                p0, o = (t // groups) * c_ + (t % groups) * cg, t * cg * s_
                _bwd_direct(dy[o:o + cg * s_], x[o:o + cg * s_], w, mean, var, dx,
                            sdy[p0:p0 + cg], sdyx[p0:p0 + cg], t, (t % groups) * cg, cg, s_,
                            cp)
        barrier()  # every (n, c) sum is in; each thread adds up its channels over n in order
        c0, c1 = my_share(c_)
        sum_over_n(sdy, n_, c_, c0, c1, at(a[db_], c_, ct))
        sum_over_n(sdyx, n_, c_, c0, c1, at(a[dw_], c_, ct))

    return cfunc(entry)


# --- channels last --------------------------------------------------------------------------------


def build_cl_fwd(compute, x):
    ct, xt = storage_type(compute), storage_type(x)
    size = len(CL_FWD)
    (x_, w_, b_, y_, mean_, var_, cp_, scr_, loc_, lb_, n_s, c_s, s_s, g_s, rows_, silu_,
     by_sample_) = CL_FWD.slots("x", "weight", "bias", "y", "mean", "var", "consts", "scratch",
                                "local", "local_bytes", "n", "c", "s", "groups", "rows", "silu",
                                "by_sample")

    def entry(block):
        a = ints(block, size)
        n_, c_, s_, groups, rows = a[n_s], a[c_s], a[s_s], a[g_s], a[rows_]
        silu = a[silu_] != 0
        x, y = at(a[x_], n_ * s_ * c_, xt), at(a[y_], n_ * s_ * c_, xt)
        w, b, cp = at(a[w_], c_, ct), at(a[b_], c_, ct), at(a[cp_], 3, ct)
        mean, var = at(a[mean_], n_ * groups, ct), at(a[var_], n_ * groups, ct)
        nblk = (s_ + rows - 1) // rows
        cg = c_ // groups
        if a[by_sample_] != 0:  # a task per sample: its slab stays in L2 for the normalization
            # per thread: the block's and the merged moments (4G float64); block sums (3C),
            # a and sh (2C)
            mine = a[loc_] + thread_id() * a[lb_]
            mg = at(mine, 4 * groups, np.float64)
            scr = at(mine + 4 * groups * 8, 5 * c_, ct)
            ab, sh = scr[3 * c_:4 * c_], scr[4 * c_:]
            lo, hi = my_share(n_)
            for n in range(lo, hi):
                cnt = 0
                for bi in range(nblk):  # merged as they come: the same steps as merge_sample
                    r0 = bi * rows
                    nr = min(s_, r0 + rows) - r0
                    cl.cl_block_moments(x, (n * s_ + r0) * c_, nr, c_, groups, cp, scr,
                                        mg[:groups], mg[groups:2 * groups])
                    cnt = cl.chan_row(mg[2 * groups:3 * groups], mg[3 * groups:], cnt,
                                      mg[:groups], mg[groups:2 * groups], nr * cg)
                for g in range(groups):
                    mean[n * groups + g] = mg[2 * groups + g]
                    var[n * groups + g] = mg[3 * groups + g] / cnt
                cl.coefs(mean, var, groups, cg, n, w, b, cp, ab, sh)
                cl.apply_rows(x, y, n * s_ * c_, s_, c_, ab, sh, silu, cp)
            return
        # tasks per (n, block): shared piece moments (2·N·nblk·G float64) and coefficients
        # (2·N·C); per thread merge scratch (2G float64) and block sums (3C)
        ntask = n_ * nblk
        pieces = at(a[scr_], 2 * ntask * groups, np.float64)
        pmean, pm2 = pieces[:ntask * groups], pieces[ntask * groups:]
        ab = at(a[scr_] + 2 * ntask * groups * 8, 2 * n_ * c_, ct)
        mine = a[loc_] + thread_id() * a[lb_]
        mg, scr = at(mine, 2 * groups, np.float64), at(mine + 2 * groups * 8, 3 * c_, ct)
        lo, hi = my_share(ntask)
        for k in range(lo, hi):
            n, r0 = k // nblk, (k % nblk) * rows
            cl.cl_block_moments(x, (n * s_ + r0) * c_, min(s_, r0 + rows) - r0, c_, groups, cp,
                                scr, pmean[k * groups:(k + 1) * groups],
                                pm2[k * groups:(k + 1) * groups])
        barrier()
        n0, n1 = my_share(n_)
        for n in range(n0, n1):
            cl.merge_sample(pmean, pm2, n, s_, c_, groups, rows, mean, var, mg[:groups],
                            mg[groups:])
            cl.coefs(mean, var, groups, cg, n, w, b, cp, ab[2 * n * c_:(2 * n + 1) * c_],
                     ab[(2 * n + 1) * c_:(2 * n + 2) * c_])
        barrier()
        for k in range(lo, hi):
            n, r0 = k // nblk, (k % nblk) * rows
            cl.apply_rows(x, y, (n * s_ + r0) * c_, min(s_, r0 + rows) - r0, c_,
                          ab[2 * n * c_:(2 * n + 1) * c_], ab[(2 * n + 1) * c_:(2 * n + 2) * c_],
                          silu, cp)

    return cfunc(entry)


def build_cl_bwd(compute, x):
    ct, xt = storage_type(compute), storage_type(x)
    csize = np.dtype(ct).itemsize
    size = len(CL_BWD)
    (dy_, x_, w_, b_, mean_, var_, dx_, dw_, db_, cp_, scr_, loc_, lb_, n_s, c_s, s_s, g_s,
     rows_, silu_, by_sample_) = CL_BWD.slots(
        "dy", "x", "weight", "bias", "mean", "var", "dx", "dweight", "dbias", "consts",
        "scratch", "local", "local_bytes", "n", "c", "s", "groups", "rows", "silu", "by_sample")

    def entry(block):
        a = ints(block, size)
        n_, c_, s_, groups, rows = a[n_s], a[c_s], a[s_s], a[g_s], a[rows_]
        silu, total = a[silu_] != 0, n_ * s_ * c_
        dy, x, dx = at(a[dy_], total, xt), at(a[x_], total, xt), at(a[dx_], total, xt)
        w, b, cp = at(a[w_], c_, ct), at(a[b_], c_, ct), at(a[cp_], 3, ct)
        mean, var = at(a[mean_], n_ * groups, ct), at(a[var_], n_ * groups, ct)
        cg = c_ // groups
        nblk = (s_ + rows - 1) // rows
        sums = at(a[scr_], 2 * n_ * c_, ct)  # Σg, Σg·x̂ per (n, c)
        sdy, sdyx = sums[:n_ * c_], sums[n_ * c_:]
        if a[by_sample_] != 0:
            scr = at(a[loc_] + thread_id() * a[lb_], 7 * c_, ct)
            m, r, rw = scr[:c_], scr[c_:2 * c_], scr[2 * c_:3 * c_]
            k0, k2 = scr[3 * c_:4 * c_], scr[4 * c_:5 * c_]
            s1, s2 = scr[5 * c_:6 * c_], scr[6 * c_:]
            lo, hi = my_share(n_)
            for n in range(lo, hi):
                cl.grad_coefs(mean, var, groups, cg, n, w, cp, m, r, rw)
                for bi in range(nblk):
                    r0 = bi * rows
                    cl.cl_grad_sums(dy, x, (n * s_ + r0) * c_, min(s_, r0 + rows) - r0, c_, m,
                                    rw, b, silu, cp, s1, s2)
                    cl.add_rows(sdy[n * c_:(n + 1) * c_], s1, bi == 0)
                    cl.add_rows(sdyx[n * c_:(n + 1) * c_], s2, bi == 0)
                cl.gn_dx_coefs(sdy, sdyx, n, c_, groups, s_, w, r, cp, k0, k2)
                cl.dx_rows(dy, x, dx, n * s_ * c_, s_, c_, m, rw, b, k0, k2, silu, cp)
        else:
            # shared: per sample m, r, rw, k0, k2 (5·N·C); per (n, block) Σg, Σg·x̂ (2·tasks·C)
            ntask = n_ * nblk
            co = at(a[scr_] + 2 * n_ * c_ * csize, 5 * n_ * c_, ct)
            ps = at(a[scr_] + 7 * n_ * c_ * csize, 2 * ntask * c_, ct)
            n0, n1 = my_share(n_)
            for n in range(n0, n1):
                o = 5 * n * c_
                cl.grad_coefs(mean, var, groups, cg, n, w, cp, co[o:o + c_],
                              co[o + c_:o + 2 * c_], co[o + 2 * c_:o + 3 * c_])
            barrier()
            lo, hi = my_share(ntask)
            for k in range(lo, hi):
                n, r0 = k // nblk, (k % nblk) * rows
                o = 5 * n * c_
                cl.cl_grad_sums(dy, x, (n * s_ + r0) * c_, min(s_, r0 + rows) - r0, c_,
                                co[o:o + c_], co[o + 2 * c_:o + 3 * c_], b, silu, cp,
                                ps[2 * k * c_:(2 * k + 1) * c_],
                                ps[(2 * k + 1) * c_:(2 * k + 2) * c_])
            barrier()
            for n in range(n0, n1):
                for bi in range(nblk):
                    k = n * nblk + bi
                    cl.add_rows(sdy[n * c_:(n + 1) * c_], ps[2 * k * c_:(2 * k + 1) * c_],
                                bi == 0)
                    cl.add_rows(sdyx[n * c_:(n + 1) * c_],
                                ps[(2 * k + 1) * c_:(2 * k + 2) * c_], bi == 0)
                o = 5 * n * c_
                cl.gn_dx_coefs(sdy, sdyx, n, c_, groups, s_, w, co[o + c_:o + 2 * c_], cp,
                               co[o + 3 * c_:o + 4 * c_], co[o + 4 * c_:o + 5 * c_])
            barrier()
            for k in range(lo, hi):
                n, r0 = k // nblk, (k % nblk) * rows
                o = 5 * n * c_
                cl.dx_rows(dy, x, dx, (n * s_ + r0) * c_, min(s_, r0 + rows) - r0, c_,
                           co[o:o + c_], co[o + 2 * c_:o + 3 * c_], b,
                           co[o + 3 * c_:o + 4 * c_], co[o + 4 * c_:o + 5 * c_], silu, cp)
        barrier()
        c0, c1 = my_share(c_)
        sum_over_n(sdy, n_, c_, c0, c1, at(a[db_], c_, ct))
        sum_over_n(sdyx, n_, c_, c0, c1, at(a[dw_], c_, ct))

    return cfunc(entry)
