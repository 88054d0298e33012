"""GroupNorm and InstanceNorm over channels-first input, in numba (channels last:
`channels_last.py`).

The numba half of `cpu/group_norm.py` (the launchers, the argument layouts and the contract).
One task per (n, g), whose group is one contiguous run of C/G·S elements, read where it lies in
every dtype (a half value converts in an instruction or two, cheaper to redo in each sweep than
to copy). Each kernel is one numba function: its compile time is what a first call waits for
(see `layer_norm.py`).

- Forward: the group's moments block by block (`BLOCK` elements: the deviations' sums about a
  pilot value, taken again in L1 where it lies far), merged in block order in float64 (`chan`);
  then y = x·scale + shift channel by channel (SiLU fused).
- Backward: per channel Σg and Σg·(x - mean) (g = dy, or dy·silu'(z) with z recomputed from x
  and g kept in scratch for the second sweep), then the group's means of w·g and w·g·x̂, then dx
  channel by channel; after a barrier each
  thread adds up its channels' dweight and dbias over the samples, in order.

Only the sums along a run are reassociated (`radd`, `rfma`), so that LLVM vectorizes them; their
order depends on the run's length alone. So the results are the same bits for any thread count,
and a sample's do not depend on the batch.
"""

from __future__ import annotations

import numpy as np

from fusednorm.cpu._channels import BLOCK
from fusednorm.cpu.group_norm import CF_BWD as BWD
from fusednorm.cpu.group_norm import CF_FWD as FWD
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
    radd,
    rfma,
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
    x_, w_, b_, y_, mean_, var_ = FWD.slots("x", "weight", "bias", "y", "mean", "var")
    n_s, c_s, s_s, g_s = FWD.slots("n", "c", "s", "groups")

    def entry(block):
        a, f = ints(block, size), floats(block, size)
        n_, c_, s_, groups = a[n_s], a[c_s], a[s_s], a[g_s]
        eps, one = ct(f[eps_]), ct(1)
        x, y = at(a[x_], n_ * c_ * s_, xt), at(a[y_], n_ * c_ * s_, xt)
        w, b = at(a[w_], c_, pt), at(a[b_], c_, pt)
        mean, var = at(a[mean_], n_ * groups, ct), at(a[var_], n_ * groups, ct)
        cg = idiv(c_, groups)
        gsize = cg * s_
        lo, hi = my_share(n_ * groups)
        for t in range(lo, hi):
            xg, yg = view(x, t * gsize, gsize), view(y, t * gsize, gsize)
            mu, m2, cnt = 0.0, 0.0, 0
            for o in range(0, gsize, BLOCK):
                k = imin(gsize - o, BLOCK)
                blk = view(xg, o, k)
                # the deviations' sums about a pilot value, the median of the block's first,
                # middle and last elements (0 if not finite), so that the block is read once
                # (its own mean first made it twice: the forward took 1.4x the time); where
                # the pilot lies far from the block's mean (`FAR`), again about that mean
                bm = pilot(load(blk, 0), load(blk, idiv(k, 2)), load(blk, k - 1))
                for _ in range(3):  # (twice at most, in practice)
                    d = load(blk, 0) - bm
                    sd, ss = d, d * d
                    for j in range(1, k):
                        d = load(blk, j) - bm
                        sd = radd(sd, d)
                        ss = rfma(ss, d, d)
                    if not sd * sd > FAR * ct(k) * ss:  # (near, or inf or NaN in the block)
                        break
                    bm += sd / ct(k)
                bmean, bm2 = moments(bm, sd, ss, k)
                mu, m2, cnt = chan(mu, m2, cnt, bmean, bm2, k)
            mean[t] = mu
            var[t] = m2 / gsize
            m, r = mean[t], one / np.sqrt(var[t] + eps)  # rounded as the backward reads them
            c0 = imod(t, groups) * cg
            for ci in range(cg):
                # y = x·sc + sh, no fused multiply-add: sh holds the rounded product m·sc, which
                # x·sc must cancel alike
                sc = r * load(w, c0 + ci)
                sh = load(b, c0 + ci) - m * sc
                xs, ys = view(xg, ci * s_, s_), view(yg, ci * s_, s_)
                if act:
                    for j in range(s_):
                        store(ys, j, silu(load(xs, j) * sc + sh))
                else:
                    for j in range(s_):
                        store(ys, j, load(xs, j) * sc + sh)

    return cfunc(entry)


