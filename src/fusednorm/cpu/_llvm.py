"""The second half of a kernel's compilation, without numba: LLVM's module passes and machine code
for this CPU, as numba's finalization of a compiled library runs them.

numba compiles a kernel in two halves: its front end (Python bytecode to LLVM IR, with LLVM's
function passes: 0.5-1.2 s a kernel, after ~0.5 s of importing and setting up numba) and its
finalization (module passes, then machine code: ~0.15 s). `_prebuilt` ships the first half's
output for the common kernels; `finalize` is the second half with numba's passes and options, so
that the machine code is numba's own, byte for byte (tests/test_prebuilt.py compares them).
"""

from __future__ import annotations

import llvmlite.binding as ll


def pass_builder(tm, opt=2, loop_vectorize=False, slp_vectorize=False):
    """The kernels' pass builder (numba's, given to it while a kernel compiles), without LLVM's
    loop unrolling: the vectorized loops are interleaved by the vectorizer already, and unrolling
    what remains cost a kernel 15-25% of its compile time for no measured speed (within ±3% on
    every kernel, one thread)."""
    options = ll.create_pipeline_tuning_options()
    options.speed_level = opt
    options.loop_vectorization = loop_vectorize
    options.slp_vectorization = slp_vectorize
    options.loop_unrolling = False
    return ll.create_pass_builder(tm, options)


def target_machine(opt: int):
    """numba's JIT target machine: this CPU and its features, static relocation on x86."""
    target = ll.Target.from_triple(ll.get_process_triple())
    reloc = ("static" if target.name.startswith("x86") else
             "pic" if target.name.startswith("ppc") else "default")
    return target.create_target_machine(
        cpu=ll.get_host_cpu_name(), features=ll.get_host_cpu_features().flatten(), opt=opt,
        reloc=reloc, codemodel="jitdefault", jit=True)


def finalize(module, pipeline: dict) -> bytes:
    """The object code of `module` (numba's library just before its finalization: the kernel and
    the helpers linked into it, after the function passes), optimized as numba does: a cheap
    module pass (loops rotated, instcombine, jump threading), numba's reference-count pruning
    (a no-op here: kernels never allocate), then the full pipeline. `pipeline`: numba's options
    (`kernels._compile.pipeline()`, recorded by the generator beside the bitcode)."""
    tm = target_machine(pipeline["opt"])
    cheap = pass_builder(tm, pipeline["cheap_opt"], pipeline["cheap_loop_vectorize"], False)
    passes = cheap.getModulePassManager()
    if pipeline["opt"] != 0:
        passes.add_loop_rotate_pass()
        passes.add_instruction_combine_pass()
        passes.add_jump_threading_pass()
    passes.add_refprune_pass()
    passes.run(module, cheap)
    full = pass_builder(tm, pipeline["opt"], pipeline["loop_vectorize"], pipeline["slp_vectorize"])
    passes = full.getModulePassManager()
    passes.add_refprune_pass()
    passes.run(module, full)
    module.verify()
    return tm.emit_object(module)


def undefined_symbols(module) -> list[str]:
    """The external functions and globals `module` refers to: the loader resolves them."""
    return sorted({f.name for f in module.functions if f.is_declaration} |
                  {g.name for g in module.global_variables if g.is_declaration})
