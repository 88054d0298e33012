"""The block functions of the channels-last kernels: x is a flat array of N·S rows of C
channels, a block is nr rows from element offset o.

The loops run along channels (contiguous) and take a few rows per sweep, so that the per-channel
sums are loaded and stored once per sweep, not once per row. Only FMA contraction is allowed (no
reordering): every sum is in the order written. Half storage is converted in the loops (`load`,
`store`), the conversion chosen by the storage type when the kernel is compiled.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from fusednorm.cpu.kernels._channels import dsilu, exp
from fusednorm.cpu.kernels._dtypes import OPTS, load, store

_FMA = {"contract"}  # fused multiply-adds; no reordering, so no fastmath flag changes an order


@njit(**OPTS)
def _row(a, o, s, c_):
    # rows are slices indexed from 0: a[o + j] is checked for wrap-around (gathers, not loads)
    return a[o + s * c_:o + (s + 1) * c_]


# --- block functions: x is a flat array, a block is nr rows of C from offset o ------------------


@njit(**OPTS)
def _col_sums(x, o, nr, c_, acc):
    """acc[c] = Σ_s x[s, c], four rows per sweep (fewer loads and stores of acc)."""
    x0 = _row(x, o, 0, c_)
    for c in range(c_):
        acc[c] = load(x0, c)
    s = 1
    while s + 4 <= nr:
        x0, x1, x2, x3 = _row(x, o, s, c_), _row(x, o, s + 1, c_), _row(x, o, s + 2, c_), \
            _row(x, o, s + 3, c_)
        for c in range(c_):
            acc[c] += (load(x0, c) + load(x1, c)) + (load(x2, c) + load(x3, c))
        s += 4
    for r in range(s, nr):
        x0 = _row(x, o, r, c_)
        for c in range(c_):
            acc[c] += load(x0, c)


@njit(fastmath=_FMA, **OPTS)
def _dev_sums(x, o, nr, c_, cm, sd, ss):
    """sd[c] = Σ_s d, ss[c] = Σ_s d², d = x[s, c] − cm[c]; four rows per sweep."""
    s = nr % 4
    if s == 0:
        sd[:c_] = 0
        ss[:c_] = 0
    else:  # the rows beyond a multiple of four first
        x0 = _row(x, o, 0, c_)
        for c in range(c_):
            d0 = load(x0, c) - cm[c]
            sd[c] = d0
            ss[c] = d0 * d0
    for r in range(1, s):
        x0 = _row(x, o, r, c_)
        for c in range(c_):
            d0 = load(x0, c) - cm[c]
            sd[c] += d0
            ss[c] += d0 * d0
    while s < nr:
        x0, x1, x2, x3 = _row(x, o, s, c_), _row(x, o, s + 1, c_), _row(x, o, s + 2, c_), \
            _row(x, o, s + 3, c_)
        for c in range(c_):
            d0 = load(x0, c) - cm[c]
            d1 = load(x1, c) - cm[c]
            d2 = load(x2, c) - cm[c]
            d3 = load(x3, c) - cm[c]
            sd[c] += (d0 + d1) + (d2 + d3)
            ss[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        s += 4


@njit(**OPTS)
def cl_block_moments(x, o, nr, c_, groups, cp, scr, pmean, pm2):
    """Float64 (mean, M2) of each group's part of the block into pmean[g], pm2[g]: the group's
    block mean from per-channel sums, then the deviations' sums (corrected two-pass). scr: 3·C
    scratch of the compute type."""
    acc, cm, ss = scr[:c_], scr[c_:2 * c_], scr[2 * c_:3 * c_]
    _col_sums(x, o, nr, c_, acc)
    cg = c_ // groups
    cnt = cp.dtype.type(nr * cg)
    if cg == 1:  # BatchNorm, InstanceNorm: a group per channel
        for c in range(c_):
            cm[c] = acc[c] / cnt
    else:
        for g in range(groups):
            a = acc[g * cg:(g + 1) * cg]
            t = a[0]
            for c in range(1, cg):
                t += a[c]
            cm[g * cg:(g + 1) * cg] = t / cnt
    _dev_sums(x, o, nr, c_, cm, acc, ss)
    inv = 1.0 / np.float64(cnt)
    if cg == 1:
        for c in range(c_):
            sd = np.float64(acc[c])
            pmean[c] = np.float64(cm[c]) + sd * inv
            pm2[c] = np.float64(ss[c]) - sd * sd * inv
            if not np.isfinite(cm[c]):  # an inf (or NaN): the mean is the sum's, as torch's
                pmean[c], pm2[c] = np.float64(cm[c]), np.nan
        return
    for g in range(groups):  # the group's sums in the compute type, as within the block
        a, q = acc[g * cg:(g + 1) * cg], ss[g * cg:(g + 1) * cg]
        t, u = a[0], q[0]
        for c in range(1, cg):
            t += a[c]
            u += q[c]
        sd = np.float64(t)
        pmean[g] = np.float64(cm[g * cg]) + sd * inv
        pm2[g] = np.float64(u) - sd * sd * inv
        if not np.isfinite(cm[g * cg]):
            pmean[g], pm2[g] = np.float64(cm[g * cg]), np.nan


@njit(fastmath=_FMA, **OPTS)
def apply_rows(x, y, o, nr, c_, a, sh, silu, cp):
    """y = silu?(x·a + sh) over nr rows from offset o; a, sh per channel."""
    for s in range(nr):
        x0, y0 = _row(x, o, s, c_), _row(y, o, s, c_)
        if silu:
            for c in range(c_):
                z = load(x0, c) * a[c] + sh[c]
                store(y0, c, z / (cp[1] + exp(-z)))
        else:
            for c in range(c_):
                store(y0, c, load(x0, c) * a[c] + sh[c])


@njit(fastmath=_FMA, **OPTS)
def cl_grad_sums(dy, x, o, nr, c_, m, rw, b, silu, cp, s1, s2):
    """s1[c] = Σ g, s2[c] = Σ g·(x − m) over nr rows from offset o; g = dy, or dy·silu'(z) with
    z = (x − m)·rw + b (rw = rstd·w)."""
    s1[:c_] = 0
    s2[:c_] = 0
    for s in range(nr):
        g0, x0 = _row(dy, o, s, c_), _row(x, o, s, c_)
        if silu:
            for c in range(c_):
                d = load(x0, c) - m[c]
                g = dsilu(load(g0, c), d * rw[c] + b[c], cp[1])
                s1[c] += g
                s2[c] += g * d
        else:
            for c in range(c_):
                g = load(g0, c)
                s1[c] += g
                s2[c] += g * (load(x0, c) - m[c])


@njit(fastmath=_FMA, **OPTS)
def dx_rows(dy, x, dx, o, nr, c_, m, rw, b, k0, k2, silu, cp):
    """dx = rstd·(w·g − mean(w·g) − x̂·mean(w·g·x̂)) = rw·g + (k0 + (x − m)·k2) per channel."""
    for s in range(nr):
        g0, x0, d0 = _row(dy, o, s, c_), _row(x, o, s, c_), _row(dx, o, s, c_)
        if silu:
            for c in range(c_):
                d = load(x0, c) - m[c]
                g = dsilu(load(g0, c), d * rw[c] + b[c], cp[1])
                store(d0, c, rw[c] * g + (k0[c] + d * k2[c]))
        else:
            for c in range(c_):
                store(d0, c, rw[c] * load(g0, c) + (k0[c] + (load(x0, c) - m[c]) * k2[c]))


# --- per-sample steps ---------------------------------------------------------------------------


@njit(**OPTS)
def chan_row(mu, m2, cnt, bmean, bm2, k):
    """Chan's merge of per-channel float64 moments of k more elements into (mu, m2) of cnt."""
    if cnt == 0:
        for c in range(mu.size):  # (a slice assignment would allocate for a possible overlap)
            mu[c] = bmean[c]
            m2[c] = bm2[c]
        return k
    f = np.float64(k) / np.float64(cnt + k)
    fc = np.float64(cnt) * f
    for c in range(mu.size):
        if np.isfinite(mu[c]) and np.isfinite(bmean[c]):
            d = bmean[c] - mu[c]
            mu[c] += d * f
            m2[c] += bm2[c] + d * d * fc
        else:  # inf - inf must not make the mean NaN: the sums' mean, as torch's
            mu[c] = (mu[c] * cnt + bmean[c] * k) / (cnt + k)
            m2[c] = np.nan
    return cnt + k


