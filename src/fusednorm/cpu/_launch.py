"""How the CPU kernels are built, cached, loaded and called. This module never imports numba.

A kernel is numba code compiled into a C function `void kernel(const int64 *block)`. The
block holds the call's arguments by position, in the order its `Layout` names them: tensor
addresses, sizes and flags as int64, scalars as float64. Compiling needs numba (about a second
for a new kernel, after half a second of numba's import), except for the kernels shipped as
bitcode (`_prebuilt`: LLVM alone, ~0.15 s); the machine code is then stored in the user's cache
directory (`cache_dir()`), and any later process loads it with llvmlite alone, in milliseconds,
without importing numba. So:

- per call: one `struct.pack` of the block and one ctypes call (about 1 µs), on the caller's
  thread, or on torch's own OpenMP threads through `GOMP_parallel` of the runtime torch loaded:
  one pool of workers for torch and fusednorm, sized by `torch.get_num_threads()`;
- lifetimes: the caller holds every tensor whose address is in a block until the call returns
  (the kernels never allocate, and no view outlives a call);
- specializations: one per combination of storage dtypes (and the few flags a kernel family
  compiles in), built on first use; everything else is decided at run time from the block.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import re
import shutil
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fusednorm._checks import compute_dtype  # noqa: F401 (the launchers' rule, re-exported)
from fusednorm.cpu import _prebuilt

# Below this many elements a call runs on the calling thread: waking the workers costs more
# than the work (torch's own grain is 32K). Results never depend on the choice.
PARALLEL_GRAIN = 1 << 16

# Storage dtypes as the kernels see them: numba has no half types on the CPU, so bfloat16 and
# float16 arrive as their bit patterns in uint16 and int16 arrays respectively (distinct
# types, so each conversion is chosen when the kernel is compiled).
STORAGE = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "uint16",
           torch.float16: "int16"}


# --- argument blocks ---------------------------------------------------------------------------


class Layout:
    """The positions of a kernel's arguments in its block, by name: int64 slots, those that
    change with every call (addresses, seeds) first, then those fixed for a launch plan (sizes,
    strides, flags), then float64 slots. The kernel reads `slots(...)` as constants; a launcher
    packs the fixed part once per plan (`fixed`) and the changing part per call (`pack_call`)."""

    def __init__(self, per_call: Sequence[str], fixed: Sequence[str],
                 floats: Sequence[str] = ()) -> None:
        self.per_call, self.fixed_ints, self.floats = tuple(per_call), tuple(fixed), tuple(floats)
        self.names = self.per_call + self.fixed_ints + self.floats
        self._slot = {name: i for i, name in enumerate(self.names)}
        self.pack_call = struct.Struct(f"<{len(per_call)}q").pack
        self._fixed = struct.Struct(f"<{len(fixed)}q{len(floats)}d").pack

    def slot(self, name: str) -> int:
        return self._slot[name]

    def slots(self, *names: str) -> tuple[int, ...]:
        return tuple(self._slot[n] for n in names)

    def fixed(self, **values: float) -> bytes:
        """The fixed part of the block (every fixed and float name, by name)."""
        return self._fixed(*(values[n] for n in self.fixed_ints + self.floats))

    def __len__(self) -> int:
        return len(self.names)


# --- threads: torch's OpenMP runtime -------------------------------------------------------------


class _OpenMP:
    """The OpenMP runtime torch runs its parallel regions on, found in the process. Parallel
    kernels are launched with its `GOMP_parallel`, so the workers are torch's own threads."""

    def __init__(self) -> None:
        self.lib = _find_openmp()
        self.parallel = None
        if self.lib is not None:
            self.parallel = self.lib.GOMP_parallel
            self.parallel.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint,
                                      ctypes.c_uint]
            self.parallel.restype = None

    def symbols(self) -> dict[str, int]:
        """Addresses the kernels link against: the runtime's, or serial stand-ins (thread 0 of
        1, a barrier that returns) where torch has none."""
        names = ("omp_get_thread_num", "omp_get_num_threads", "GOMP_barrier")
        if self.lib is not None:
            return {n: ctypes.cast(getattr(self.lib, n), ctypes.c_void_p).value for n in names}
        self._stand_ins = (ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 0),
                           ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 1),
                           ctypes.CFUNCTYPE(None)(lambda: None))  # kept alive with self
        return {n: ctypes.cast(f, ctypes.c_void_p).value for n, f in zip(names, self._stand_ins)}


