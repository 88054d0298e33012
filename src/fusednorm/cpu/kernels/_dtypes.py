"""What every numba kernel stands on: its argument block, tensors by address, threads, and the
storage types with their conversions.

Storage: numba has no float16 or bfloat16 on the CPU, so half tensors arrive as their bit
patterns, bfloat16 in uint16 arrays and float16 in int16 arrays (`_launch.STORAGE`). Kernels
compute in float32 (float64 for float64 input) and convert on load and store; which conversion
is decided by the array's numba type when the kernel is compiled, never per element at run time.
The conversions round exactly like torch's casts.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from numba.np.arrayobj import make_array, populate_array

_I32 = ir.IntType(32)
OPTS = {"cache": False, "error_model": "numpy"}  # error_model: no divide-by-zero checks (torch
# gives inf), which would also keep LLVM from vectorizing; kernels are cached by _launch instead


# --- addresses, the argument block, threads ------------------------------------------------------


def _dtype_of(tag):
    """The element type a tag stands for: a numpy scalar class (np.float32) or an array."""
    return tag.instance_type if isinstance(tag, types.NumberClass) else tag.dtype


def _array_at(context, builder, array_type, addr, n):
    """An array struct of array_type over n elements at the integer address addr."""
    array = make_array(array_type)(context, builder)
    item = context.get_abi_sizeof(context.get_data_type(array_type.dtype))
    data = builder.inttoptr(addr, context.get_value_type(types.CPointer(array_type.dtype)))
    intp = context.get_value_type(types.intp)
    populate_array(array, data=data, shape=[n], strides=[intp(item)], itemsize=intp(item),
                   meminfo=None)
    return array._getvalue()


@intrinsic
def at(typingctx, addr, n, tag):
    """The n elements of tag's type at address addr, as a 1-D array (no copy and no reference
    counting: the launcher keeps the tensor alive for the call). An intrinsic, not a numba
    function: it costs no compilation of its own."""
    if isinstance(tag, types.NoneType):  # an absent tensor
        return types.none(addr, n, tag), lambda context, builder, sig, args: None
    array_type = types.Array(_dtype_of(tag), 1, "C")

    def codegen(context, builder, sig, args):
        address = context.cast(builder, args[0], sig.args[0], types.intp)
        count = context.cast(builder, args[1], sig.args[1], types.intp)
        return _array_at(context, builder, array_type, address, count)

    return array_type(addr, n, tag), codegen


@intrinsic
def ints(typingctx, block, n):
    """The argument block's n slots as int64 (addresses, sizes, flags)."""
    array_type = types.Array(types.int64, 1, "C")

    def codegen(context, builder, sig, args):
        address = builder.ptrtoint(args[0], context.get_value_type(types.intp))
        count = context.cast(builder, args[1], sig.args[1], types.intp)
        return _array_at(context, builder, array_type, address, count)

    return array_type(block, n), codegen


@intrinsic
def floats(typingctx, block, n):
    """The argument block's n slots as float64 (its float slots; see `_launch.Layout`)."""
    array_type = types.Array(types.float64, 1, "C")

    def codegen(context, builder, sig, args):
        address = builder.ptrtoint(args[0], context.get_value_type(types.intp))
        count = context.cast(builder, args[1], sig.args[1], types.intp)
        return _array_at(context, builder, array_type, address, count)

    return array_type(block, n), codegen


thread_id = types.ExternalFunction("omp_get_thread_num", types.int32())
num_threads = types.ExternalFunction("omp_get_num_threads", types.int32())
barrier = types.ExternalFunction("GOMP_barrier", types.void())  # returns at once when serial


