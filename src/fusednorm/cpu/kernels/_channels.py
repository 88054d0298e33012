"""What the channel norms' kernels share (GroupNorm, InstanceNorm, BatchNorm): block moments and
their merging in float64, and SiLU.

They are intrinsics, LLVM IR emitted where they are called, like the loads and stores of
`_dtypes.py`: a numba function costs a first call ~20 ms to compile (or to inline), however
small, and the kernels call these in several places.

Statistics are taken per block of elements by a corrected two-pass in the compute type (a
provisional mean, then the sums of the deviations from it) and merged block by block in
float64 with Chan's formula: a float32 running mean would gain a rounding error per merge,
which a mean far from zero (1e4 with unit spread) turns into visible gradient errors.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_F64 = ir.DoubleType()
_NAN = float("nan")


def _finite(builder, v):
    """v is neither inf nor NaN: v - v is 0 exactly then (NaN otherwise)."""
    return builder.fcmp_ordered("==", builder.fsub(v, v), v.type(0.0))


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


# exp in float32 as code LLVM vectorizes (numba would call libm's expf per element): Cephes'
# reduction t = k·ln2 + r and its degree-7 polynomial, about 1.3 ulp. Overflows to inf a little
# early (t > 88.3) and underflows to 0 below the normal range; NaN stays NaN.
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
             1.6666665459e-1, 5.0000001201e-1)


def _exp(builder, t):
    if t.type == _F64:
        fn = builder.module.declare_intrinsic("llvm.exp", [_F64])
        return builder.call(fn, [t])
    f32 = ir.FloatType()
    hi, lo = f32(88.3), f32(-87.33654)
    tc = builder.select(builder.fcmp_ordered(">", t, lo), t, lo)
    tc = builder.select(builder.fcmp_ordered("<", tc, hi), tc, hi)
    floor = builder.module.declare_intrinsic("llvm.floor", [f32])
    k = builder.call(floor, [builder.fadd(builder.fmul(tc, f32(1.4426950408889634)), f32(0.5))])
    r = builder.fsub(builder.fsub(tc, builder.fmul(k, f32(0.693359375))),
                     builder.fmul(k, f32(-2.12194440e-4)))
    p = f32(_EXP_POLY[0])
    for c in _EXP_POLY[1:]:
        p = builder.fadd(builder.fmul(p, r), f32(c))
    i32 = ir.IntType(32)
    scale = builder.bitcast(builder.shl(builder.add(builder.fptosi(k, i32), i32(127)), i32(23)),
                            f32)
    y = builder.fmul(builder.fadd(builder.fadd(builder.fmul(builder.fmul(p, r), r), r), f32(1)),
                     scale)
    y = builder.select(builder.fcmp_ordered(">", t, hi), f32(float("inf")), y)
    y = builder.select(builder.fcmp_ordered("<", t, lo), f32(0), y)
    return builder.select(builder.fcmp_unordered("uno", t, t), t, y)


def _sigmoid(builder, z):
    one = z.type(1.0)
    return builder.fdiv(one, builder.fadd(one, _exp(builder, builder.fneg(z))))


@intrinsic
def silu(typingctx, z):
    """z·sigmoid(z) = z / (1 + exp(-z))."""
    def codegen(context, builder, sig, args):
        z = args[0]
        return builder.fdiv(z, builder.fadd(z.type(1.0), _exp(builder, builder.fneg(z))))

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