def _find_openmp() -> ctypes.CDLL | None:
    """The libgomp (or LLVM/Intel libomp, which export the same GOMP entry points) that torch
    loaded: the copy in torch/lib for pip wheels, else one already mapped in the process."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    runtime = re.compile(r"^lib[gi]?omp[-.\w]*\.(so|dylib)")
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    candidates = sorted(os.path.join(torch_lib, f) for f in os.listdir(torch_lib)
                        if runtime.match(f)) if os.path.isdir(torch_lib) else []
    try:
        with open("/proc/self/maps") as maps:
            candidates += sorted({line.split()[-1] for line in maps
                                  if runtime.match(os.path.basename(line.split()[-1]))})
    except OSError:
        pass
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
            if hasattr(lib, "GOMP_parallel") and hasattr(lib, "GOMP_barrier"):
                return lib
        except OSError:
            continue
    return None


thread_state = threading.local()  # per calling thread: its `scratch`
_KEEP_SCRATCH = 1 << 22  # bytes of scratch kept between calls, per calling thread


def scratch(nbytes: int) -> torch.Tensor:
    """At least nbytes of scratch memory (uint8) for one call on this thread. Kernels carve it
    into per-thread rows; it is reused by the next call of the same Python thread."""
    buf = getattr(thread_state, "scratch", None)
    if buf is not None and buf.numel() >= nbytes:
        return buf
    buf = torch.empty(max(nbytes, 1 << 12), dtype=torch.uint8)
    if nbytes <= _KEEP_SCRATCH:
        thread_state.scratch = buf
    return buf


def thread_cap(elements: int, tasks: int, cost: int = 1) -> int:
    """The most threads worth waking for a call over `elements` elements split into `tasks`
    tasks: 1 (the calling thread) below the grain, for elements that each cost `cost` times a
    float32 norm's work. Only the speed depends on it: every split that orders a sum depends on
    the shape alone."""
    return 1 if elements * cost < PARALLEL_GRAIN else max(1, tasks)


def threads(cap: int) -> int:
    """The threads of a call now: torch's count (`torch.set_num_threads` governs both
    libraries), at most `cap`."""
    return 1 if cap == 1 else min(cap, torch.get_num_threads())


# --- the cache and the loader ---------------------------------------------------------------------


def cache_dir() -> Path:
    """Where compiled kernels are kept: $FUSEDNORM_CACHE_DIR, else the user's cache directory
    ($XDG_CACHE_HOME or ~/.cache, /fusednorm), one folder per build of the kernels."""
    root = os.environ.get("FUSEDNORM_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "fusednorm")
    return Path(root) / _runtime().build_id


class _Runtime:
    """The process's loader: one llvmlite JIT for the loaded kernels, the OpenMP runtime, and
    the fingerprint of everything the machine code depends on."""

    def __init__(self) -> None:
        import llvmlite
        import llvmlite.binding as ll

        from fusednorm import __version__

        self.ll = ll
        ll.initialize_native_target()
        ll.initialize_native_asmprinter()
        self.openmp = _OpenMP()
        self.symbols = self.openmp.symbols()
        for name, addr in self.symbols.items():
            ll.add_symbol(name, addr)
        self.cpu = (ll.get_host_cpu_name(), ll.get_host_cpu_features().flatten())
        target = ll.Target.from_default_triple()
        self.machine = target.create_target_machine(cpu=self.cpu[0], features=self.cpu[1],
                                                    jit=True)
        h = hashlib.sha256()
        for part in (__version__, llvmlite.__version__, _numba_version(),
                     sys.version, *self.cpu):
            h.update(part.encode() + b"\0")
        self.source_hash = kernel_source_hash()
        h.update(self.source_hash.encode())
        self.build_id = "kernels-" + h.hexdigest()[:16]
        self.engines = []  # one JIT per object file: none of them may be freed
        self.lock = threading.Lock()

    def load(self, obj: bytes, meta: dict) -> int | None:
        """The address of the kernel in `obj`, or None when it needs a symbol this process
        cannot provide (the caller then compiles it anew)."""
        ll = self.ll
        for name in meta["undefined"]:
            if name.startswith("llvm.") or name in self.symbols:
                continue
            if name in _ERROR_PATHS:
                ll.add_symbol(name, _error_path(name))
            elif not ll.address_of_symbol(name):
                addr = _process_symbol(name)  # libm, libc, Python's C API
                if not addr:
                    return None  # MCJIT would abort the process on an unresolved symbol
                ll.add_symbol(name, addr)
        with self.lock:
            engine = ll.create_mcjit_compiler(ll.parse_assembly(""), self.machine)
            engine.add_object_file(ll.ObjectFileRef.from_data(obj))
            engine.finalize_object()
            self.engines.append(engine)
            return engine.get_function_address(meta["symbol"])


# Symbols that numba's code references only on paths that raise a Python exception or free
# an allocation; the kernels never raise (error_model="numpy", no bounds checks) and never
# allocate (`_compile` refuses a kernel that does), so reaching one is a fusednorm bug: it says
# so and aborts (the kernel's state cannot be trusted past that point).
_ERROR_PATHS = frozenset({
    "NRT_Free", "NRT_MemInfo_call_dtor", "NRT_decref", "numba_do_raise", "numba_gil_ensure",
    "numba_gil_release", "numba_runtime_build_excinfo_struct", "numba_unpickle",
    "numba_fatal_error",
})


def _process_symbol(name: str) -> int | None:
    try:
        return ctypes.addressof(ctypes.c_char.in_dll(ctypes.CDLL(None), name))
    except (ValueError, OSError):
        return None


_ERROR_STUBS: dict[str, object] = {}  # kept alive: the JIT holds their addresses


def _error_path(name: str) -> int:
    """The address of a C-callable stub that reports `name` and aborts the process."""
    stub = _ERROR_STUBS.get(name)
    if stub is None:
        def report() -> None:
            sys.stderr.write(f"fusednorm: a CPU kernel reached numba's {name}, a path its "
                             "kernels never take; aborting. Please report it with the call "
                             "that made it.\n")
            sys.stderr.flush()
            os.abort()

        stub = _ERROR_STUBS[name] = ctypes.CFUNCTYPE(None)(report)
    return ctypes.cast(stub, ctypes.c_void_p).value


def kernel_source_hash() -> str:
    """The fingerprint of the kernels' source: every module of this package (the kernels, their
    argument layouts and constants)."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _numba_version() -> str:
    """numba's version without importing numba (which costs 0.2 s)."""
    import importlib.util

    spec = importlib.util.find_spec("numba")
    if spec is None or spec.origin is None:
        return "absent"
    try:
        return Path(spec.origin).with_name("_version.py").read_text()
    except OSError:
        return spec.origin