@intrinsic
def my_share(typingctx, total):
    """[lo, hi): this thread's equal share of `total` tasks (all of them when serial)."""
    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        fnty = ir.FunctionType(ir.IntType(32), [])
        mod = builder.module
        t = builder.sext(builder.call(cgutils.get_or_insert_function(
            mod, fnty, "omp_get_thread_num"), []), i64)
        nt = builder.sext(builder.call(cgutils.get_or_insert_function(
            mod, fnty, "omp_get_num_threads"), []), i64)
        tot = context.cast(builder, args[0], sig.args[0], types.int64)
        per = builder.sdiv(builder.sub(builder.add(tot, nt), i64(1)), nt)

        def clamp(v):
            return builder.select(builder.icmp_signed("<", v, tot), v, tot)

        lo = clamp(builder.mul(t, per))
        hi = clamp(builder.mul(builder.add(t, i64(1)), per))
        return context.make_tuple(builder, sig.return_type, (lo, hi))

    return types.UniTuple(types.int64, 2)(total), codegen


_NUMPY = {"float32": np.float32, "float64": np.float64, "uint16": np.uint16, "int16": np.int16}


def storage_type(name: str):
    """The numpy scalar type of a storage name (`_launch.STORAGE`), None for "" (absent)."""
    return _NUMPY[name] if name else None


# --- scalar conversions (bit-exact with torch's casts) -------------------------------------------
# bfloat16 is written as LLVM IR: numba would widen the integer arithmetic to 64 bits, which
# halves the vector lanes of the loops that convert whole rows.


