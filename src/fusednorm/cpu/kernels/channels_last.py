"""Channel norms over channels-last input, in numba: GroupNorm, InstanceNorm and BatchNorm alike.

The numba half of `cpu/_channels.py` (the launch plan, the argument layouts). x is N samples of
S rows of C channels, normalized per (sample, group) of C/G channels; BatchNorm is the case of
one sample of all N·S rows with a group per channel (and, in eval mode, statistics given).

How the work is laid out, and why:
- A sample's rows are cut into spans of `rows` rows (about 128 KiB of float32: a task, and a
  piece of the statistics), from the shape alone. The loops run along
  channels (contiguous) row after row, so every per-channel sum is in row order and vectorizes
  across channels without reassociation.
- Forward, three steps: (0) each span's moments per channel, in one read of the span: the sums
  of the deviations from a pilot value, corrected as a provisional mean's (`moments`, float64),
  again about their mean where the pilot lies far from it; (1) per (sample, group), its
  channels' span moments merged span by span, channel by channel (`chan`, float64), then each
  channel's scale and shift; (2) y = x·scale + shift (SiLU fused), span by span.
- Backward: (0) per span, Σg and Σg·(x - mean) per channel (g = dy, or dy·silu'(z) with z
  recomputed from x); (1) per (sample, group), the spans added in order, then the means of w·g
  and w·g·x̂ over the group folded into two coefficients per channel; (2) dx span by span;
  then dweight and dbias per channel, the samples added in order.
- With samples for every thread (`by_sample`), a thread takes whole samples through all steps
  (the sample stays in cache from statistics to output); otherwise the threads share every step
  and barriers separate them. Either way the same sums in the same order: the results are the
  same bits for any thread count, and a sample's do not depend on the batch.
"""

from __future__ import annotations

import numpy as np

from fusednorm.cpu._channels import CL_BWD as BWD
from fusednorm.cpu._channels import CL_FWD as FWD
from fusednorm.cpu.kernels._channels import FAR, chan, dsilu, moments, pilot, silu
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
    storage_type,
    store,
    thread_id,
    view,
)


