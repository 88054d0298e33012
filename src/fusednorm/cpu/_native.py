"""The optional C++ half of the CPU backend: GroupNorm's autograd node (`csrc/group_norm_node.cpp`).

Built ahead of time by `python -m fusednorm warmup` where a C++ compiler is at hand (torch's
cpp_extension, ~40 s), into the kernel cache, one build per source, torch and Python; loaded by
any later process in milliseconds. Never built on a model's call: without the build (no
compiler, another torch, FUSEDNORM_NATIVE=0) everything runs as before, on Python autograd nodes.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

import torch

from fusednorm.cpu import _launch

SOURCE = Path(__file__).parent / "csrc" / "group_norm_node.cpp"
_UNLOADED = object()
_module = _UNLOADED


def _name() -> str:
    """The extension's module name: a fingerprint of what its binary depends on."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(f"{torch.__version__} {sys.version} {sys.platform}".encode())
    return "fusednorm_native_" + h.hexdigest()[:16]


def _directory() -> Path:
    return _launch.cache_dir() / "native"


def _binary() -> Path | None:
    for suffix in (".so", ".pyd"):  # (what cpp_extension writes)
        path = _directory() / (_name() + suffix)
        if path.exists():
            return path
    return None


def build(verbose: bool = False) -> Path:
    """Build the extension into the kernel cache (if not built yet) and return its path; raises
    what torch's cpp_extension raises where it cannot (no compiler, no ninja)."""
    from torch.utils import cpp_extension

    if (found := _binary()) is not None:
        return found
    directory = _directory()
    directory.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name=_name(), sources=[str(SOURCE)], build_directory=str(directory),
                       extra_cflags=["-O2"], verbose=verbose, is_python_module=True)
    found = _binary()
    if found is None:
        raise RuntimeError(f"the build left no binary in {directory}")
    return found


def enabled() -> bool:
    """Whether the node may be built and loaded at all (FUSEDNORM_NATIVE=0: not)."""
    return os.environ.get("FUSEDNORM_NATIVE", "1") != "0"


def module():
    """The loaded extension, or None where there is none (not built, disabled, or a failing
    load); looked for once per process."""
    global _module
    if _module is _UNLOADED:
        _module = None
        if enabled():
            try:
                _module = _load()
            except (OSError, ImportError, RuntimeError):
                _module = None
    return _module


def _load():
    path = _binary()
    if path is None:
        return None
    loader = importlib.machinery.ExtensionFileLoader(_name(), str(path))
    spec = importlib.util.spec_from_file_location(_name(), str(path), loader=loader)
    ext = importlib.util.module_from_spec(spec)
    loader.exec_module(ext)
    from fusednorm.group_norms import differentiable_group_norm_grads

    parallel = _launch._runtime().openmp.parallel
    ext.set_runtime(0 if parallel is None else ctypes.cast(parallel, ctypes.c_void_p).value,
                    differentiable_group_norm_grads)
    return ext