@intrinsic
def _bf16_bits_to_f32(typingctx, h):
    def codegen(context, builder, sig, args):
        u = builder.shl(builder.zext(args[0], _I32), _I32(16))
        return builder.bitcast(u, ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _f32_to_bf16_bits(typingctx, v):
    def codegen(context, builder, sig, args):
        u = builder.bitcast(args[0], _I32)
        top = builder.lshr(u, _I32(16))
        # round to nearest even on the 16 dropped bits
        rounded = builder.lshr(
            builder.add(u, builder.add(_I32(0x7FFF), builder.and_(top, _I32(1)))), _I32(16)
        )
        quiet_nan = builder.or_(builder.and_(top, _I32(0x8000)), _I32(0x7FC0))
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.trunc(builder.select(is_nan, quiet_nan, rounded), ir.IntType(16))

    return types.uint16(types.float32), codegen


@njit(**OPTS)
def bf16_to_f32(h):
    """bfloat16 bits (uint16) -> float32: the bits are the float32's top half."""
    return _bf16_bits_to_f32(np.uint16(h))


@njit(**OPTS)
def f32_to_bf16(v):
    """float32 -> bfloat16 bits, round to nearest even; NaN -> quiet NaN keeping the sign."""
    return _f32_to_bf16_bits(np.float32(v))


# float16: integer arithmetic in 64 bits (numba widens integer ops to int64 anyway), masked where
# a 32-bit wrap-around is meant. Slower than the bfloat16 paths, which are the ones tuned.


@njit(**OPTS)
def _f32_bits(v):
    return np.int64(np.float32(v).view(np.uint32))


@njit(**OPTS)
def _bits_f32(u):
    return np.uint32(u & 0xFFFFFFFF).view(np.float32)


@njit(**OPTS)
def f16_to_f32(h):
    """float16 bits -> float32, exact for every pattern (subnormals, inf, NaN payload)."""
    u = np.int64(h) & 0xFFFF
    em = (u & 0x7FFF) << 13  # exponent and mantissa moved into float32's fields
    # Rebias the exponent by 2^112 (= 2^(127 - 15)); a float32 multiply also normalises the
    # half's subnormals, which land in float32's subnormal range here.
    scaled = _f32_bits(_bits_f32(em) * np.float32(5.192296858534828e33))
    bits = (em | 0x7F800000) if em >= 0x0F800000 else scaled  # inf/NaN keep their mantissa
    return _bits_f32(bits | ((u & 0x8000) << 16))


@njit(**OPTS)
def f32_to_f16(v):
    """float32 -> float16 bits (as int16), round to nearest even, overflow to inf, NaN kept
    (quietened). F. Giesen's float_to_half_fast3_rtne scheme."""
    u = _f32_bits(v)
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a >= 0x47800000:  # >= 65536: inf (overflow) or NaN
        o = (0x7E00 | ((a >> 13) & 0x3FF)) if a > 0x7F800000 else 0x7C00
    elif a < 0x38800000:  # below half's normal range: let a float add round the subnormal
        o = _f32_bits(_bits_f32(a) + np.float32(0.5)) - 0x3F000000
    else:
        # rebias the exponent, then round to nearest even on the 13 dropped bits
        o = ((a - 0x38000000 + 0xFFF + ((a >> 13) & 1)) >> 13) & 0xFFFF
    return np.int16(np.uint16(o | sign))


# --- element and row access, dispatched on the array's storage type at compile time -------------


def is_bf16(a) -> bool:
    return isinstance(a, types.Array) and a.dtype == types.uint16


def is_f16(a) -> bool:
    return isinstance(a, types.Array) and a.dtype == types.int16


def is_half(a) -> bool:
    """Whether numba type a is an array of half bit patterns (for overloads)."""
    return is_bf16(a) or is_f16(a)


def load(a, i):
    """a[i] as a float: float32 for half storage, the array's own type otherwise."""
    raise NotImplementedError  # only callable from numba code


@overload(load)
def _load(a, i):
    if is_bf16(a):
        return lambda a, i: bf16_to_f32(a[i])
    if is_f16(a):
        return lambda a, i: f16_to_f32(a[i])
    return lambda a, i: a[i]


def store(a, i, v):
    """a[i] = v rounded to a's storage type."""
    raise NotImplementedError


@overload(store)
def _store(a, i, v):
    if is_bf16(a):
        def bf16(a, i, v):
            a[i] = f32_to_bf16(v)
        return bf16
    if is_f16(a):
        def f16(a, i, v):
            a[i] = f32_to_f16(v)
        return f16

    def native(a, i, v):
        a[i] = v
    return native


def load_row(src, off, n, dst):
    """dst[:n] = src[off:off + n] converted to dst's float type."""
    raise NotImplementedError


@overload(load_row)
def _load_row(src, off, n, dst):
    # A slice indexed from 0, not src[off + j]: numba wraps negative signed indices, which
    # would turn the loop into gathers instead of vector loads.
    def impl(src, off, n, dst):
        s = src[off:off + n]
        for j in range(n):
            dst[j] = load(s, j)
    return impl


def store_row(dst, off, n, src):
    """dst[off:off + n] = src[:n] rounded to dst's storage type."""
    raise NotImplementedError


@overload(store_row)
def _store_row(dst, off, n, src):
    def impl(dst, off, n, src):
        d = dst[off:off + n]
        for j in range(n):
            store(d, j, src[j])
    return impl


def as_float(a, j):
    """Element j of a float array, or of a bfloat16 one converted in place (float16 is too slow
    to convert again per sweep: kernels copy it to scratch instead)."""
    raise NotImplementedError


@overload(as_float)
def _as_float(a, j):
    if is_bf16(a):
        return lambda a, j: bf16_to_f32(a[j])
    return lambda a, j: a[j]


def row_view(src, off, n, buf):
    """src[off:off + n] as a row of buf's float type: a view when src is stored in that type,
    else converted into buf. Decided at compile time (only one of the two is compiled)."""
    raise NotImplementedError


@overload(row_view)
def _row_view(src, off, n, buf):
    if src.dtype == buf.dtype:
        return lambda src, off, n, buf: src[off:off + n]

    def convert(src, off, n, buf):
        load_row(src, off, n, buf)
        return buf[:n]
    return convert


def round_to(v, like):
    """v rounded to the storage type of `like` (a scalar of that type) and back to a float."""
    raise NotImplementedError


@overload(round_to)
def _round_to(v, like):
    if like == types.uint16:
        return lambda v, like: bf16_to_f32(f32_to_bf16(v))
    if like == types.int16:
        return lambda v, like: f16_to_f32(f32_to_f16(v))
    return lambda v, like: np.float32(v)  # float32, for float64 compute


def same_or(a, alt):
    """(a, True) when array a has alt's type (read or written in place), else (alt, False).
    Decided at compile time."""
    raise NotImplementedError


@overload(same_or)
def _same_or(a, alt):
    if a == alt:
        return lambda a, alt: (a, True)
    return lambda a, alt: (alt, False)
