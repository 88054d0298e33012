"""GroupNorm, InstanceNorm and BatchNorm on channels-last input, on the CPU in numba.

The contract is the one at the top of `group_norm.py` (BatchNorm's, `batch_norm.py`), with x an
(N, C, S) view of strides (S·C, 1, C): channels innermost.

The input is read in blocks of `rows` spatial positions × all C channels (a shape-only split, so
the result never depends on thread count), each giving per-(n, block, group) moments from
per-channel sums (the inner loops run along channels, contiguous); the pieces are merged in
block order. BatchNorm and InstanceNorm are the case of one group per channel. Every sum is in a
fixed order: the results are bitwise deterministic.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from ._channels import (
    _REDUCE,
    OneThreadIf,
    _chan,
    _dest,
    _dsilu,
    _exp,
    _flush,
    _read,
    _sum_over_n,
    conform,
    consts,
    empty_layout,
    flat,
    threads,
)

_CL_BLOCK = 4096  # elements per block (rows × C): a shape-only split, in L1


# A block is a contiguous (rows, C) slab, read as a 2-D view so that inner loops run along
# channels. The block helpers below serve two drivers with the same arithmetic in the same
# order (so the same bits): one parallel over (n, block) tasks for small batches, one parallel
# over samples, whose slab stays in L2 between the statistics and the normalization.


@njit(cache=True, error_model="numpy")
def _per_channel(stat, sn, cg, n, c_, out):
    """out[c] = stat[n·sn + c // cg]: a statistic per channel (GroupNorm: sn = G; BatchNorm:
    sn = 0, cg = 1)."""
    for c in range(c_):
        out[c] = stat[n * sn + c // cg]
    return out


@njit(cache=True, error_model="numpy")
def _rstd(var, eps, one):
    for c in range(var.size):
        var[c] = one / np.sqrt(var[c] + eps)
    return var


@njit(inline="always", cache=True, error_model="numpy")
def _block(x, xkind, n, bi, s_, c_, rows, buf):
    """Block bi of sample n as a (rows in block, C) view in the compute type."""
    r0 = bi * rows
    nr = min(s_, r0 + rows) - r0
    return _read(x, xkind, (n * s_ + r0) * c_, nr * c_, buf).reshape((nr, c_))


@njit(fastmath=_REDUCE, cache=True, error_model="numpy")
def _block_moments_cl(xb, groups, cp, acc, acc2, cm, pmean, pm2, piece):
    """Float64 moments of each group's part of the block xb (rows, C) into pieces piece..:
    per-channel sums, then deviations from the group's block mean (corrected two-pass)."""
    nr, c_ = xb.shape
    cg = c_ // groups
    cnt = cp.dtype.type(nr * cg)
    acc[:] = cp[2]
    acc2[:] = cp[2]
    for s in range(nr):
        for c in range(c_):
            acc[c] += xb[s, c]
    if cg == 1:  # BatchNorm, InstanceNorm: a group per channel, no slices
        for c in range(c_):
            cm[c] = acc[c] / cnt
    else:
        for g in range(groups):
            cm[g * cg:(g + 1) * cg] = acc[g * cg:(g + 1) * cg].sum() / cnt
    acc[:] = cp[2]
    for s in range(nr):
        for c in range(c_):
            d = xb[s, c] - cm[c]
            acc[c] += d
            acc2[c] += d * d
    cnt64 = np.float64(cnt)
    if cg == 1:
        for c in range(c_):
            sd = np.float64(acc[c])
            pmean[piece + c] = np.float64(cm[c]) + sd / cnt64
            pm2[piece + c] = np.float64(acc2[c]) - sd * sd / cnt64
        return
    for g in range(groups):
        sd = np.float64(acc[g * cg:(g + 1) * cg].sum())
        ss = np.float64(acc2[g * cg:(g + 1) * cg].sum())
        pmean[piece + g] = np.float64(cm[g * cg]) + sd / cnt64
        pm2[piece + g] = ss - sd * sd / cnt64


@njit(cache=True, error_model="numpy")
def _merge_sample_cl(pmean, pm2, n, s_, c_, groups, rows, mean, var):
    """Sample n's group moments from its block pieces, merged in block order."""
    nblk = (s_ + rows - 1) // rows
    cg = c_ // groups
    for g in range(groups):
        mu, m2, cnt = 0.0, 0.0, 0
        for bi in range(nblk):
            i = (n * nblk + bi) * groups + g
            k = (min(s_, (bi + 1) * rows) - bi * rows) * cg
            mu, m2, cnt = _chan(mu, m2, cnt, pmean[i], pm2[i], k)
        mean[n * groups + g] = mu
        var[n * groups + g] = m2 / cnt


