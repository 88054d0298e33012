"""GroupNorm and InstanceNorm on the CPU in numba, and the channels-last kernels BatchNorm shares.

Kernel contract (the same in `triton/group_norm.py`; InstanceNorm is GroupNorm with G = C):

    group_norm_fwd(x, weight, bias, groups, eps, silu, channels_last) -> (y, mean, var)
    group_norm_bwd(dy, x, weight, bias, mean, var, groups, eps, silu, channels_last)
        -> (dx, dweight, dbias)

- `x`: an (N, C, S) view, S the product of the spatial sizes: contiguous when `channels_last` is
  false, strides (S·C, 1, C) when true (channels innermost). `dy` is brought to x's layout.
- `weight`, `bias`: contiguous (C,) tensors of the compute dtype (float32; float64 for float64
  input); the Python layer passes ones and zeros when the module has none.
- `y`, `dx`: new tensors of x's dtype and layout. `mean`, `var`: (N, G) in the compute dtype, var
  biased; rstd = 1/sqrt(var + eps) is recomputed identically wherever it is needed.
- silu: y = silu(x̂·w + b); the backward recomputes z = x̂·w + b rather than storing it.
- dweight, dbias: (C,) in the compute dtype.

How the work is laid out, and why:
- channels first: one task per (n, g). The group is one contiguous run of C/G·S elements; it is
  read in blocks of `_BLOCK` elements, each block's moments taken by a corrected two-pass while
  it is in L1, the blocks merged in order with Chan's formula. The group is then normalized row
  by row while still in cache. The backward does the same: per-channel sums Σg, Σg·x̂ (kept for
  dweight/dbias), then dx, in one task.
- channels last: blocks of `rows` spatial positions × all C channels (a shape-only split, so
  the result never depends on thread count), each giving per-(n, block, group) moments from
  per-channel sums (the inner loop runs along channels, contiguous); the pieces are merged in
  block order. BatchNorm uses these kernels with one group per channel.
- every sum is in a fixed order: the results are bitwise deterministic.
- numba's defaults are changed where they cost: error_model="numpy" (the default "python"
  model tests every float division for a zero divisor, raising ZeroDivisionError where torch
  gives inf, and the test keeps LLVM from vectorizing the loop); inner loops run over slices
  indexed from 0 (an index `o + j` is checked for wrap-around, which halves the speed); and
  exp in float32 is a polynomial (numba calls libm's expf per element without Intel SVML).

The file is over 500 lines because it also holds the channels-last kernels BatchNorm shares.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from ._dtypes import as_flat_array, load_row, store_row

# Reassociation (and FMA contraction) for the reductions only, so LLVM vectorizes them. Never
# nnan/ninf: NaN and inf must propagate as in torch.
_REDUCE = {"reassoc", "contract", "arcp"}
_BLOCK = 2048  # elements per statistics block: its two passes stay in L1
_SILU_KEEP = 1 << 16  # groups up to this size keep dy·silu'(z) between the backward's sweeps
_CL_BLOCK = 4096  # elements per channels-last block (rows × C): a shape-only split, in L1
# Below this many elements the kernels run on the calling thread: waking the worker threads
# costs more than the work, and far more on a loaded machine (a parallel region waits for every
# worker to be scheduled). torch's CPU kernels use a similar grain. Results do not depend on it.
PARALLEL_GRAIN = 1 << 16


# --- helpers ---------------------------------------------------------------------------------------


def _same_or(a, alt):
    """(a, True) when array a has alt's type (read or written in place), else (alt, False)."""
    raise NotImplementedError


@overload(_same_or, inline="always")
def _same_or_impl(a, alt):
    if a == alt:
        return lambda a, alt: (a, True)
    return lambda a, alt: (alt, False)


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the int32 `bits` (a plain bitcast, so it vectorizes)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@njit(inline="always", cache=True, error_model="numpy")
def _expf(t):
    """exp(t) for float32 in code LLVM vectorizes: Cephes' reduction t = k·ln2 + r and its
    degree-7 polynomial (about 1.3 ulp). Overflows to inf a little early (t > 88.3) and
    underflows to 0 below the normal range; NaN stays NaN."""
    hi, lo = np.float32(88.3), np.float32(-87.33654)
    tc = t if t > lo else lo  # noqa: FURB136 (a plain select; NaN is handled last)
    tc = tc if tc < hi else hi  # noqa: FURB136
    k = np.floor(tc * np.float32(1.4426950408889634) + np.float32(0.5))
    r = tc - k * np.float32(0.693359375) - k * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = (p * r * r + r + np.float32(1.0)) * _f32_from_bits((np.int32(k) + 127) << 23)
    y = np.float32(np.inf) if t > hi else y
    y = np.float32(0.0) if t < lo else y
    return t if np.isnan(t) else y