_runtime_instance: _Runtime | None = None
_runtime_lock = threading.Lock()


def _runtime() -> _Runtime:
    global _runtime_instance
    if _runtime_instance is None:
        with _runtime_lock:
            if _runtime_instance is None:
                _runtime_instance = _Runtime()
    return _runtime_instance


# --- kernels --------------------------------------------------------------------------------------


_KERNEL_CALL = ctypes.CFUNCTYPE(None, ctypes.c_char_p)  # releases the GIL during the call


class Kernel:
    """A family of compiled kernels sharing a layout: `build(*key)` (numba code, imported only
    to compile) returns the numba cfunc of one specialization, `key` a tuple of strings."""

    def __init__(self, name: str, layout: Layout, build: Callable[..., object]) -> None:
        self.name, self.layout, self.build = name, layout, build
        self._compiled: dict[tuple, Launch] = {}
        self._lock = threading.Lock()

    def __getitem__(self, key: tuple) -> Launch:
        """The launcher of specialization `key`: loaded from the cache, else compiled."""
        launch = self._compiled.get(key)
        if launch is None:
            with self._lock:
                launch = self._compiled.get(key)
                if launch is None:
                    launch = self._compiled[key] = Launch(self._address(key))
        return launch

    def _address(self, key: tuple) -> int:
        rt = _runtime()
        stem = self.name + "-" + hashlib.sha256(repr(key).encode()).hexdigest()[:16]
        folder = cache_dir()
        obj_path, meta_path = folder / (stem + ".o"), folder / (stem + ".json")
        try:
            meta = json.loads(meta_path.read_text())
            if meta["key"] == list(key):
                addr = rt.load(obj_path.read_bytes(), meta)
                if addr:
                    _mark_used(folder)
                    return addr
        except (OSError, ValueError, KeyError):
            pass
        shipped = _prebuilt.object_code(self.name, key, rt.source_hash)
        if shipped is not None:
            obj, meta = shipped
        else:
            from fusednorm.cpu.kernels import _compile

            obj, meta = _compile.compile_kernel(self, key, rt.symbols)
        _store(folder, obj_path, meta_path, obj, meta)
        addr = rt.load(obj, meta)
        if not addr:
            raise RuntimeError(f"fusednorm: kernel {self.name}{key} needs symbols "
                               f"{meta['undefined']} that cannot be resolved")
        return addr