def build_fwd(compute, x, params, activation):
    """The forward kernel for x stored as `x`, weight and bias as `params`, computing in
    `compute`; activation "silu" or ""."""
    ct, xt, pt = storage_type(compute), storage_type(x), storage_type(params)
    act = activation == "silu"  # (a constant: numba prunes the branch it rules out)
    size, eps_ = len(FWD), FWD.slot("eps")
    x_, w_, b_, y_, mean_, var_, scr_, loc_ = FWD.slots(
        "x", "weight", "bias", "y", "mean", "var", "scratch", "local")
    n_s, c_s, s_s, g_s, rows_, lb_, tr_, bs_ = FWD.slots(
        "n", "c", "s", "groups", "rows", "local_bytes", "training", "by_sample")

    def entry(block):
        a, f = ints(block, size), floats(block, size)
        n_, c_, s_, groups, rows = a[n_s], a[c_s], a[s_s], a[g_s], a[rows_]
        training, by_sample = a[tr_] != 0, a[bs_] != 0
        eps, one, zero = ct(f[eps_]), ct(1), ct(0)
        x, y = at(a[x_], n_ * s_ * c_, xt), at(a[y_], n_ * s_ * c_, xt)
        w, b = at(a[w_], c_, pt), at(a[b_], c_, pt)
        mean, var = at(a[mean_], n_ * groups, ct), at(a[var_], n_ * groups, ct)
        cg = idiv(c_, groups)
        nsp = idiv(s_ + rows - 1, rows)
        # scratch: the spans' moments per channel (2·N·spans·C float64), then each channel's
        # scale and shift per sample (2·N·C); per thread a span's sums per channel (3·C)
        pieces = at(a[scr_], 2 * n_ * nsp * c_, np.float64)
        coef = at(a[scr_] + 16 * n_ * nsp * c_, 2 * n_ * c_, ct)
        mine = at(a[loc_] + thread_id() * a[lb_], 3 * c_, ct)
        cm, sd, ss = view(mine, 0, c_), view(mine, c_, c_), view(mine, 2 * c_, c_)
        s0, s1 = my_share(n_) if by_sample else (0, 1)
        for u in range(s0, s1):  # by sample: each of the thread's samples; else once
            for step in range(3):
                if step == 0 and not training:
                    continue  # (BatchNorm in eval mode: the statistics are given)
                if not by_sample and step > 0:
                    barrier()
                tasks = groups if step == 1 else nsp
                lo, hi = (u * tasks, (u + 1) * tasks) if by_sample else my_share(n_ * tasks)
                for t in range(lo, hi):
                    n = idiv(t, tasks)
                    if step == 1:  # group g of sample n: its pieces merged in order; the scales
                        g = imod(t, groups)
                        if training:
                            mu, m2, cnt = 0.0, 0.0, 0
                            for sp in range(nsp):
                                k = imin(s_, (sp + 1) * rows) - sp * rows
                                p = view(pieces, ((n * nsp + sp) * 2 * c_), 2 * c_)
                                for c in range(g * cg, (g + 1) * cg):
                                    mu, m2, cnt = chan(mu, m2, cnt, p[c], p[c_ + c], k)
                            mean[t] = mu
                            var[t] = m2 / cnt
                        m, r = mean[t], one / np.sqrt(var[t] + eps)  # as the backward reads
                        for c in range(g * cg, (g + 1) * cg):
                            rw = r * load(w, c)
                            coef[n * 2 * c_ + c] = rw
                            coef[n * 2 * c_ + c_ + c] = load(b, c) - m * rw
                        continue
                    r0 = imod(t, nsp) * rows
                    nr = imin(s_ - r0, rows)
                    xs = view(x, (n * s_ + r0) * c_, nr * c_)
                    if step == 2:  # y, row by row
                        ys = view(y, (n * s_ + r0) * c_, nr * c_)
                        sc, sh = view(coef, n * 2 * c_, c_), view(coef, n * 2 * c_ + c_, c_)
                        for q in range(nr):
                            xr, yr = view(xs, q * c_, c_), view(ys, q * c_, c_)
                            if act:
                                for c in range(c_):
                                    store(yr, c, silu(load(xr, c) * sc[c] + sh[c]))
                            else:
                                for c in range(c_):
                                    store(yr, c, load(xr, c) * sc[c] + sh[c])
                        continue
                    # step 0: the span's moments per channel, from the sums of the deviations
                    # from a pilot value, which `moments` corrects as a provisional mean's. The
                    # pilot: the median of the span's first, middle and last rows (0 if not
                    # finite), so that x is read once where torch's statistics read it once
                    # (the span's own mean first made it twice). Where a pilot falls far from
                    # its channel's mean (Σd² over 8x the deviations' sum of squares about the
                    # mean: rounding errors amplified 8x), the sums are taken again about the
                    # mean they give, as the exact two-pass would.
                    mid, last = idiv(nr, 2) * c_, (nr - 1) * c_
                    for c in range(c_):
                        cm[c] = pilot(load(xs, c), load(xs, mid + c), load(xs, last + c))
                    for _ in range(3):  # (twice at most, in practice)
                        for c in range(c_):
                            sd[c] = zero
                            ss[c] = zero
                        for q in range(nr):
                            xr = view(xs, q * c_, c_)
                            for c in range(c_):
                                d = load(xr, c) - cm[c]
                                sd[c] += d
                                ss[c] += d * d
                        far = False
                        for c in range(c_):
                            if sd[c] * sd[c] > FAR * ct(nr) * ss[c]:  # (False for inf, NaN)
                                far = True
                                cm[c] += sd[c] / ct(nr)
                        if not far:
                            break
                    p = view(pieces, t * 2 * c_, 2 * c_)
                    for c in range(c_):
                        p[c], p[c_ + c] = moments(cm[c], sd[c], ss[c], nr)

    return cfunc(entry)


