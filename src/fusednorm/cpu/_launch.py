"""How the CPU kernels are called cheaply: tensors as addresses, and serial twins of kernels.

Two costs dominate a small call. Building a numpy view of a tensor costs ~5 us (through the
array interface; `Tensor.numpy()` is cheaper but marks the storage as never resizable, which
breaks FSDP2). And entering a parallel region wakes every worker thread (more on a loaded
machine), as does changing numba's thread count around the call. So:

- a kernel takes each tensor as ints and a tag, `tensor_arg(t)` = (address, element span, tag,
  kind), and rebuilds the array inside with `from_address(address, span, tag)`. A tag is a
  cached 1-element array of the storage type: numba types it at once, and tags of one dtype are
  one object, so no new specialization per call.
- every parallel kernel has a serial twin, `serial_twin(kernel)`: the same Python body compiled
  without parallel=True (prange runs as range), for calls below a size grain. One body, so the
  same arithmetic in the same order: results never depend on which of the two ran.
"""

from __future__ import annotations

import types

import numba
import numpy as np
import torch

from ._dtypes import BF16, F16, NATIVE, from_address

__all__ = ["TAGS", "TAG_ADDR", "from_address", "serial_twin", "tag_of", "tensor_arg"]

# Per storage dtype: (tag, kind). A tag's own address stands in for absent arguments (kernels
# never touch those).
TAGS: dict[torch.dtype, tuple[np.ndarray, int]] = {
    torch.float32: (np.zeros(1, np.float32), NATIVE),
    torch.float64: (np.zeros(1, np.float64), NATIVE),
    torch.bfloat16: (np.zeros(1, np.uint16), BF16),
    torch.float16: (np.zeros(1, np.uint16), F16),
}
TAG_ADDR = {dt: tag.ctypes.data for dt, (tag, _) in TAGS.items()}


def tag_of(dtype: torch.dtype) -> tuple[np.ndarray, int]:
    """(tag, kind) of a storage dtype."""
    return TAGS[dtype]


def tensor_arg(t: torch.Tensor | None, absent: torch.dtype = torch.float32
               ) -> tuple[int, int, np.ndarray, int]:
    """(address, span, tag, kind) of t: `from_address(address, span, tag)` inside a kernel is
    the 1-D array of the memory t spans from its first element, so element (i, j, ...) is at
    sum(index · stride). None or an empty tensor gives a 1-element stand-in of dtype `absent`.
    The caller keeps t alive for the duration of the call."""
    if t is None or t.numel() == 0:
        tag = TAGS[absent][0]
        return TAG_ADDR[absent], 1, tag, NATIVE
    tag, kind = TAGS[t.dtype]
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), span, tag, kind


def serial_twin(kernel: numba.core.registry.CPUDispatcher) -> numba.core.registry.CPUDispatcher:
    """`kernel`'s Python body compiled without parallel=True, with its other options.

    The twin is a copy of the function under its own name: numba's on-disk cache files are
    named after the function (and keyed by its bytecode, not by the compile options), so a
    second compilation of the same function object would load the parallel version.
    """
    fn = kernel.py_func
    twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                              fn.__defaults__, fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + "_serial"
    twin.__doc__ = f"`{fn.__name__}` without its parallel region: for small calls."
    options = {k: v for k, v in kernel.targetoptions.items() if k not in ("nopython", "parallel")}
    cached = type(kernel._cache).__name__ != "NullCache"  # cache=True is not a target option
    return numba.njit(**options, parallel=False, cache=cached)(twin)