@njit(cache=True, error_model="numpy")
def _coefs_cl(mean, var, sn, cg, n, w, b, cp, a, sh):
    """a = rstd·w and sh = b − mean·a per channel of sample n."""
    _rstd(_per_channel(var, sn, cg, n, w.size, a), cp[0], cp[1])
    _per_channel(mean, sn, cg, n, w.size, sh)
    for c in range(w.size):
        a[c] *= w[c]
        sh[c] = b[c] - sh[c] * a[c]


@njit(cache=True, error_model="numpy")
def _apply_block_cl(x, xkind, y, ykind, n, bi, s_, c_, rows, a, sh, silu, cp, buf, out):
    xb = _block(x, xkind, n, bi, s_, c_, rows, buf)
    nr = xb.shape[0]
    o = (n * s_ + bi * rows) * c_
    yb = _dest(y, o, nr * c_, out).reshape((nr, c_))
    if silu:
        one = cp[1]
        for s in range(nr):
            for c in range(c_):
                z = xb[s, c] * a[c] + sh[c]
                yb[s, c] = z / (one + _exp(-z))
    else:
        for s in range(nr):
            for c in range(c_):
                yb[s, c] = xb[s, c] * a[c] + sh[c]
    _flush(y, ykind, o, nr * c_, out)