def build_bwd(compute, x, params, activation):
    """The backward kernel for x (and dy, dx) stored as `x`, weight, bias and their gradients
    as `params`, computing in `compute`; activation "silu" or ""."""
    ct, xt, pt = storage_type(compute), storage_type(x), storage_type(params)
    act, csize = activation == "silu", np.dtype(ct).itemsize
    size, eps_ = len(BWD), BWD.slot("eps")
    dy_, x_, w_, b_, mean_, var_, dx_, dw_, db_, scr_, loc_ = BWD.slots(
        "dy", "x", "weight", "bias", "mean", "var", "dx", "dweight", "dbias", "scratch", "local")
    n_s, c_s, s_s, g_s = BWD.slots("n", "c", "s", "groups")

    def entry(block):
        a, f = ints(block, size), floats(block, size)
        n_, c_, s_, groups = a[n_s], a[c_s], a[s_s], a[g_s]
        eps, one, zero = ct(f[eps_]), ct(1), ct(0)
        total = n_ * c_ * s_
        dy, x, dx = at(a[dy_], total, xt), at(a[x_], total, xt), at(a[dx_], total, xt)
        w, b = at(a[w_], c_, pt), at(a[b_], c_, pt)
        mean, var = at(a[mean_], n_ * groups, ct), at(a[var_], n_ * groups, ct)
        sums = at(a[scr_], 2 * n_ * c_, ct)  # Σg and Σg·x̂ per (n, c)
        cg = idiv(c_, groups)
        gsize = cg * s_
        # with SiLU, per thread the group's g = dy·silu'(z), kept for the second sweep (its exp
        # and division computed again cost the backward 1.4-1.7x torch's)
        stride = idiv(gsize * csize + 63, 64) * 64  # (as `Scratch` rounds it)
        kept = at(a[loc_] + thread_id() * stride, gsize, ct)
        lo, hi = my_share(n_ * groups)
        for t in range(lo, hi):
            mu, r = mean[t], one / np.sqrt(var[t] + eps)
            c0 = imod(t, groups) * cg
            p0 = idiv(t, groups) * c_ + c0  # the group's first (n, c)
            gs, gsx = zero, zero  # Σ w·g and Σ w·g·x̂ over the group, channel by channel
            for ci in range(cg):
                c = c0 + ci
                o = t * gsize + ci * s_
                xs, gr = view(x, o, s_), view(dy, o, s_)
                wc, bc = load(w, c), load(b, c)
                sc = r * wc
                s1, s2 = zero, zero
                if act:  # g = dy·silu'(z), z = x̂·w + b
                    gk = view(kept, ci * s_, s_)
                    for j in range(s_):
                        d = load(xs, j) - mu
                        g = dsilu(load(gr, j), d * sc + bc)
                        gk[j] = g
                        s1 = radd(s1, g)
                        s2 = rfma(s2, g, d)
                else:
                    for j in range(s_):
                        g = load(gr, j)
                        s1 = radd(s1, g)
                        s2 = rfma(s2, g, load(xs, j) - mu)
                s2 *= r
                sums[p0 + ci], sums[n_ * c_ + p0 + ci] = s1, s2
                gs += wc * s1
                gsx += wc * s2
            # dx = rstd·(w·g - mean(w·g) - x̂·mean(w·g·x̂)) = fa·g + fb·(x - mean) + fc
            fb, fc = -(r * r * (gsx / ct(gsize))), -(r * (gs / ct(gsize)))
            for ci in range(cg):
                c = c0 + ci
                o = t * gsize + ci * s_
                xs, gr, ds = view(x, o, s_), view(dy, o, s_), view(dx, o, s_)
                sc = r * load(w, c)
                if act:
                    gk = view(kept, ci * s_, s_)
                    for j in range(s_):
                        store(ds, j, sc * gk[j] + fb * (load(xs, j) - mu) + fc)
                else:
                    for j in range(s_):
                        store(ds, j, sc * load(gr, j) + fb * (load(xs, j) - mu) + fc)
        barrier()  # every (n, c) sum is in; each thread adds up its channels over n in order
        c0, c1 = my_share(c_)
        dw, db = at(a[dw_], c_, pt), at(a[db_], c_, pt)  # (rounded once to the parameters')
        for c in range(c0, c1):
            s1, s2 = sums[c], sums[n_ * c_ + c]
            for n in range(1, n_):
                s1 += sums[n * c_ + c]
                s2 += sums[(n_ + n) * c_ + c]
            store(db, c, s1)
            store(dw, c, s2)

    return cfunc(entry)
