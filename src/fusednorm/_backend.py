"""Which kernels run: ours on the CPU ("cpu"), ours in Triton ("triton"), or PyTorch's ("torch").

The choice is a module-level setting rather than a ContextVar so that torch.compile can guard on
it without a graph break.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Callable, Iterator
from types import ModuleType

import torch

BACKENDS = ("auto", "cpu", "triton", "torch")
_current = "auto"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the fusednorm ops inside the block on backend ``name``.

    ``"auto"`` (the default) picks our fastest kernels for the tensor's device: the numba CPU
    kernels for CPU tensors, the Triton kernels for CUDA tensors. ``"cpu"`` and ``"triton"``
    force ours; ``"torch"`` runs PyTorch's own op (the baseline).
    """
    global _current
    if name not in BACKENDS:
        raise ValueError(f"unknown fusednorm backend {name!r}; expected one of {BACKENDS}")
    previous, _current = _current, name
    try:
        yield
    finally:
        _current = previous


def current_backend() -> str:
    return _current


def resolve(t: torch.Tensor) -> str:
    """The concrete backend ("cpu", "triton" or "torch") for tensor ``t``."""
    name = _current
    if name == "auto":
        if t.device.type == "cpu":
            return "cpu"
        if t.device.type == "cuda" and triton_available():
            return "triton"
        return "torch"
    if name == "cpu" and t.device.type != "cpu":
        raise RuntimeError(f"fusednorm backend 'cpu' needs CPU tensors, got {t.device}")
    if name == "triton":
        if not triton_available():
            raise RuntimeError("fusednorm backend 'triton' needs the triton package")
        if t.device.type == "cpu" and not triton_interpreted():
            raise RuntimeError(
                "fusednorm backend 'triton' runs CPU tensors only under TRITON_INTERPRET=1"
            )
    return name


# --- the kernels of each backend ---------------------------------------------------------------
# Imported on first use: the Triton modules need triton, and the CPU modules' numba code is
# only imported to compile a kernel (see cpu/_launch.py).


def _cpu_row_norm() -> ModuleType:
    from fusednorm.cpu import layer_norm

    return layer_norm


def _cpu_group_norm() -> ModuleType:
    from fusednorm.cpu import group_norm

    return group_norm


def _cpu_batch_norm() -> ModuleType:
    from fusednorm.cpu import batch_norm

    return batch_norm


def _triton_row_norm() -> ModuleType:
    from fusednorm.triton import layer_norm

    return layer_norm


def _triton_group_norm() -> ModuleType:
    from fusednorm.triton import group_norm

    return group_norm


def _triton_batch_norm() -> ModuleType:
    from fusednorm.triton import batch_norm

    return batch_norm


# (backend, op family) -> the module implementing that family's kernel contract
# (docs/DESIGN.md for the row norms; the top of cpu/group_norm.py and cpu/batch_norm.py).
KERNELS: dict[tuple[str, str], Callable[[], ModuleType]] = {
    ("cpu", "row_norm"): _cpu_row_norm,
    ("cpu", "group_norm"): _cpu_group_norm,
    ("cpu", "batch_norm"): _cpu_batch_norm,
    ("triton", "row_norm"): _triton_row_norm,
    ("triton", "group_norm"): _triton_group_norm,
    ("triton", "batch_norm"): _triton_batch_norm,
}


@functools.cache
def kernels(backend: str, family: str) -> ModuleType:
    """The kernels of op family `family` ("row_norm", "group_norm", "batch_norm") on `backend`."""
    return KERNELS[backend, family]()