@njit(parallel=True, cache=True, error_model="numpy")
def _moments_cl(x, xkind, n_, s_, c_, groups, rows, cp, pmean, pm2):
    """Pieces (n, block, group) of channels-last x, one task per (n, block)."""
    nblk = (s_ + rows - 1) // rows
    for t in prange(n_ * nblk):
        buf = np.empty(rows * c_ if xkind else 0, cp.dtype)  # for half input only
        acc, acc2, cm = (np.empty(c_, cp.dtype), np.empty(c_, cp.dtype),
                         np.empty(c_, cp.dtype))
        xb = _block(x, xkind, t // nblk, t % nblk, s_, c_, rows, buf)
        _block_moments_cl(xb, groups, cp, acc, acc2, cm, pmean, pm2, t * groups)


@njit(cache=True, error_model="numpy")
def _sample_coefs(mean, var, sn, cg, nn, w, b, cp, a, sh):
    """`_coefs_cl` for samples 0..nn-1 into rows of a and sh (nn·C): computed once per call,
    not per block (BatchNorm: nn = 1, one row for every sample)."""
    c_ = w.size
    for n in range(nn):
        _coefs_cl(mean, var, sn, cg, n, w, b, cp, a[n * c_:(n + 1) * c_],
                  sh[n * c_:(n + 1) * c_])


@njit(cache=True, error_model="numpy")
def _sample_rows(stat, sn, cg, nn, c_, out, rstd, cp):
    """Rows out[n] = the per-channel statistic of sample n (as rstd when asked)."""
    for n in range(nn):
        row = _per_channel(stat, sn, cg, n, c_, out[n * c_:(n + 1) * c_])
        if rstd:
            _rstd(row, cp[0], cp[1])


@njit(parallel=True, cache=True, error_model="numpy")
def _apply_cl(x, xkind, y, ykind, a, sh, an, n_, s_, c_, rows, cp, silu):
    """y = silu?(x·a + sh) per (n, block) task; a, sh rows per sample (an = 1) or one row for
    all (an = 0)."""
    nblk = (s_ + rows - 1) // rows
    for t in prange(n_ * nblk):
        o = (t // nblk) * an * c_
        k = rows * c_ if xkind else 0  # conversion buffers for half input only
        buf, out = np.empty(k, cp.dtype), np.empty(k, cp.dtype)
        _apply_block_cl(x, xkind, y, ykind, t // nblk, t % nblk, s_, c_, rows, a[o:o + c_],
                        sh[o:o + c_], silu, cp, buf, out)


@njit(parallel=True, cache=True, error_model="numpy")
def _fwd_cl_by_sample(x, xkind, w, b, y, ykind, mean, var, n_, s_, c_, groups, rows, cp, silu,
                      pmean, pm2):
    """GroupNorm forward, channels last, one task per sample: moments, merge, normalize."""
    nblk = (s_ + rows - 1) // rows
    for n in prange(n_):
        k = rows * c_ if xkind else 0  # conversion buffers for half input only
        buf, out = np.empty(k, cp.dtype), np.empty(k, cp.dtype)
        acc, acc2, cm = (np.empty(c_, cp.dtype), np.empty(c_, cp.dtype),
                         np.empty(c_, cp.dtype))
        for bi in range(nblk):
            xb = _block(x, xkind, n, bi, s_, c_, rows, buf)
            _block_moments_cl(xb, groups, cp, acc, acc2, cm, pmean, pm2,
                              (n * nblk + bi) * groups)
        _merge_sample_cl(pmean, pm2, n, s_, c_, groups, rows, mean, var)
        _coefs_cl(mean, var, groups, c_ // groups, n, w, b, cp, acc, acc2)
        for bi in range(nblk):
            _apply_block_cl(x, xkind, y, ykind, n, bi, s_, c_, rows, acc, acc2, silu, cp, buf,
                            out)


@njit(cache=True, error_model="numpy")
def _grads_block_cl(dy, dykind, x, xkind, n, bi, s_, c_, rows, m, r, w, b, silu, cp, bufs):
    """(g, x) of block bi of sample n as (rows, C) views; g = dy, or dy·silu'(z)."""
    xb = _block(x, xkind, n, bi, s_, c_, rows, bufs[0])
    gb = _block(dy, dykind, n, bi, s_, c_, rows, bufs[1])
    if silu:
        nr = xb.shape[0]
        out = bufs[2][:nr * c_].reshape((nr, c_))
        for s in range(nr):
            for c in range(c_):
                out[s, c] = _dsilu(gb[s, c], (xb[s, c] - m[c]) * r[c] * w[c] + b[c], cp[1])
        gb = out
    return xb, gb


@njit(fastmath=_REDUCE, cache=True, error_model="numpy")
def _grad_sums_block_cl(xb, gb, m, r, s1, s2):
    """s1 = Σ g, s2 = Σ g·x̂ per channel over the block's positions."""
    s1[:] = 0
    s2[:] = 0
    for s in range(xb.shape[0]):
        for c in range(xb.shape[1]):
            g = gb[s, c]
            s1[c] += g
            s2[c] += g * ((xb[s, c] - m[c]) * r[c])


@njit(cache=True, error_model="numpy")
def _dx_block_cl(xb, gb, m, r, w, a1, a2, dxb):
    for s in range(xb.shape[0]):
        for c in range(xb.shape[1]):
            dxb[s, c] = r[c] * (w[c] * gb[s, c] - a1[c] - (xb[s, c] - m[c]) * r[c] * a2[c])


@njit(parallel=True, cache=True, error_model="numpy")
def _bwd_sums_cl(dy, dykind, x, xkind, m, r, an, w, b, n_, s_, c_, rows, cp, silu, psdy,
                 psdyx):
    """Per (n, block, c): Σ g and Σ g·x̂ over the block's positions; m, r (mean and rstd per
    channel) in rows as for `_apply_cl`."""
    nblk = (s_ + rows - 1) // rows
    for t in prange(n_ * nblk):
        o = (t // nblk) * an * c_
        mn, rn = m[o:o + c_], r[o:o + c_]
        bufs = np.empty((3, rows * c_ if xkind or silu else 0), cp.dtype)
        xb, gb = _grads_block_cl(dy, dykind, x, xkind, t // nblk, t % nblk, s_, c_, rows, mn,
                                 rn, w, b, silu, cp, bufs)
        _grad_sums_block_cl(xb, gb, mn, rn, psdy[t * c_:(t + 1) * c_],
                            psdyx[t * c_:(t + 1) * c_])


@njit(parallel=True, cache=True, error_model="numpy")
def _bwd_apply_cl(dy, dykind, x, xkind, dx, dxkind, m, r, a1, a2, an, w, b, n_, s_, c_, rows,
                  cp, silu):
    """dx = rstd·(w·g − a1 − x̂·a2), a1 and a2 the means of w·g and w·g·x̂ over each channel's
    statistic; rows as for `_apply_cl`."""
    nblk = (s_ + rows - 1) // rows
    for t in prange(n_ * nblk):
        n, bi = t // nblk, t % nblk
        o = n * an * c_
        mn, rn = m[o:o + c_], r[o:o + c_]
        bufs = np.empty((4, rows * c_ if xkind or silu else 0), cp.dtype)
        xb, gb = _grads_block_cl(dy, dykind, x, xkind, n, bi, s_, c_, rows, mn, rn, w, b, silu,
                                 cp, bufs)
        nr = xb.shape[0]
        od = (n * s_ + bi * rows) * c_
        _dx_block_cl(xb, gb, mn, rn, w, a1[o:o + c_], a2[o:o + c_],
                     _dest(dx, od, nr * c_, bufs[3]).reshape((nr, c_)))
        _flush(dx, dxkind, od, nr * c_, bufs[3])


@njit(cache=True, error_model="numpy")
def _sum_blocks_cl(parts, n_, nblk, c_, out):
    """out[n, c] = Σ_block parts[n, block, c], blocks in order."""
    for n in range(n_):
        for c in range(c_):
            s = parts[n * nblk * c_ + c]
            for bi in range(1, nblk):
                s += parts[(n * nblk + bi) * c_ + c]
            out[n * c_ + c] = s


@njit(cache=True, error_model="numpy")
def _group_grad_means(sdy, sdyx, w, n, c_, groups, size, cp, mg, mgx):
    """Per group of sample n: the means over the group of w·g and w·g·x̂."""
    cg = c_ // groups
    for g in range(groups):
        a1, a2 = cp[2], cp[2]
        for c in range(g * cg, (g + 1) * cg):
            a1 += w[c] * sdy[n * c_ + c]
            a2 += w[c] * sdyx[n * c_ + c]
        mg[n * groups + g] = a1 / size
        mgx[n * groups + g] = a2 / size


@njit(parallel=True, cache=True, error_model="numpy")
def _bwd_cl_by_sample(dy, dykind, x, xkind, w, b, mean, var, dx, dxkind, sdy, sdyx, mg, mgx,
                      n_, s_, c_, groups, rows, cp, silu):
    """GroupNorm backward, channels last, one task per sample: the sums of `_bwd_sums_cl` and
    `_sum_blocks_cl` (block sums added in block order), the group means, then dx."""
    nblk = (s_ + rows - 1) // rows
    cg = c_ // groups
    size = cp.dtype.type(cg * s_)
    for n in prange(n_):
        m = _per_channel(mean, groups, cg, n, c_, np.empty(c_, cp.dtype))
        r = _rstd(_per_channel(var, groups, cg, n, c_, np.empty(c_, cp.dtype)), cp[0], cp[1])
        bufs = np.empty((4, rows * c_ if xkind or silu else 0), cp.dtype)
        s1, s2 = np.empty(c_, cp.dtype), np.empty(c_, cp.dtype)
        tot1, tot2 = sdy[n * c_:(n + 1) * c_], sdyx[n * c_:(n + 1) * c_]
        for bi in range(nblk):
            xb, gb = _grads_block_cl(dy, dykind, x, xkind, n, bi, s_, c_, rows, m, r, w, b,
                                     silu, cp, bufs)
            _grad_sums_block_cl(xb, gb, m, r, s1, s2)
            if bi == 0:
                tot1[:] = s1
                tot2[:] = s2
            else:
                tot1 += s1
                tot2 += s2
        _group_grad_means(sdy, sdyx, w, n, c_, groups, size, cp, mg, mgx)
        a1 = _per_channel(mg, groups, cg, n, c_, np.empty(c_, cp.dtype))
        a2 = _per_channel(mgx, groups, cg, n, c_, np.empty(c_, cp.dtype))
        for bi in range(nblk):
            xb, gb = _grads_block_cl(dy, dykind, x, xkind, n, bi, s_, c_, rows, m, r, w, b,
                                     silu, cp, bufs)
            nr = xb.shape[0]
            o = (n * s_ + bi * rows) * c_
            _dx_block_cl(xb, gb, m, r, w, a1, a2,
                         _dest(dx, o, nr * c_, bufs[3]).reshape((nr, c_)))
            _flush(dx, dxkind, o, nr * c_, bufs[3])


@njit(cache=True, error_model="numpy")
def _merge_cl(pmean, pm2, n_, s_, c_, rows, mean, var):
    """Per channel: the channels-last pieces (n, block, c), merged in order of (n, block). All
    channels of a piece have the same count, so one Chan step serves a whole row of channels."""
    nblk = (s_ + rows - 1) // rows
    mu, m2 = np.zeros(c_), np.zeros(c_)
    cnt = 0
    for p in range(n_ * nblk):
        bi = p % nblk
        k = min(s_, (bi + 1) * rows) - bi * rows
        f = np.float64(k) / np.float64(cnt + k)
        fc = np.float64(cnt) * f
        for c in range(c_):
            d = pmean[p * c_ + c] - mu[c]
            mu[c] += d * f
            m2[c] += pm2[p * c_ + c] + d * d * fc
        cnt += k
    for c in range(c_):
        mean[c] = mu[c]
        var[c] = m2[c] / cnt


# --- launchers ------------------------------------------------------------------------------------


def cl_rows(c: int) -> int:
    """Spatial positions per block: from C alone."""
    return max(1, _CL_BLOCK // max(c, 1))


def group_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                   eps: float, silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = conform(x, True)
    n_, c_, s_ = x.shape
    cp = consts(weight.dtype, eps)
    y = empty_layout(x, True)
    ma, va = np.empty(n_ * groups, cp.dtype), np.empty(n_ * groups, cp.dtype)
    mean, var = torch.from_numpy(ma).view(n_, groups), torch.from_numpy(va).view(n_, groups)
    if x.numel() == 0:
        return y, mean.fill_(float("nan")), var.fill_(float("nan"))
    xa, xk = flat(x)
    ya, yk = flat(y)
    wa, ba = flat(weight)[0], flat(bias)[0]
    nt = threads(x.numel())
    with OneThreadIf(nt == 1):
        rows = cl_rows(c_)
        nblk = -(-s_ // rows)
        pmean = np.empty(n_ * nblk * groups, np.float64)
        pm2 = np.empty(n_ * nblk * groups, np.float64)
        if n_ >= 2 * nt:  # one task per sample keeps every thread busy (same bits either way)
            _fwd_cl_by_sample(xa, xk, wa, ba, ya, yk, ma, va, n_, s_, c_, groups, rows, cp, silu,
                              pmean, pm2)
        else:
            _moments_cl(xa, xk, n_, s_, c_, groups, rows, cp, pmean, pm2)
            for n in range(n_):
                _merge_sample_cl(pmean, pm2, n, s_, c_, groups, rows, ma, va)
            a, sh = np.empty(n_ * c_, cp.dtype), np.empty(n_ * c_, cp.dtype)
            _sample_coefs(ma, va, groups, c_ // groups, n_, wa, ba, cp, a, sh)
            _apply_cl(xa, xk, ya, yk, a, sh, 1, n_, s_, c_, rows, cp, silu)
    return y, mean, var


def group_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   mean: torch.Tensor, var: torch.Tensor, groups: int, eps: float, silu: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = conform(x, True)
    dy = conform(dy, True)
    n_, c_, s_ = x.shape
    cp = consts(weight.dtype, eps)
    dx = empty_layout(x, True)
    dw = torch.zeros(c_, dtype=weight.dtype)
    db = torch.zeros(c_, dtype=weight.dtype)
    if x.numel() == 0:
        return dx, dw, db
    sa, sxa = np.zeros(n_ * c_, cp.dtype), np.zeros(n_ * c_, cp.dtype)  # Σg, Σg·x̂ per (n, c)
    dya, dyk = flat(dy)
    xa, xk = flat(x)
    dxa, dxk = flat(dx)
    wa, ba, ma, va = flat(weight)[0], flat(bias)[0], flat(mean)[0], flat(var)[0]
    nt = threads(x.numel())
    with OneThreadIf(nt == 1):
        cg = c_ // groups
        rows = cl_rows(c_)
        nblk = -(-s_ // rows)
        mg = np.empty(n_ * groups, cp.dtype)
        mgx = np.empty(n_ * groups, cp.dtype)
        if n_ >= 2 * nt:
            _bwd_cl_by_sample(dya, dyk, xa, xk, wa, ba, ma, va, dxa, dxk, sa, sxa, mg, mgx,
                              n_, s_, c_, groups, rows, cp, silu)
        else:
            psdy = np.empty(n_ * nblk * c_, cp.dtype)
            psdyx = np.empty(n_ * nblk * c_, cp.dtype)
            m, r = np.empty(n_ * c_, cp.dtype), np.empty(n_ * c_, cp.dtype)
            _sample_rows(ma, groups, cg, n_, c_, m, False, cp)
            _sample_rows(va, groups, cg, n_, c_, r, True, cp)
            _bwd_sums_cl(dya, dyk, xa, xk, m, r, 1, wa, ba, n_, s_, c_, rows, cp, silu,
                         psdy, psdyx)
            _sum_blocks_cl(psdy, n_, nblk, c_, sa)
            _sum_blocks_cl(psdyx, n_, nblk, c_, sxa)
            size = cp.dtype.type(cg * s_)
            for n in range(n_):
                _group_grad_means(sa, sxa, wa, n, c_, groups, size, cp, mg, mgx)
            a1, a2 = np.empty(n_ * c_, cp.dtype), np.empty(n_ * c_, cp.dtype)
            _sample_rows(mg, groups, cg, n_, c_, a1, False, cp)
            _sample_rows(mgx, groups, cg, n_, c_, a2, False, cp)
            _bwd_apply_cl(dya, dyk, xa, xk, dxa, dxk, m, r, a1, a2, 1, wa, ba, n_, s_, c_,
                          rows, cp, silu)
    _sum_over_n(sa, n_, c_, flat(db)[0])
    _sum_over_n(sxa, n_, c_, flat(dw)[0])
    return dx, dw, db


def batch_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   mean: torch.Tensor | None, var: torch.Tensor | None, eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = conform(x, True)
    n_, c_, s_ = x.shape
    ct = weight.dtype
    cp = consts(ct, eps)
    y = empty_layout(x, True)
    training = mean is None
    if training:
        mean, var = torch.empty(c_, dtype=ct), torch.empty(c_, dtype=ct)
    if x.numel() == 0:
        if training:
            mean.fill_(float("nan"))
            var.fill_(float("nan"))
        return y, mean, var
    xa, xk = flat(x)
    ya, yk = flat(y)
    wa, ba, ma, va = flat(weight)[0], flat(bias)[0], flat(mean)[0], flat(var)[0]
    with OneThreadIf(threads(x.numel()) == 1):
        rows = cl_rows(c_)
        if training:
            nblk = -(-s_ // rows)
            pmean = np.empty(n_ * nblk * c_, np.float64)
            pm2 = np.empty(n_ * nblk * c_, np.float64)
            _moments_cl(xa, xk, n_, s_, c_, c_, rows, cp, pmean, pm2)
            _merge_cl(pmean, pm2, n_, s_, c_, rows, ma, va)
        a, sh = np.empty(c_, cp.dtype), np.empty(c_, cp.dtype)
        _sample_coefs(ma, va, 0, 1, 1, wa, ba, cp, a, sh)
        _apply_cl(xa, xk, ya, yk, a, sh, 0, n_, s_, c_, rows, cp, False)
    return y, mean, var


def batch_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   mean: torch.Tensor, var: torch.Tensor, eps: float, training: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = conform(x, True)
    dy = conform(dy, True)
    n_, c_, s_ = x.shape
    ct = weight.dtype
    cp = consts(ct, eps)
    dx = empty_layout(x, True)
    dw, db = torch.zeros(c_, dtype=ct), torch.zeros(c_, dtype=ct)
    if x.numel() == 0:
        return dx, dw, db
    dya, dyk = flat(dy)
    xa, xk = flat(x)
    dxa, dxk = flat(dx)
    wa, ba, ma, va = flat(weight)[0], flat(bias)[0], flat(mean)[0], flat(var)[0]
    dwa, dba = flat(dw)[0], flat(db)[0]
    with OneThreadIf(threads(x.numel()) == 1):
        rows = cl_rows(c_)
        nblk = -(-s_ // rows)
        parts = n_ * nblk
        psdy, psdyx = np.empty(parts * c_, cp.dtype), np.empty(parts * c_, cp.dtype)
        m, r = np.empty(c_, cp.dtype), np.empty(c_, cp.dtype)
        _sample_rows(ma, 0, 1, 1, c_, m, False, cp)
        _sample_rows(va, 0, 1, 1, c_, r, True, cp)
        _bwd_sums_cl(dya, dyk, xa, xk, m, r, 0, wa, ba, n_, s_, c_, rows, cp, False, psdy,
                     psdyx)
        _sum_over_n(psdy, parts, c_, dba)
        _sum_over_n(psdyx, parts, c_, dwa)
        # the means over the channel of w·dy and w·dy·x̂; zero when the statistics are constants
        count = float(n_ * s_)
        zeros = np.zeros(c_, cp.dtype)
        mg = np.asarray(wa * dba / count, dtype=cp.dtype) if training else zeros
        mgx = np.asarray(wa * dwa / count, dtype=cp.dtype) if training else zeros
        _bwd_apply_cl(dya, dyk, xa, xk, dxa, dxk, m, r, mg, mgx, 0, wa, ba, n_, s_, c_, rows,
                      cp, False)
    return dx, dw, db
