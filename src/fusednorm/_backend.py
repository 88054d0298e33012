"""Which kernels run: ours on the CPU ("cpu"), ours in Triton ("triton"), or PyTorch's ("torch").

The choice is a module-level setting rather than a ContextVar so that torch.compile can guard on
it without a graph break.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

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