def _exp(v):
    """exp in the compute type: `_expf` for float32, libm for float64."""
    raise NotImplementedError


@overload(_exp, inline="always")
def _exp_impl(v):
    if v == types.float32:
        return lambda v: _expf(v)
    return lambda v: np.exp(v)


@njit(inline="always", cache=True, error_model="numpy")
def _read(x, xkind, o, n, buf):
    """x[o:o + n] in the compute type: a view when x is stored in it, else converted into buf."""
    x0, x_ok = _same_or(x, buf)
    if x_ok:
        return x0[o:o + n]
    load_row(x[o:o + n], 0, n, xkind, buf)
    return buf[:n]


@njit(inline="always", cache=True, error_model="numpy")
def _dest(y, o, n, out):
    """Where to write y[o:o + n]: in place when y is stored in the compute type, else out."""
    y0, y_ok = _same_or(y, out)
    return y0[o:o + n] if y_ok else out[:n]


@njit(inline="always", cache=True, error_model="numpy")
def _flush(y, ykind, o, n, out):
    """Store what `_dest` handed out (rounded to y's storage type) when it was not y itself."""
    _, y_ok = _same_or(y, out)
    if not y_ok:
        store_row(y[o:o + n], 0, n, ykind, out[:n])


@njit(fastmath=_REDUCE, cache=True, error_model="numpy")
def _block_moments(a, cp):
    """(mean, M2) of a, in float64, by a corrected two-pass in the compute type: the deviations'
    own sum removes the rounding error of the first mean (Chan, Golub & LeVeque)."""
    s = cp[2]
    for j in range(a.size):
        s += a[j]
    mu = s / cp.dtype.type(a.size)
    sd, ss = cp[2], cp[2]
    for j in range(a.size):
        d = a[j] - mu
        sd += d
        ss += d * d
    sd64, n64 = np.float64(sd), np.float64(a.size)
    return np.float64(mu) + sd64 / n64, np.float64(ss) - sd64 * sd64 / n64


# Block moments are merged in float64 (a few operations per block): a float32 running mean
# would gain a rounding error per merge, which a mean far from zero (1e4 with unit spread)
# turns into visible gradient errors.
@njit(inline="always", cache=True, error_model="numpy")
def _chan(mean, m2, cnt, bmean, bm2, bcnt):
    """Merge the float64 moments (mean, M2) of cnt elements with those of bcnt more (Chan)."""
    tot = cnt + bcnt
    if tot == 0:
        return mean, m2, tot
    f = np.float64(bcnt) / np.float64(tot)
    d = np.float64(bmean) - mean
    return mean + d * f, m2 + np.float64(bm2) + d * d * np.float64(cnt) * f, tot


@njit(cache=True, error_model="numpy")
def _chunk_moments(x, xkind, base, size, buf, cp):
    """(mean, M2) in float64 of the contiguous run x[base:base + size], block by block."""
    mu, m2, cnt = 0.0, 0.0, 0
    for o in range(base, base + size, _BLOCK):
        n = min(_BLOCK, base + size - o)
        bm, bm2 = _block_moments(_read(x, xkind, o, n, buf), cp)
        mu, m2, cnt = _chan(mu, m2, cnt, bm, bm2, n)
    return mu, m2


@njit(cache=True, error_model="numpy")
def _affine(src, a, sh, silu, dst, cp):
    """dst = silu?(src·a + sh), a and sh scalars."""
    if silu:
        for j in range(dst.size):
            z = src[j] * a + sh
            dst[j] = z / (cp[1] + _exp(-z))
    else:
        for j in range(dst.size):
            dst[j] = src[j] * a + sh


@njit(cache=True, error_model="numpy")
def _affine_channels(src, a, sh, silu, dst, cp):
    """dst = silu?(src·a + sh), a and sh per channel (channels-last rows)."""
    if silu:
        for c in range(dst.size):
            z = src[c] * a[c] + sh[c]
            dst[c] = z / (cp[1] + _exp(-z))
    else:
        for c in range(dst.size):
            dst[c] = src[c] * a[c] + sh[c]


@njit(inline="always", cache=True, error_model="numpy")
def _dsilu(d, z, one):
    """dy·silu'(z)."""
    sig = one / (one + _exp(-z))
    return d * sig * (one + z * (one - sig))


@njit(cache=True, error_model="numpy")
def _silu_grad(d, xs, mu, r, wc, bc, out, cp):
    """out = dy·silu'(z), z = x̂·w + b recomputed from x (one channel's run)."""
    for j in range(out.size):
        out[j] = _dsilu(d[j], (xs[j] - mu) * r * wc + bc, cp[1])
    return out


