"""The one place where numba compiles: a kernel specialization to machine code for the cache.

`_launch.Kernel` calls `compile_kernel` when a specialization is neither loaded, cached nor
shipped (`_prebuilt`). The kernel family's `build(*key)` returns a Python function
`entry(block)`; it is compiled here as a C function `void(void *block)` and its object code is
returned with what the loader must know: the symbol to call and the external symbols it needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import llvmlite.binding as ll
import numba
from numba import types
from numba.core import codegen, config
from numba.core.ccallback import CFunc
from numba.core.compiler_lock import global_compiler_lock

from fusednorm.cpu import _llvm

_SIGNATURE = types.void(types.voidptr)
# Allocation would need numba's runtime, which a process that loads kernels from the cache
# does not have: kernels take scratch memory from their launcher instead.
_ALLOCATES = ("NRT_MemInfo_alloc", "NRT_Allocate", "NRT_MemInfo_new", "NRT_adapt")


def cfunc(entry: Callable, fastmath: bool | set = False) -> CFunc:
    """`entry(block)` compiled as `void(void *block)` with the kernels' options."""
    return numba.cfunc(_SIGNATURE, error_model="numpy", fastmath=fastmath, nopython=True)(entry)


def pipeline() -> dict:
    """The options numba's finalization runs with in this process (`_llvm.finalize`'s)."""
    opt = int(config.OPT)
    return {"opt": opt, "loop_vectorize": bool(config.LOOP_VECTORIZE),
            "slp_vectorize": bool(config.SLP_VECTORIZE),
            "cheap_opt": 3 if config.OPT.is_opt_max else 0,
            "cheap_loop_vectorize": bool(config.OPT.is_opt_max)}


@contextlib.contextmanager
def _kernel_passes(before_finalize: Callable | None = None):
    """Our pass builder while a kernel compiles, under numba's compiler lock (no other numba
    compilation in the process sees it); numba's own where it builds passes otherwise (older
    numba, with LLVM's legacy pass manager). `before_finalize(library)` sees each library just
    before numba's module passes."""
    with global_compiler_lock:
        saved = getattr(codegen, "create_pass_builder", None)
        if saved is None:
            yield
            return
        library_class = codegen.CPUCodeLibrary
        optimize = library_class._optimize_final_module

        def optimize_seen(library):
            before_finalize(library)
            optimize(library)

        codegen.create_pass_builder = _llvm.pass_builder
        if before_finalize is not None:
            library_class._optimize_final_module = optimize_seen
        try:
            yield
        finally:
            codegen.create_pass_builder = saved
            library_class._optimize_final_module = optimize


def compile_kernel(kernel, key: tuple, symbols: dict[str, int],
                   bitcode: dict | None = None) -> tuple[bytes, dict]:
    """(object code, metadata) of specialization `key` of `kernel` (a `_launch.Kernel`). Given a
    `bitcode` dict, it also keeps there, under "module", the kernel's module as numba had it
    before its finalization (what `_prebuilt` ships)."""
    for name, addr in symbols.items():  # the OpenMP entry points, for numba's own linking
        ll.add_symbol(name, addr)
    before = {}

    def keep(library):
        before[library.name] = library._final_module.as_bitcode()

    with _kernel_passes(None if bitcode is None else keep):
        compiled = kernel.build(*key)
        if not isinstance(compiled, CFunc):
            compiled = cfunc(compiled)
    library = compiled._library
    undefined = _llvm.undefined_symbols(library._final_module)
    if any(name.startswith(_ALLOCATES) for name in undefined):
        raise RuntimeError(f"fusednorm: kernel {kernel.name}{key} allocates memory; kernels "
                           "must take scratch from their launcher")
    if library.has_dynamic_globals:
        raise RuntimeError(f"fusednorm: kernel {kernel.name}{key} refers to Python objects")
    if bitcode is not None:
        bitcode["module"] = before[library.name]
    obj = library.serialize_using_object_code()[2][0]
    return obj, {"key": list(key), "symbol": compiled.native_name, "undefined": undefined}
