"""The one place where numba compiles: a kernel specialization to machine code for the cache.

`_launch.Kernel` calls `compile_kernel` when a specialization is neither loaded nor cached. The
kernel family's `build(*key)` returns a Python function `entry(block)`; it is compiled here as a
C function `void(void *block)` and its object code is returned with what the loader must know:
the symbol to call and the external symbols it needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import llvmlite.binding as ll
import numba
from numba import types
from numba.core import codegen
from numba.core.ccallback import CFunc
from numba.core.compiler_lock import global_compiler_lock

_SIGNATURE = types.void(types.voidptr)
# Allocation would need numba's runtime, which a process that loads kernels from the cache
# does not have: kernels take scratch memory from their launcher instead.
_ALLOCATES = ("NRT_MemInfo_alloc", "NRT_Allocate", "NRT_MemInfo_new", "NRT_adapt")


def cfunc(entry: Callable, fastmath: bool | set = False) -> CFunc:
    """`entry(block)` compiled as `void(void *block)` with the kernels' options."""
    return numba.cfunc(_SIGNATURE, error_model="numpy", fastmath=fastmath, nopython=True)(entry)


def _pass_builder(tm, opt=2, loop_vectorize=False, slp_vectorize=False):
    """numba's LLVM pass builder, without LLVM's loop unrolling: the vectorized loops are
    interleaved by the vectorizer already, and unrolling what remains cost a kernel 15-25% of
    its compile time for no measured speed (within ±3% on every kernel, one thread)."""
    options = ll.create_pipeline_tuning_options()
    options.speed_level = opt
    options.loop_vectorization = loop_vectorize
    options.slp_vectorization = slp_vectorize
    options.loop_unrolling = False
    return ll.create_pass_builder(tm, options)


@contextlib.contextmanager
def _kernel_passes():
    """Our pass builder while a kernel compiles, under numba's compiler lock (no other numba
    compilation in the process sees it); numba's own where it builds passes otherwise (older
    numba, with LLVM's legacy pass manager)."""
    with global_compiler_lock:
        saved = getattr(codegen, "create_pass_builder", None)
        if saved is None:
            yield
            return
        codegen.create_pass_builder = _pass_builder
        try:
            yield
        finally:
            codegen.create_pass_builder = saved


def compile_kernel(kernel, key: tuple, symbols: dict[str, int]) -> tuple[bytes, dict]:
    """(object code, metadata) of specialization `key` of `kernel` (a `_launch.Kernel`)."""
    for name, addr in symbols.items():  # the OpenMP entry points, for numba's own linking
        ll.add_symbol(name, addr)
    with _kernel_passes():
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
