"""What the channel norms' kernels share (GroupNorm, InstanceNorm, BatchNorm): moments and their
merging, SiLU, and the stores of y and dx, for channels-first runs of elements.

The kernels view the input as (N, C, S), S the product of the spatial sizes, and compute in
float32 (float64 for float64 input); `cp` is a small array of constants in the compute type:
eps, 1, 0. Channels-last blocks have their own functions (`_cl_blocks.py`).

numba's defaults are changed where they cost: inner loops run over slices indexed from 0 (an
index `o + j` is checked for wrap-around, which halves the speed), and exp in float32 is a
polynomial (numba calls libm's expf per element without Intel SVML).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from fusednorm.cpu._channels import BLOCK, KEEP
from fusednorm.cpu.kernels._dtypes import OPTS, as_float, is_bf16, load, row_view, store

# Reassociation (and FMA contraction) for the reductions only, so LLVM vectorizes them. Never
# nnan/ninf: NaN and inf must propagate as in torch.
REDUCE = {"reassoc", "contract", "arcp"}


# --- scalar helpers ------------------------------------------------------------------------------


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the int32 `bits` (a plain bitcast, so it vectorizes)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@njit(**OPTS)
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


def exp(v):
    """exp in the compute type: `_expf` for float32, libm for float64."""
    raise NotImplementedError


@overload(exp)
def _exp_impl(v):
    if v == types.float32:
        return lambda v: _expf(v)
    return lambda v: np.exp(v)


@njit(**OPTS)
def silu(z, one):
    return z / (one + exp(-z))


@njit(**OPTS)
def dsilu(d, z, one):
    """dy·silu'(z)."""
    sig = one / (one + exp(-z))
    return d * sig * (one + z * (one - sig))


# --- moments -----------------------------------------------------------------------------------


@njit(fastmath=REDUCE, **OPTS)
def block_moments(a, cp):
    """(mean, M2) of a, in float64, by a corrected two-pass in the compute type: the deviations'
    own sum removes the rounding error of the first mean (Chan, Golub & LeVeque)."""
    s = cp[2]
    for j in range(a.size):
        s += a[j]
    return deviations(a, s, cp)


@njit(fastmath=REDUCE, **OPTS)
def deviations(a, s, cp):
    """`block_moments` of a (float, or bfloat16 read in place) given s = Σa."""
    mu = s / cp.dtype.type(a.size)
    sd, ss = cp[2], cp[2]
    for j in range(a.size):
        d = as_float(a, j) - mu
        sd += d
        ss += d * d
    sd64, n64 = np.float64(sd), np.float64(a.size)
    if not np.isfinite(mu):  # an inf (or NaN) in the block: the mean is the sum's, as torch's
        return np.float64(mu), np.float64(np.nan)
    return np.float64(mu) + sd64 / n64, np.float64(ss) - sd64 * sd64 / n64


# Block moments are merged in float64 (a few operations per block): a float32 running mean
# would gain a rounding error per merge, which a mean far from zero (1e4 with unit spread)
# turns into visible gradient errors.
@njit(**OPTS)
def chan(mean, m2, cnt, bmean, bm2, bcnt):
    """Merge the float64 moments (mean, M2) of cnt elements with those of bcnt more (Chan)."""
    tot = cnt + bcnt
    if tot == 0:
        return mean, m2, tot
    if not (np.isfinite(mean) and np.isfinite(bmean)):  # inf - inf must not make the mean NaN
        return (mean * cnt + bmean * bcnt) / tot, np.float64(np.nan), tot
    f = np.float64(bcnt) / np.float64(tot)
    d = np.float64(bmean) - mean
    return mean + d * f, m2 + np.float64(bm2) + d * d * np.float64(cnt) * f, tot


@njit(fastmath=REDUCE, **OPTS)
def run_moments(a, cp):
    """(mean, M2) in float64 of the run a (float or bfloat16): the moments of each block of
    `BLOCK` (Σ, then `deviations`: read twice while in L1, never copied), merged in order with
    Chan's formula."""
    mu, m2, cnt = 0.0, 0.0, 0
    for o in range(0, a.size, BLOCK):
        blk = a[o:o + BLOCK]
        k = blk.size
        s = cp[2]
        for j in range(k):
            s += as_float(blk, j)
        bm, bm2 = deviations(blk, s, cp)
        mu, m2, cnt = chan(mu, m2, cnt, bm, bm2, k) if o else (bm, bm2, k)
    return mu, m2