@njit(**OPTS)
def merge_sample(pmean, pm2, n, s_, c_, groups, rows, mean, var, mu, m2):
    """Sample n's group moments from its block pieces, merged in block order (one Chan step
    per block serves all groups: they have the same count); mu, m2: float64 scratch (G)."""
    nblk = (s_ + rows - 1) // rows
    cg = c_ // groups
    cnt = 0
    for bi in range(nblk):
        i = (n * nblk + bi) * groups
        k = (min(s_, (bi + 1) * rows) - bi * rows) * cg
        cnt = chan_row(mu, m2, cnt, pmean[i:i + groups], pm2[i:i + groups], k)
    for g in range(groups):
        mean[n * groups + g] = mu[g]
        var[n * groups + g] = m2[g] / cnt


@njit(**OPTS)
def coefs(mean, var, sn, cg, n, w, b, cp, a, sh):
    """a = rstd·w, sh = b − mean·a per channel of sample n (statistic of channel c at
    n·sn + c // cg: GroupNorm sn = G; BatchNorm sn = 0, cg = 1)."""
    for c in range(w.size):
        i = n * sn + c // cg
        a[c] = cp[1] / np.sqrt(var[i] + cp[0]) * w[c]
        sh[c] = b[c] - mean[i] * a[c]


@njit(**OPTS)
def grad_coefs(mean, var, sn, cg, n, w, cp, m, r, rw):
    """m = mean, r = rstd and rw = rstd·w per channel of sample n."""
    for c in range(w.size):
        i = n * sn + c // cg
        m[c] = mean[i]
        r[c] = cp[1] / np.sqrt(var[i] + cp[0])
        rw[c] = r[c] * w[c]


@njit(**OPTS)
def gn_dx_coefs(sdy, sdyx, n, c_, groups, s_, w, r, cp, k0, k2):
    """Sample n: sdyx[n] becomes Σ g·x̂ (it held Σ g·(x − m)); k0 = −rstd·mean(w·g) and
    k2 = −rstd²·mean(w·g·x̂) per channel, the means over its group."""
    cg = c_ // groups
    size = cp.dtype.type(cg * s_)
    for c in range(c_):
        sdyx[n * c_ + c] *= r[c]
    for g in range(groups):
        a1, a2 = cp[2], cp[2]
        for c in range(g * cg, (g + 1) * cg):
            a1 += w[c] * sdy[n * c_ + c]
            a2 += w[c] * sdyx[n * c_ + c]
        a1 /= size
        a2 /= size
        for c in range(g * cg, (g + 1) * cg):
            k0[c] = -r[c] * a1
            k2[c] = -r[c] * r[c] * a2


@njit(**OPTS)
def add_rows(tot, part, first):
    for c in range(tot.size):
        tot[c] = part[c] if first else tot[c] + part[c]
