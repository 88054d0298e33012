"""What the channel norms' kernels share (GroupNorm, InstanceNorm, BatchNorm): block moments and
their merging in float64, and SiLU.

They are intrinsics, LLVM IR emitted where they are called, like the loads and stores of
`_dtypes.py`: a numba function costs a first call ~20 ms to compile (or to inline), however
small, and the kernels call these in several places.

Statistics are taken per block of elements by a corrected two-pass in the compute type (a
provisional mean, then the sums of the deviations from it; the provisional mean a pilot value,
the median of three of the block's elements, so that the block is read once: `FAR`) and merged
block by block in float64 with Chan's formula: a float32 running mean would gain a rounding
error per merge, which a mean far from zero (1e4 with unit spread) turns into visible gradient
errors.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_F64 = ir.DoubleType()
_NAN = float("nan")

# Deviations taken from a pilot value rather than from their block's mean: where the pilot lies
# this far from the mean, (Σd)² / k > FAR · Σd² (Σd² over 8x the sum about the mean, rounding
# errors amplified as much), the sums are taken again about the mean they give.
FAR = 7.0 / 8.0


def _finite(builder, v):
    """v is neither inf nor NaN: v - v is 0 exactly then (NaN otherwise)."""
    return builder.fcmp_ordered("==", builder.fsub(v, v), v.type(0.0))


@intrinsic
def pilot(typingctx, a, b, c):
    """The median of a, b and c (three of a block's elements), 0 where it is not finite: the
    value a block's deviations are summed about (`FAR`)."""
    def codegen(context, builder, sig, args):
        x, y, z = args
        below = builder.fcmp_ordered("<", x, y)
        lo, hi = builder.select(below, x, y), builder.select(below, y, x)
        hi = builder.select(builder.fcmp_ordered("<", hi, z), hi, z)
        m = builder.select(builder.fcmp_ordered(">", lo, hi), lo, hi)
        return builder.select(_finite(builder, m), m, m.type(0.0))

    return a(a, b, c), codegen


@intrinsic
def moments(typingctx, mean, sd, ss, k):
    """(mean, M2) in float64 of a block of k elements, from its provisional mean and the sums of
    the deviations from it, Σd and Σd² (compute type): the deviations' own sum corrects the
    provisional mean's rounding (Chan, Golub & LeVeque). A block holding an inf or NaN: its
    mean is the sum's, as torch's, and M2 NaN."""
    def codegen(context, builder, sig, args):
        m, d1, d2 = (context.cast(builder, v, t, types.float64)
                     for v, t in zip(args[:3], sig.args[:3]))
        n = builder.sitofp(context.cast(builder, args[3], sig.args[3], types.int64), _F64)
        inv = builder.fdiv(_F64(1.0), n)  # (hoisted out of a loop over groups by LLVM)
        fin = _finite(builder, m)
        mu = builder.select(fin, builder.fadd(m, builder.fmul(d1, inv)), m)
        m2 = builder.fsub(d2, builder.fmul(builder.fmul(d1, d1), inv))
        m2 = builder.select(fin, m2, _F64(_NAN))
        return context.make_tuple(builder, sig.return_type, (mu, m2))

    return types.UniTuple(types.float64, 2)(mean, sd, ss, k), codegen


@intrinsic
def chan(typingctx, mean, m2, cnt, bmean, bm2, k):
    """Chan's merge of the float64 moments (mean, M2) of cnt elements with (bmean, bm2) of k
    more: (mean, M2, cnt + k); cnt 0 takes the block's. An inf or NaN on either side gives the
    counts' weighted mean (inf - inf must not make it NaN) and M2 NaN."""
    def codegen(context, builder, sig, args):
        mu, s2, c, bm, b2 = (context.cast(builder, v, t, types.float64) if i != 2 else v
                             for i, (v, t) in enumerate(zip(args[:5], sig.args[:5])))
        c = context.cast(builder, c, sig.args[2], types.int64)
        kk = context.cast(builder, args[5], sig.args[5], types.int64)
        tot = builder.add(c, kk)
        fc, fk, ft = (builder.sitofp(v, _F64) for v in (c, kk, tot))
        f = builder.fdiv(fk, ft)
        d = builder.fsub(bm, mu)
        merged = builder.fadd(mu, builder.fmul(d, f))
        m2 = builder.fadd(builder.fadd(s2, b2),
                          builder.fmul(builder.fmul(builder.fmul(d, d), fc), f))
        # (only its inf or NaN matters: a reciprocal, which LLVM hoists like f, will do)
        weighted = builder.fmul(builder.fadd(builder.fmul(mu, fc), builder.fmul(bm, fk)),
                                builder.fdiv(_F64(1.0), ft))
        fin = builder.and_(_finite(builder, mu), _finite(builder, bm))
        merged = builder.select(fin, merged, weighted)
        m2 = builder.select(fin, m2, _F64(_NAN))
        first = builder.icmp_signed("==", c, c.type(0))
        return context.make_tuple(builder, sig.return_type, (
            builder.select(first, bm, merged), builder.select(first, b2, m2), tot))

    return types.Tuple((types.float64, types.float64, types.int64))(mean, m2, cnt, bmean, bm2,
                                                                     k), codegen


# exp(-z) in float32 as code LLVM vectorizes (numba would call libm's expf per element):
# Cephes' reduction -z = k·ln2 + r and its degree-7 polynomial, about 1.3 ulp, in fused
# multiply-adds where the CPU has them (`llvm.fmuladd`: one instruction instead of two; the
# SiLU's exponential is most of a fused GroupNorm+SiLU's work). For the sigmoid alone: -z is
# clamped to [-87.3, 88.3], so that z > 87.3 gives a tiny exp (1 + it rounds to 1, as 1 + 0
# does) and z NaN a finite one (the callers' other factor z carries the NaN); -z > 88.3 gives
# inf (z = -inf: torch's -inf / (1 + inf), NaN).
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
             1.6666665459e-1, 5.0000001201e-1)