@njit(fastmath=_REDUCE, cache=True, error_model="numpy")
def _grad_sums(d, xs, mu, r, cp):
    """(Σ g, Σ g·x̂) over one block."""
    s1, s2 = cp[2], cp[2]
    for j in range(d.size):
        g = d[j]
        s1 += g
        s2 += g * ((xs[j] - mu) * r)
    return s1, s2


@njit(cache=True, error_model="numpy")
def _dnorm(d, xs, mu, r, wc, mg, mgx, dst):
    """dx = rstd·(w·g − mg − x̂·mgx) with scalar statistics."""
    for j in range(dst.size):
        dst[j] = r * (wc * d[j] - mg - (xs[j] - mu) * r * mgx)


@njit(cache=True, error_model="numpy")
def _sum_over_n(parts, n_, c_, out):
    """out[c] = Σ_n parts[n, c], n = 0, 1, ... in order. Serial: N·C additions do not pay for
    a parallel region (which on a loaded machine waits for every thread to be scheduled)."""
    for c in range(c_):
        s = parts[c]
        for n in range(1, n_):
            s += parts[n * c_ + c]
        out[c] = s


# --- channels first: one task per (n, g) ----------------------------------------------------------


@njit(inline="always", cache=True, error_model="numpy")
def _span(i, parts, total):
    """Tasks [lo, hi) of the i-th of `parts` equal runs (one run per thread: the scratch buffers
    are allocated once per run; results do not depend on the split)."""
    per = (total + parts - 1) // parts
    return i * per, min(total, (i + 1) * per)


@njit(parallel=True, cache=True, error_model="numpy")
def _fwd_cf(x, xkind, w, b, y, ykind, mean, var, n_, c_, s_, groups, cp, silu, runs):
    cg = c_ // groups
    size = cg * s_
    eps, one = cp[0], cp[1]
    for i in prange(runs):
        buf = np.empty(min(size, _BLOCK), cp.dtype)
        out = np.empty(min(s_, _BLOCK), cp.dtype)
        lo, hi = _span(i, runs, n_ * groups)
        for t in range(lo, hi):
            g = t % groups
            base = t * size
            mu64, m2 = _chunk_moments(x, xkind, base, size, buf, cp)
            mean[t] = mu64
            var[t] = m2 / size
            mu, v = mean[t], var[t]  # rounded as the backward will read them
            r = one / np.sqrt(v + eps)
            for ci in range(cg):
                c = g * cg + ci
                a = r * w[c]
                sh = b[c] - mu * a
                row = base + ci * s_
                for o in range(row, row + s_, _BLOCK):
                    n = min(_BLOCK, row + s_ - o)
                    _affine(_read(x, xkind, o, n, buf), a, sh, silu, _dest(y, o, n, out), cp)
                    _flush(y, ykind, o, n, out)


@njit(cache=True, error_model="numpy")
def _bwd_group(dy, dykind, x, xkind, w, b, mean, var, dx, dxkind, sdy, sdyx, t, c_, s_, groups,
               cp, silu, keep, xb, db, gb, ob):
    """Backward of group t = (n, g): sweep 0 sums Σg, Σg·x̂ per channel, sweep 1 writes dx."""
    cg = c_ // groups
    size = cg * s_
    n, g = t // groups, t % groups
    base = t * size
    mu = mean[t]
    r = cp[1] / np.sqrt(var[t] + cp[0])
    gs, gsx, mg, mgx = cp[2], cp[2], cp[2], cp[2]
    for sweep in range(2):
        if sweep == 1:
            mg = gs / cp.dtype.type(size)
            mgx = gsx / cp.dtype.type(size)
        for ci in range(cg):
            c = g * cg + ci
            row = base + ci * s_
            s1, s2 = cp[2], cp[2]
            for o in range(row, row + s_, _BLOCK):
                k = min(_BLOCK, row + s_ - o)
                xs = _read(x, xkind, o, k, xb)
                ds = _read(dy, dykind, o, k, db)
                if silu:
                    go = o - base if keep else 0
                    if sweep == 0 or not keep:
                        ds = _silu_grad(ds, xs, mu, r, w[c], b[c], gb[go:go + k], cp)
                    else:
                        ds = gb[go:go + k]
                if sweep == 0:
                    a1, a2 = _grad_sums(ds, xs, mu, r, cp)
                    s1 += a1
                    s2 += a2
                else:
                    _dnorm(ds, xs, mu, r, w[c], mg, mgx, _dest(dx, o, k, ob))
                    _flush(dx, dxkind, o, k, ob)
            if sweep == 0:
                sdy[n * c_ + c] = s1
                sdyx[n * c_ + c] = s2
                gs += w[c] * s1
                gsx += w[c] * s2


