"""The one place where numba compiles: a kernel specialization to machine code for the cache.

`_launch.Kernel` calls `compile_kernel` when a specialization is neither loaded nor cached. The
kernel family's `build(*key)` returns a Python function `entry(block)`; it is compiled here as a
C function `void(void *block)` and its object code is returned with what the loader must know:
the symbol to call and the external symbols it needs.
"""

from __future__ import annotations

from collections.abc import Callable

import llvmlite.binding as ll
import numba
from numba import types
from numba.core.ccallback import CFunc

_SIGNATURE = types.void(types.voidptr)
# Allocation would need numba's runtime, which a process that loads kernels from the cache
# does not have: kernels take scratch memory from their launcher instead.
_ALLOCATES = ("NRT_MemInfo_alloc", "NRT_Allocate", "NRT_MemInfo_new", "NRT_adapt")


def cfunc(entry: Callable, fastmath: bool | set = False) -> CFunc:
    """`entry(block)` compiled as `void(void *block)` with the kernels' options."""
    return numba.cfunc(_SIGNATURE, error_model="numpy", fastmath=fastmath, nopython=True)(entry)


def compile_kernel(kernel, key: tuple, symbols: dict[str, int]) -> tuple[bytes, dict]:
    """(object code, metadata) of specialization `key` of `kernel` (a `_launch.Kernel`)."""
    for name, addr in symbols.items():  # the OpenMP entry points, for numba's own linking
        ll.add_symbol(name, addr)
    compiled = kernel.build(*key)
    if not isinstance(compiled, CFunc):
        compiled = cfunc(compiled)
    library = compiled._library
    module = library._final_module
    undefined = sorted({f.name for f in module.functions if f.is_declaration} |
                       {g.name for g in module.global_variables if g.is_declaration})
    if any(name.startswith(_ALLOCATES) for name in undefined):
        raise RuntimeError(f"fusednorm: kernel {kernel.name}{key} allocates memory; kernels "
                           "must take scratch from their launcher")
    if library.has_dynamic_globals:
        raise RuntimeError(f"fusednorm: kernel {kernel.name}{key} refers to Python objects")
    obj = library.serialize_using_object_code()[2][0]
    return obj, {"key": list(key), "symbol": compiled.native_name, "undefined": undefined}
