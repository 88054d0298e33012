"""What the channel norms' CPU kernels share: block helpers, SiLU, moments, launch utilities.

The kernels (`group_norm.py` channels first, `channels_last.py`, `batch_norm.py`) view the input
as (N, C, S), S the product of the spatial sizes, and compute in float32 (float64 for float64
input), converting half storage on load and store (`_dtypes.py`).

numba's defaults are changed where they cost: error_model="numpy" (the default "python" model
tests every float division for a zero divisor, raising ZeroDivisionError where torch gives inf,
and the test keeps LLVM from vectorizing the loop); inner loops run over slices indexed from 0
(an index `o + j` is checked for wrap-around, which halves the speed); and exp in float32 is a
polynomial (numba calls libm's expf per element without Intel SVML).
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from ._dtypes import as_float, load_row

# Reassociation (and FMA contraction) for the reductions only, so LLVM vectorizes them. Never
# nnan/ninf: NaN and inf must propagate as in torch.
_REDUCE = {"reassoc", "contract", "arcp"}
_BLOCK = 2048  # elements per statistics block: its two passes stay in L1
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
    """(Σ g, Σ g·x̂) over one block (float, or bfloat16 read in place)."""
    s1, s2 = cp[2], cp[2]
    for j in range(d.size):
        g = as_float(d, j)
        s1 += g
        s2 += g * ((as_float(xs, j) - mu) * r)
    return s1, s2


@njit(cache=True, error_model="numpy")
def _sum_over_n(parts, n_, c_, out):
    """out[c] = Σ_n parts[n, c], n = 0, 1, ... in order. Serial: N·C additions do not pay for
    a parallel region (which on a loaded machine waits for every thread to be scheduled)."""
    for c in range(c_):
        s = parts[c]
        for n in range(1, n_):
            s += parts[n * c_ + c]
        out[c] = s


# --- launch utilities ------------------------------------------------------------------------------


_CONSTS: dict[tuple[torch.dtype, float], np.ndarray] = {}


def consts(ct: torch.dtype, eps: float) -> np.ndarray:
    """Scalars in the compute type: eps, 1, 0 (cached: kernels only read them)."""
    cp = _CONSTS.get((ct, eps))
    if cp is None:
        if len(_CONSTS) > 64:
            _CONSTS.clear()
        cp = _CONSTS[ct, eps] = np.array(
            [eps, 1.0, 0.0], dtype=np.float64 if ct == torch.float64 else np.float32)
    return cp



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