@njit(parallel=True, cache=True, error_model="numpy")
def _bwd_cf(dy, dykind, x, xkind, w, b, mean, var, dx, dxkind, sdy, sdyx, n_, c_, s_, groups,
            cp, silu, runs):
    cg = c_ // groups
    size = cg * s_
    blk = min(s_, _BLOCK)
    keep = silu and size <= _SILU_KEEP  # g kept from the first sweep instead of recomputed
    for i in prange(runs):
        xb, db, ob = np.empty(blk, cp.dtype), np.empty(blk, cp.dtype), np.empty(blk, cp.dtype)
        gb = np.empty(size if keep else blk, cp.dtype)
        lo, hi = _span(i, runs, n_ * groups)
        for t in range(lo, hi):
            _bwd_group(dy, dykind, x, xkind, w, b, mean, var, dx, dxkind, sdy, sdyx, t, c_, s_,
                       groups, cp, silu, keep, xb, db, gb, ob)


# --- channels last: blocks of `rows` positions × C channels ---------------------------------------
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


# --- launchers ------------------------------------------------------------------------------------


def threads(work: int) -> int:
    """Threads for a call over `work` elements: one below PARALLEL_GRAIN (set it with
    numba.set_num_threads around the call), else numba's setting."""
    return 1 if work < PARALLEL_GRAIN else numba.get_num_threads()


class OneThreadIf:
    """Run the kernels inside on the calling thread when `on` (small calls)."""

    __slots__ = ("on", "previous")

    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self) -> None:
        if self.on:
            self.previous = numba.get_num_threads()
            numba.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        if self.on:
            numba.set_num_threads(self.previous)


def consts(ct: torch.dtype, eps: float) -> np.ndarray:
    """Scalars in the compute type: eps, 1, 0."""
    return np.array([eps, 1.0, 0.0], dtype=np.float64 if ct == torch.float64 else np.float32)


def cl_rows(c: int) -> int:
    """Spatial positions per channels-last block: from C alone."""
    return max(1, _CL_BLOCK // max(c, 1))


def layout_strides(shape, channels_last: bool) -> tuple[int, int, int]:
    _, c, s = shape
    return (c * s, 1, c) if channels_last else (c * s, s, 1)


def conform(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """t (N, C, S) in the layout the kernels index: contiguous, or channels innermost (strides
    of size-1 dims do not matter: the kernels never step along them)."""
    strides = t.stride()
    want = layout_strides(t.shape, channels_last)
    if strides == want or all(a == b or size <= 1
                              for a, b, size in zip(strides, want, t.shape)):
        return t
    return t.transpose(1, 2).contiguous().transpose(1, 2) if channels_last else t.contiguous()


def empty_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A new tensor of x's shape and dtype with the layout's exact strides (as the fake ops)."""
    return torch.empty_strided(x.shape, layout_strides(x.shape, channels_last), dtype=x.dtype)


def flat(t: torch.Tensor) -> tuple[np.ndarray, int]:
    """(1-D numpy view of the memory t spans, kind): for the layouts here, element (n, c, s) at
    its layout's offset."""
    return as_flat_array(t)


def group_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                   eps: float, silu: bool, channels_last: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = conform(x, channels_last)
    n_, c_, s_ = x.shape
    cp = consts(weight.dtype, eps)
    y = empty_layout(x, channels_last)
    # statistics are internal (saved for backward): numpy-owned memory is cheaper to hand over
    ma, va = np.empty(n_ * groups, cp.dtype), np.empty(n_ * groups, cp.dtype)
    mean, var = torch.from_numpy(ma).view(n_, groups), torch.from_numpy(va).view(n_, groups)
    if x.numel() == 0:
        return y, mean.fill_(float("nan")), var.fill_(float("nan"))
    xa, xk = flat(x)
    ya, yk = flat(y)
    wa, ba = flat(weight)[0], flat(bias)[0]
    nt = threads(x.numel())
    with OneThreadIf(nt == 1):
        if not channels_last:
            _fwd_cf(xa, xk, wa, ba, ya, yk, ma, va, n_, c_, s_, groups, cp, silu,
                    max(1, min(n_ * groups, nt)))
            return y, mean, var
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
                   mean: torch.Tensor, var: torch.Tensor, groups: int, eps: float, silu: bool,
                   channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = conform(x, channels_last)
    dy = conform(dy, channels_last)
    n_, c_, s_ = x.shape
    cp = consts(weight.dtype, eps)
    dx = empty_layout(x, channels_last)
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
        if not channels_last:
            _bwd_cf(dya, dyk, xa, xk, wa, ba, ma, va, dxa, dxk, sa, sxa, n_, c_, s_, groups, cp,
                    silu, max(1, min(n_ * groups, nt)))
        else:
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
