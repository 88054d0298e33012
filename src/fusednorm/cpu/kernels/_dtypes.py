"""What every numba kernel stands on: its argument block, tensors by address, threads, and the
storage types with their conversions.

Storage: numba has no float16 or bfloat16 on the CPU, so half tensors arrive as their bit
patterns, bfloat16 in uint16 arrays and float16 in int16 arrays (`_launch.STORAGE`). Kernels
compute in float32 (float64 for float64 input) and convert on load and store; which conversion
is decided by the array's numba type when the kernel is compiled, never per element at run time.
The conversions round exactly like torch's casts.
"""

from __future__ import annotations

import operator

import llvmlite.binding as ll
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.datamodel.models import ArrayModel
from numba.extending import intrinsic, lower_builtin, lower_cast, register_model

_I32 = ir.IntType(32)
# error_model: no divide-by-zero checks (torch gives inf), which would also keep LLVM from
# vectorizing; no cache: kernels are cached by _launch instead; no wrappers: helpers are only
# called from numba code, and the Python and C wrappers of each would cost a first call ~10 ms.
OPTS = {"cache": False, "error_model": "numpy", "no_cpython_wrapper": True,
        "no_cfunc_wrapper": True}


# --- addresses, the argument block, threads ------------------------------------------------------


def _dtype_of(tag):
    """The element type a tag stands for: a numpy scalar class (np.float32) or an array."""
    return tag.instance_type if isinstance(tag, types.NumberClass) else tag.dtype


class Raw(types.Array):
    """The kernels' arrays: numba's 1-D contiguous arrays, whose `a[i]` (i >= 0) is a load and
    `a[i] = v` a store. numba's own indexing wraps negative indices and goes through a stack
    copy of the array struct, several times the IR, and the lowering time, of every access.
    Slicing one gives a plain numba array: kernels take `view(a, offset, n)` instead."""

    def __init__(self, dtype):
        super().__init__(dtype, 1, "C")
        self.name = f"raw({dtype})"


register_model(Raw)(ArrayModel)


# An array struct is built and read with insertvalue and extractvalue alone (no stack copy).
_DATA, _SHAPE = 4, 5  # the fields of numba's array struct (meminfo, parent, nitems, itemsize,
# data, shape, strides)


@lower_cast(Raw, types.Array)
@lower_cast(types.Array, Raw)
def _same_struct(context, builder, fromty, toty, val):
    return val  # (where a Raw and a plain array meet, as the branches of an `if`)


@lower_builtin(operator.getitem, Raw, types.Integer)
def _getitem(context, builder, sig, args):
    return builder.load(_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1]))


@lower_builtin(operator.setitem, Raw, types.Integer, types.Any)
def _setitem(context, builder, sig, args):
    value = context.cast(builder, args[2], sig.args[2], sig.args[0].dtype)
    builder.store(value, _pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1]))
    return context.get_dummy_value()


def _array_at(context, builder, array_type, data, n):
    """An array struct of array_type over n elements at pointer (or integer address) data."""
    ptr_type = context.get_value_type(types.CPointer(array_type.dtype))
    if not isinstance(data.type, ir.PointerType):
        data = builder.inttoptr(data, ptr_type)
    intp = context.get_value_type(types.intp)
    item = intp(context.get_abi_sizeof(context.get_data_type(array_type.dtype)))
    array = context.get_value_type(array_type)(ir.Undefined)
    for i, v in enumerate((array.type.elements[0](None), array.type.elements[1](None), n, item,
                           data)):
        array = builder.insert_value(array, v, i)
    array = builder.insert_value(array, n, [_SHAPE, 0])
    return builder.insert_value(array, item, [_SHAPE + 1, 0])


@intrinsic
def at(typingctx, addr, n, tag):
    """The n elements of tag's type at address addr, as a 1-D array (no copy and no reference
    counting: the launcher keeps the tensor alive for the call). An intrinsic, not a numba
    function: it costs no compilation of its own."""
    if isinstance(tag, types.NoneType):  # an absent tensor
        return types.none(addr, n, tag), lambda context, builder, sig, args: None
    array_type = Raw(_dtype_of(tag))

    def codegen(context, builder, sig, args):
        address = context.cast(builder, args[0], sig.args[0], types.intp)
        count = context.cast(builder, args[1], sig.args[1], types.intp)
        return _array_at(context, builder, array_type, address, count)

    return array_type(addr, n, tag), codegen