def _exp_neg(builder, z):
    if z.type == _F64:
        fn = builder.module.declare_intrinsic("llvm.exp", [_F64])
        return builder.call(fn, [builder.fneg(z)])
    f32 = ir.FloatType()
    module = builder.module
    fma = module.declare_intrinsic("llvm.fmuladd", [f32], ir.FunctionType(f32, [f32] * 3))
    roundeven = module.declare_intrinsic("llvm.roundeven", [f32])
    t = builder.fneg(z)
    hi, lo = f32(88.3), f32(-87.33654)
    tc = builder.select(builder.fcmp_ordered(">", t, lo), t, lo)
    tc = builder.select(builder.fcmp_ordered("<", tc, hi), tc, hi)
    k = builder.call(roundeven, [builder.fmul(tc, f32(1.4426950408889634))])
    r = builder.call(fma, [k, f32(-0.693359375), tc])
    r = builder.call(fma, [k, f32(2.12194440e-4), r])
    p = f32(_EXP_POLY[0])
    for c in _EXP_POLY[1:]:
        p = builder.call(fma, [p, r, f32(c)])
    i32 = ir.IntType(32)
    scale = builder.bitcast(builder.shl(builder.add(builder.fptosi(k, i32), i32(127)), i32(23)),
                            f32)
    y = builder.fadd(builder.call(fma, [p, builder.fmul(r, r), r]), f32(1))
    y = builder.fmul(y, scale)
    return builder.select(builder.fcmp_ordered(">", t, hi), f32(float("inf")), y)


def _sigmoid(builder, z):
    one = z.type(1.0)
    return builder.fdiv(one, builder.fadd(one, _exp_neg(builder, z)))


@intrinsic
def silu(typingctx, z):
    """z·sigmoid(z) = z / (1 + exp(-z))."""
    def codegen(context, builder, sig, args):
        z = args[0]
        return builder.fdiv(z, builder.fadd(z.type(1.0), _exp_neg(builder, z)))

    return z(z), codegen


@intrinsic
def dsilu(typingctx, d, z):
    """d·silu'(z) = d·s·(1 + z·(1 - s)), s = sigmoid(z)."""
    def codegen(context, builder, sig, args):
        d, z = args
        one = z.type(1.0)
        s = _sigmoid(builder, z)
        return builder.fmul(builder.fmul(d, s),
                            builder.fadd(one, builder.fmul(z, builder.fsub(one, s))))

    return z(d, z), codegen
