"""Storage types for the numba kernels: how torch tensors reach them and how halves are converted.

numba has no float16 or bfloat16 on the CPU. Half tensors are handed to the kernels as their raw
16-bit patterns (uint16 arrays) with a *kind* code saying how to read them; float32 and float64
arrays are used as they are (kind NATIVE). Kernels compute in float32 (float64 for float64) and
convert on load and store, with the conversions below, which round exactly like torch's casts.

`load`/`store`/`load_row`/`store_row` pick their code from the array's numba type at compile
time, so one kernel body serves every storage type; `kind` only tells bfloat16 from float16 and
is tested once per call (or once per row for the row helpers), never per element in a hot loop.
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import carray, njit, types
from numba.extending import intrinsic, overload

NATIVE = 0  # float32/float64 array, used directly
BF16 = 1  # uint16 array holding bfloat16 bit patterns
F16 = 2  # uint16 array holding IEEE float16 bit patterns

_I32 = ir.IntType(32)
_KINDS = {torch.float32: NATIVE, torch.float64: NATIVE, torch.bfloat16: BF16, torch.float16: F16}


def kind_of(dtype: torch.dtype) -> int:
    """The kind code of a tensor dtype (NATIVE, BF16 or F16)."""
    return _KINDS[dtype]


def as_kernel_array(t: torch.Tensor) -> tuple[np.ndarray, int]:
    """A zero-copy numpy view of ``t`` (same shape and strides, stride 0 included) and its kind.

    Half tensors come back as uint16 arrays of their bit patterns.
    """
    t = t.detach()
    kind = kind_of(t.dtype)
    if kind == NATIVE:
        return _numpy_view(t), kind
    return _numpy_view(t.view(torch.int16)).view(np.uint16), kind


def as_flat_array(t: torch.Tensor) -> tuple[np.ndarray, int]:
    """A zero-copy 1-D contiguous view of the storage ``t`` spans, from its first element, and
    its kind: element (i, j, ...) is at ``sum(index * stride)``.

    Kernels take every tensor this way and index it with explicit strides, so that strided,
    expanded (stride 0) and contiguous tensors share one compiled specialization.
    """
    t = t.detach()
    if t.is_contiguous():
        flat = t.view(-1)
    else:
        span = 0 if t.numel() == 0 else 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
        flat = t.as_strided((span,), (1,))
    kind = _KINDS[t.dtype]
    if kind == NATIVE:
        return _numpy_view(flat), kind
    return _numpy_view(flat.view(torch.int16)).view(np.uint16), kind


class _ArrayInterface:
    __slots__ = ("__array_interface__",)

    def __init__(self, interface: dict) -> None:
        self.__array_interface__ = interface


_TYPESTR = {torch.float32: "<f4", torch.float64: "<f8", torch.int16: "<i2"}


def _numpy_view(t: torch.Tensor) -> np.ndarray:
    # Through the array interface, not Tensor.numpy(): numpy() marks the storage as never
    # resizable again, which breaks FSDP2 (it frees gathered parameters with
    # storage.resize_(0)); DLPack costs 2 us a tensor, this under 1 us. The view does not keep
    # t alive: callers use it only while they hold t.
    item = t.element_size()
    return np.asarray(_ArrayInterface({
        "data": (t.data_ptr(), False),
        "shape": tuple(t.shape),
        "strides": tuple(s * item for s in t.stride()),
        "typestr": _TYPESTR[t.dtype],
        "version": 3,
    }))


@intrinsic
def _address_as_pointer(typingctx, addr, tag):
    ptr = types.CPointer(tag.dtype)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr))

    return ptr(addr, tag), codegen


@njit(inline="always", cache=True, error_model="numpy")
def from_address(addr, n, tag):
    """Inside a kernel: the 1-D contiguous array of n elements of tag's dtype at address addr.

    The cheapest way to hand a tensor to a kernel: its ``data_ptr()`` (an int) and a cached
    1-element array of its storage type (the tag), instead of a numpy view built per call. The
    caller keeps the tensor alive for the duration of the call.
    """
    return carray(_address_as_pointer(addr, tag), n)


# --- scalar conversions (bit-exact with torch's casts) -------------------------------------------
# The bfloat16 conversions are written as LLVM IR: numba would widen their integer arithmetic to
# 64 bits, which halves the vector lanes of the loops that convert whole rows.


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


@njit(cache=True, error_model="numpy")
def bf16_to_f32(h):
    """bfloat16 bits (uint16) -> float32: the bits are the float32's top half."""
    return _bf16_bits_to_f32(np.uint16(h))