# A build folder nobody has used for this long is removed when a new one is made (an upgrade):
# at worst an old install that comes back compiles its kernels again.
STALE_AFTER_S = 30 * 24 * 3600


def prune_stale_builds(root: Path, keep: str) -> None:
    """Remove the kernel folders under root, other than `keep`, unused for STALE_AFTER_S (a
    process that loads from a folder marks it used: `_mark_used`)."""
    cutoff = time.time() - STALE_AFTER_S
    try:
        for path in root.glob("kernels-*"):
            if path.name != keep and path.is_dir() and path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass


_marked: set[Path] = set()


def _mark_used(folder: Path) -> None:
    """Once per process and folder: its modification time says it is in use."""
    if folder not in _marked:
        _marked.add(folder)
        try:
            os.utime(folder)
        except OSError:
            pass


def _store(folder: Path, obj_path: Path, meta_path: Path, obj: bytes, meta: dict) -> None:
    """Write atomically (the metadata last): concurrent processes may compile the same kernel."""
    try:
        if not folder.is_dir():  # a new build of the kernels: older ones may be left behind
            folder.mkdir(parents=True, exist_ok=True)
            prune_stale_builds(folder.parent, folder.name)
        for path, data in ((obj_path, obj), (meta_path, json.dumps(meta).encode())):
            tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the kernel still runs, it is compiled again next time


class Launch:
    """One compiled kernel, called serially or on torch's OpenMP threads: `serial(block)`,
    `on_threads(block, threads, 0)` (both C calls: a launcher in a model's hot path calls them
    itself, a Python frame costing it several µs there), or `launch(block, threads)`."""

    __slots__ = ("_parallel", "address", "on_threads", "serial")

    def __init__(self, address: int) -> None:
        self.address = address
        self.serial = _KERNEL_CALL(address)
        self._parallel = _runtime().openmp.parallel
        self.on_threads = (self._serial_anyway if self._parallel is None
                           else functools.partial(self._parallel, address))

    def _serial_anyway(self, block: bytes, _threads: int, _flags: int) -> None:
        self.serial(block)  # (no OpenMP runtime found: thread 0 of 1 does all)

    def __call__(self, block: bytes, threads: int = 1) -> None:
        if threads > 1:
            self.on_threads(block, threads, 0)
        else:
            self.serial(block)


def openmp_runtime() -> str | None:
    """The path of the OpenMP runtime the kernels share with torch (None: they run serially)."""
    lib = _runtime().openmp.lib
    return None if lib is None else lib._name