@intrinsic
def view(typingctx, a, off, n):
    """a[off:off + n] without numba's slicing (which clamps and wraps its bounds in code of
    its own at every slice): the caller keeps it within a."""
    if not isinstance(a, types.Array):
        return None
    array_type = Raw(a.dtype)

    def codegen(context, builder, sig, args):
        count = context.cast(builder, args[2], sig.args[2], types.intp)
        return _array_at(context, builder, array_type,
                         _pointer(context, builder, a, args[0], args[1], off), count)

    return array_type(a, off, n), codegen


def stack_array(count: int):
    """An intrinsic `local(tag)`: `count` elements of tag's type on the calling kernel's stack,
    allocated once in its entry block, for a few numbers per row that need no launcher's
    scratch (and no allocation). The size is fixed here: an alloca of a run-time size inside a
    loop would grow the stack at every iteration."""

    @intrinsic
    def local(typingctx, tag):
        array_type = Raw(_dtype_of(tag))

        def codegen(context, builder, sig, args):
            ptr = cgutils.alloca_once(builder, context.get_data_type(array_type.dtype),
                                      size=count)
            return _array_at(context, builder, array_type, ptr,
                             context.get_constant(types.intp, count))

        return array_type(tag), codegen

    return local


@intrinsic
def ints(typingctx, block, n):
    """The argument block's n slots as int64 (addresses, sizes, flags)."""
    array_type = Raw(types.int64)

    def codegen(context, builder, sig, args):
        address = builder.ptrtoint(args[0], context.get_value_type(types.intp))
        count = context.cast(builder, args[1], sig.args[1], types.intp)
        return _array_at(context, builder, array_type, address, count)

    return array_type(block, n), codegen


@intrinsic
def floats(typingctx, block, n):
    """The argument block's n slots as float64 (its float slots; see `_launch.Layout`)."""
    array_type = Raw(types.float64)

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


def _integer_op(name: str, op, doc: str):
    """An intrinsic of two int64 operands (non-negative for the divisions): one instruction,
    where numba's // and % handle signs and zero, and its min() is a function of its own to
    compile."""
    def typer(typingctx, a, b):
        def codegen(context, builder, sig, args):
            x, y = (context.cast(builder, v, t, types.int64) for v, t in zip(args, sig.args))
            return op(builder, x, y)

        return types.int64(a, b), codegen

    typer.__name__, typer.__doc__ = name, doc
    return intrinsic(typer)


idiv = _integer_op("idiv", lambda b, x, y: b.sdiv(x, y), "a // b for a >= 0 and b > 0.")
imod = _integer_op("imod", lambda b, x, y: b.srem(x, y), "a % b for a >= 0 and b > 0.")
imin = _integer_op("imin", lambda b, x, y: b.select(b.icmp_signed("<", x, y), x, y),
                   "The smaller of a and b.")


_NUMPY = {"float32": np.float32, "float64": np.float64, "uint16": np.uint16, "int16": np.int16}


def storage_type(name: str):
    """The numpy scalar type of a storage name (`_launch.STORAGE`), None for "" (absent)."""
    return _NUMPY[name] if name else None


# --- scalar conversions (bit-exact with torch's casts) -------------------------------------------
# bfloat16 is emitted as LLVM IR by the load/store intrinsics below: numba would widen the integer
# arithmetic to 64 bits, which halves the vector lanes of the loops that convert whole rows.


def _bf16_to_f32_ir(builder, h):
    """bfloat16 bits (i16) -> float32: the bits are the float32's top half."""
    return builder.bitcast(builder.shl(builder.zext(h, _I32), _I32(16)), ir.FloatType())


def _f32_to_bf16_ir(builder, v):
    """float32 -> bfloat16 bits (i16), round to nearest even; NaN -> quiet NaN keeping the sign."""
    u = builder.bitcast(v, _I32)
    top = builder.lshr(u, _I32(16))
    rounded = builder.lshr(  # round to nearest even on the 16 dropped bits
        builder.add(u, builder.add(_I32(0x7FFF), builder.and_(top, _I32(1)))), _I32(16))
    quiet_nan = builder.or_(builder.and_(top, _I32(0x8000)), _I32(0x7FC0))
    is_nan = builder.fcmp_unordered("uno", v, v)
    return builder.trunc(builder.select(is_nan, quiet_nan, rounded), ir.IntType(16))