@njit(cache=True, error_model="numpy")
def f32_to_bf16(v):
    """float32 -> bfloat16 bits, round to nearest even; NaN -> quiet NaN keeping the sign."""
    return _f32_to_bf16_bits(np.float32(v))


# float16: integer arithmetic in 64 bits (numba widens integer ops to int64 anyway), masked where
# a 32-bit wrap-around is meant. Slower than the bfloat16 paths, which are the ones tuned.


@njit(cache=True, error_model="numpy")
def _f32_bits(v):
    return np.int64(np.float32(v).view(np.uint32))


@njit(cache=True, error_model="numpy")
def _bits_f32(u):
    return np.uint32(u & 0xFFFFFFFF).view(np.float32)


@njit(cache=True, error_model="numpy")
def f16_to_f32(h):
    """float16 bits (uint16) -> float32, exact for every pattern (subnormals, inf, NaN payload)."""
    u = np.int64(h)
    em = (u & 0x7FFF) << 13  # exponent and mantissa moved into float32's fields
    # Rebias the exponent by 2^112 (= 2^(127 - 15)); a float32 multiply also normalises the
    # half's subnormals, which land in float32's subnormal range here.
    scaled = _f32_bits(_bits_f32(em) * np.float32(5.192296858534828e33))
    bits = (em | 0x7F800000) if em >= 0x0F800000 else scaled  # inf/NaN keep their mantissa
    return _bits_f32(bits | ((u & 0x8000) << 16))


@njit(cache=True, error_model="numpy")
def f32_to_f16(v):
    """float32 -> float16 bits, round to nearest even, overflow to inf, NaN kept (quietened).

    F. Giesen's float_to_half_fast3_rtne scheme.
    """
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
    return np.uint16(o | sign)


# --- element and row access, dispatched on the array's type at compile time -----------------------


def load(a, i, kind):
    """Element i of a kernel array as float32 (or the array's own float type)."""
    raise NotImplementedError  # only callable from numba code


def store(a, i, v, kind):
    """Store v (a float) into element i of a kernel array, rounding to its storage type."""
    raise NotImplementedError


def load_row(src, off, n, kind, dst):
    """dst[:n] = src[off:off + n] converted to dst's float type."""
    raise NotImplementedError


def store_row(dst, off, n, kind, src):
    """dst[off:off + n] = src[:n] rounded to dst's storage type."""
    raise NotImplementedError


def is_bits(a) -> bool:
    """Whether numba type a is an array of 16-bit patterns (for overloads)."""
    return isinstance(a, types.Array) and a.dtype == types.uint16


def as_float(a, j):
    """Element j of a float array, or of a bfloat16 one converted (never float16: its
    conversion is too slow to repeat per sweep; float16 goes through scratch)."""
    raise NotImplementedError


@overload(as_float, inline="always")
def _as_float(a, j):
    if is_bits(a):
        return lambda a, j: bf16_to_f32(a[j])
    return lambda a, j: a[j]


@overload(load)
def _load(a, i, kind):
    if is_bits(a):

        def impl(a, i, kind):
            return bf16_to_f32(a[i]) if kind == BF16 else f16_to_f32(a[i])

        return impl
    return lambda a, i, kind: a[i]


@overload(store)
def _store(a, i, v, kind):
    if is_bits(a):

        def impl(a, i, v, kind):
            a[i] = f32_to_bf16(v) if kind == BF16 else f32_to_f16(v)

        return impl

    def native(a, i, v, kind):
        a[i] = v

    return native


@overload(load_row)
def _load_row(src, off, n, kind, dst):
    # Index a slice, not src[off + j]: numba wraps negative signed indices, which would turn
    # the loop into gathers instead of vector loads.
    if is_bits(src):

        def impl(src, off, n, kind, dst):
            s = src[off : off + n]
            if kind == BF16:
                for j in range(n):
                    dst[j] = bf16_to_f32(s[j])
            else:
                for j in range(n):
                    dst[j] = f16_to_f32(s[j])

        return impl

    def native(src, off, n, kind, dst):
        s = src[off : off + n]
        for j in range(n):
            dst[j] = s[j]

    return native


@overload(store_row)
def _store_row(dst, off, n, kind, src):
    if is_bits(dst):

        def impl(dst, off, n, kind, src):
            d = dst[off : off + n]
            if kind == BF16:
                for j in range(n):
                    d[j] = f32_to_bf16(src[j])
            else:
                for j in range(n):
                    d[j] = f32_to_f16(src[j])

        return impl

    def native(dst, off, n, kind, src):
        d = dst[off : off + n]
        for j in range(n):
            d[j] = src[j]

    return native