def build_bwd(compute, x, params, activation):
    """The backward kernel for x (and dy, dx) stored as `x`, weight, bias and their gradients
    as `params`, computing in `compute`; activation "silu" or ""."""
    ct, xt, pt = storage_type(compute), storage_type(x), storage_type(params)
    act = activation == "silu"
    csize = np.dtype(ct).itemsize
    size, eps_ = len(BWD), BWD.slot("eps")
    dy_, x_, w_, b_, mean_, var_, dx_, dw_, db_, scr_, loc_ = BWD.slots(
        "dy", "x", "weight", "bias", "mean", "var", "dx", "dweight", "dbias", "scratch", "local")
    n_s, c_s, s_s, g_s, rows_, lb_, tr_, bs_ = BWD.slots(
        "n", "c", "s", "groups", "rows", "local_bytes", "training", "by_sample")

    def entry(block):
        a, f = ints(block, size), floats(block, size)
        n_, c_, s_, groups, rows = a[n_s], a[c_s], a[s_s], a[g_s], a[rows_]
        training, by_sample = a[tr_] != 0, a[bs_] != 0
        eps, one, zero = ct(f[eps_]), ct(1), ct(0)
        total = n_ * s_ * c_
        dy, x, dx = at(a[dy_], total, xt), at(a[x_], total, xt), at(a[dx_], total, xt)
        w, b = at(a[w_], c_, pt), at(a[b_], c_, pt)
        mean, var = at(a[mean_], n_ * groups, ct), at(a[var_], n_ * groups, ct)
        cg = idiv(c_, groups)
        nsp = idiv(s_ + rows - 1, rows)
        # scratch: per span Σg and Σg·(x - mean) per channel (2·N·spans·C); per sample and
        # channel Σg and Σg·x̂, then the dx coefficients k0, k2 (4·N·C); per thread the mean
        # and rstd·w of its sample's channels (2·C)
        pieces = at(a[scr_], 2 * n_ * nsp * c_, ct)
        sums = at(a[scr_] + 2 * n_ * nsp * c_ * csize, 4 * n_ * c_, ct)
        mine = at(a[loc_] + thread_id() * a[lb_], 2 * c_, ct)
        m, rw = view(mine, 0, c_), view(mine, c_, c_)
        have = -1  # the sample whose m and rw this thread holds
        s0, s1 = my_share(n_) if by_sample else (0, 1)
        for u in range(s0, s1):
            for step in range(3):
                if not by_sample and step > 0:
                    barrier()
                tasks = groups if step == 1 else nsp
                lo, hi = (u * tasks, (u + 1) * tasks) if by_sample else my_share(n_ * tasks)
                for t in range(lo, hi):
                    n = idiv(t, tasks)
                    if step == 1:  # group g of sample n: its channels' sums, then k0 and k2
                        g = imod(t, groups)
                        r = one / np.sqrt(var[t] + eps)
                        gs, gsx = zero, zero
                        for c in range(g * cg, (g + 1) * cg):
                            s1, s2 = zero, zero
                            for sp in range(nsp):
                                o = (n * nsp + sp) * 2 * c_ + c
                                s1 += pieces[o]
                                s2 += pieces[o + c_]
                            s2 *= r  # Σ g·x̂
                            sums[n * c_ + c], sums[(n_ + n) * c_ + c] = s1, s2
                            wc = load(w, c)
                            gs += wc * s1
                            gsx += wc * s2
                        # the means of w·g and w·g·x̂ over the group (none when the statistics
                        # are given: they do not depend on x)
                        cnt = ct(cg * s_)
                        k0 = -r * (gs / cnt) if training else zero
                        k2 = -r * r * (gsx / cnt) if training else zero
                        for c in range(g * cg, (g + 1) * cg):
                            sums[(2 * n_ + n) * c_ + c], sums[(3 * n_ + n) * c_ + c] = k0, k2
                        continue
                    if n != have:
                        for c in range(c_):
                            i = n * groups + idiv(c, cg)
                            m[c] = mean[i]
                            rw[c] = one / np.sqrt(var[i] + eps) * load(w, c)
                        have = n
                    r0 = imod(t, nsp) * rows
                    r1 = imin(s_, r0 + rows)
                    base = n * s_ * c_
                    if step == 2:  # dx = rstd·w·g + k0 + (x - mean)·k2
                        k0 = view(sums, (2 * n_ + n) * c_, c_)
                        k2 = view(sums, (3 * n_ + n) * c_, c_)
                        for q in range(r0, r1):
                            o = base + q * c_
                            xr, gr, dr = view(x, o, c_), view(dy, o, c_), view(dx, o, c_)
                            if act:
                                for c in range(c_):
                                    d = load(xr, c) - m[c]
                                    g = dsilu(load(gr, c), d * rw[c] + load(b, c))
                                    store(dr, c, rw[c] * g + (k0[c] + d * k2[c]))
                            else:
                                for c in range(c_):
                                    store(dr, c, rw[c] * load(gr, c)
                                          + (k0[c] + (load(xr, c) - m[c]) * k2[c]))
                        continue
                    # step 0: the span's Σg and Σg·(x - mean) per channel, in row order
                    p1 = view(pieces, t * 2 * c_, c_)
                    p2 = view(pieces, t * 2 * c_ + c_, c_)
                    for c in range(c_):
                        p1[c] = zero
                        p2[c] = zero
                    for q in range(r0, r1):
                        o = base + q * c_
                        xr, gr = view(x, o, c_), view(dy, o, c_)
                        if act:
                            for c in range(c_):
                                d = load(xr, c) - m[c]
                                g = dsilu(load(gr, c), d * rw[c] + load(b, c))
                                p1[c] += g
                                p2[c] += g * d
                        else:
                            for c in range(c_):
                                g = load(gr, c)
                                p1[c] += g
                                p2[c] += g * (load(xr, c) - m[c])
        barrier()  # every sample's sums are in: dweight and dbias, the samples in order
        c0, c1 = my_share(c_)
        dw, db = at(a[dw_], c_, pt), at(a[db_], c_, pt)  # (rounded once to the parameters')
        for c in range(c0, c1):
            s1, s2 = zero, zero
            for n in range(n_):
                s1 += sums[n * c_ + c]
                s2 += sums[(n_ + n) * c_ + c]
            store(db, c, s1)
            store(dw, c, s2)

    return cfunc(entry)