# float16: the CPU's own conversions where it has them (x86's F16C, every AVX2 CPU; ARMv8), which
# are exact and vectorize: LLVM's half type. Elsewhere LLVM would call a runtime library for them,
# so integer arithmetic instead, in 64 bits (numba widens integer ops to int64 anyway), masked
# where a 32-bit wrap-around is meant, and several times slower.
_HALF_IN_HARDWARE = (bool(ll.get_host_cpu_features().get("f16c"))
                     or ll.get_process_triple().startswith(("aarch64", "arm64")))


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


def _to_float(context, builder, raw, storage):
    """A stored element as the float the kernels compute with (float32 for half storage)."""
    if storage == types.uint16:
        return _bf16_to_f32_ir(builder, raw)
    if storage == types.int16:
        if _HALF_IN_HARDWARE:
            return builder.fpext(builder.bitcast(raw, ir.HalfType()), ir.FloatType())
        return context.compile_internal(builder, f16_to_f32.py_func,
                                        types.float32(types.int16), [raw])
    return raw


def _to_storage(context, builder, v, vtype, storage):
    """Float v (of numba type vtype) rounded to the storage type."""
    if storage == types.uint16:
        return _f32_to_bf16_ir(builder, context.cast(builder, v, vtype, types.float32))
    if storage == types.int16:
        v = context.cast(builder, v, vtype, types.float32)
        if _HALF_IN_HARDWARE:  # round to nearest even, overflow to inf, NaN quietened
            return builder.bitcast(builder.fptrunc(v, ir.HalfType()), ir.IntType(16))
        return context.compile_internal(builder, f32_to_f16.py_func, types.int16(types.float32),
                                        [v])
    return context.cast(builder, v, vtype, storage)


def _compute_type(storage):
    return types.float32 if storage in (types.uint16, types.int16) else storage


def _pointer(context, builder, array_type, array, index, index_type):
    """The address of element `index` of a 1-D contiguous array (no wrap-around: index >= 0)."""
    index = context.cast(builder, index, index_type, types.intp)
    return builder.gep(builder.extract_value(array, _DATA), [index], inbounds=True)


# load, store and round_to are intrinsics rather than numba functions: they cost no compilation
# of their own (each numba function costs a first call ~20 ms, however small).


@intrinsic
def load(typingctx, a, i):
    """a[i] as a float: float32 for half storage, the array's own type otherwise (i >= 0)."""
    if not isinstance(a, types.Array):
        return None

    def codegen(context, builder, sig, args):
        raw = builder.load(_pointer(context, builder, a, args[0], args[1], i))
        return _to_float(context, builder, raw, a.dtype)

    return _compute_type(a.dtype)(a, i), codegen


@intrinsic
def store(typingctx, a, i, v):
    """a[i] = v rounded to a's storage type (i >= 0)."""
    if not isinstance(a, types.Array):
        return None

    def codegen(context, builder, sig, args):
        ptr = _pointer(context, builder, a, args[0], args[1], i)
        builder.store(_to_storage(context, builder, args[2], v, a.dtype), ptr)
        return context.get_dummy_value()

    return types.none(a, i, v), codegen


@intrinsic
def round_to(typingctx, v, like):
    """v rounded to the storage type of `like` (a scalar of that type) and back to a float."""
    def codegen(context, builder, sig, args):
        stored = _to_storage(context, builder, args[0], v, like)
        return _to_float(context, builder, stored, like)

    return _compute_type(like)(v, like), codegen


# Reductions: reassociable adds (and fused multiply-adds) on these instructions alone, so that
# LLVM vectorizes the sums (their order then depends on the row length only) while every other
# operation of a kernel keeps IEEE order. Never nnan/ninf: NaN and inf rows must propagate.
_REASSOC = ("reassoc", "contract")


@intrinsic
def radd(typingctx, acc, v):
    """acc + v, reassociable."""
    if not isinstance(acc, types.Float):
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], context.cast(builder, args[1], v, acc), flags=_REASSOC)

    return acc(acc, v), codegen


@intrinsic
def rfma(typingctx, acc, x, y):
    """acc + x·y, reassociable and contracted to a fused multiply-add."""
    if not isinstance(acc, types.Float):
        return None

    def codegen(context, builder, sig, args):
        product = builder.fmul(context.cast(builder, args[1], x, acc),
                               context.cast(builder, args[2], y, acc), flags=("contract",))
        return builder.fadd(args[0], product, flags=_REASSOC)

    return acc(acc, x, y), codegen