def load_moments(x, o, n, buf, cp):
    """(mean, M2) in float64 of x[o:o + n] as `block_moments`, leaving it converted in buf when
    x is not stored in the compute type."""
    raise NotImplementedError


@overload(load_moments)
def _load_moments(x, o, n, buf, cp):
    if x.dtype == buf.dtype:
        return lambda x, o, n, buf, cp: block_moments(x[o:o + n], cp)

    def convert(x, o, n, buf, cp):
        return block_moments(row_view(x, o, n, buf), cp)
    return convert


@njit(fastmath=REDUCE, **OPTS)
def grad_sums(d, xs, mu, r, cp):
    """(Σ g, Σ g·x̂) over one block (float, or bfloat16 read in place)."""
    s1, s2 = cp[2], cp[2]
    for j in range(d.size):
        g = as_float(d, j)
        s1 += g
        s2 += g * ((as_float(xs, j) - mu) * r)
    return s1, s2


def load_grad_sums(dy, x, o, n, gq, xq, mu, r, cp):
    """(dy, x)[o:o + n] in the compute type (views, or converted into gq, xq) and their
    (Σg, Σg·x̂) as `grad_sums`; bfloat16 blocks are converted and summed in one pass."""
    raise NotImplementedError


@overload(load_grad_sums, jit_options={"fastmath": REDUCE, **OPTS})
def _load_grad_sums(dy, x, o, n, gq, xq, mu, r, cp):
    if is_bf16(x) and is_bf16(dy):

        def bf16(dy, x, o, n, gq, xq, mu, r, cp):
            ds, xs = gq[:n], xq[:n]
            xb, db = x[o:o + n], dy[o:o + n]
            s1, s2 = cp[2], cp[2]
            for j in range(n):
                xv, g = load(xb, j), load(db, j)
                xs[j] = xv
                ds[j] = g
                s1 += g
                s2 += g * ((xv - mu) * r)
            return ds, xs, s1, s2

        return bf16

    def other(dy, x, o, n, gq, xq, mu, r, cp):
        xs, ds = row_view(x, o, n, xq), row_view(dy, o, n, gq)
        s1, s2 = grad_sums(ds, xs, mu, r, cp)
        return ds, xs, s1, s2

    return other


@njit(**OPTS)
def silu_grad(d, xs, mu, r, wc, bc, out, cp):
    """out = dy·silu'(z), z = x̂·w + b recomputed from x (one channel's run)."""
    for j in range(out.size):
        out[j] = dsilu(load(d, j), (load(xs, j) - mu) * r * wc + bc, cp[1])
    return out


@njit(**OPTS)
def sum_over_n(parts, n_, c_, lo, hi, out):
    """out[c] = Σ_n parts[n, c], n = 0, 1, ... in order, for the channels c in [lo, hi)."""
    for c in range(lo, hi):
        s = parts[c]
        for n in range(1, n_):
            s += parts[n * c_ + c]
        out[c] = s


def dest(y, o, n, out):
    """Where to write (or find kept) y[o:o + n]: in place when y is stored in the compute
    type, else out."""
    raise NotImplementedError


@overload(dest)
def _dest(y, o, n, out):
    if y.dtype == out.dtype:
        return lambda y, o, n, out: y[o:o + n]
    return lambda y, o, n, out: out[:n]


# --- the stores of y and dx -----------------------------------------------------------------------


@njit(**OPTS)
def store_affine(src, a, sh, with_silu, y, yo, one):
    """y[yo:yo + n] = silu?(src·a + sh) in y's storage type, n = src.size. One pass from the
    float (or bfloat16) segment; no FMA contraction: sh = b − mean·a holds a rounded product,
    which x·a must cancel alike."""
    d = y[yo:yo + src.size]
    if with_silu:
        for j in range(d.size):
            store(d, j, silu(as_float(src, j) * a + sh, one))
    else:
        for j in range(d.size):
            store(d, j, as_float(src, j) * a + sh)


@njit(**OPTS)
def store_dnorm(g, xs, mu, r, wc, mg, mgx, dx, o):
    """dx[o:o + n] = rstd·(w·g − mg − x̂·mgx) in dx's storage type, n = g.size, as
    A·g + B·(x − mean) + C with the scalars folded (three operations an element, not seven)."""
    d = dx[o:o + g.size]
    fa, fb, fc = r * wc, -(r * r * mgx), -(r * mg)
    for j in range(d.size):
        store(d, j, fa * as_float(g, j) + fb * (as_float(xs, j) - mu) + fc)


__all__ = ["BLOCK", "KEEP", "REDUCE"]
