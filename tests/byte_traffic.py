"""Counting the bytes Triton kernels move, under Triton's interpreter (the test suite's mode).

`count_traffic()` records every kernel launched inside it: for each tensor argument (each
storage, however many arguments name it) the bytes each masked-on lane of a load or store touches,
as a bitmap. A launch's distinct bytes are the bytes of each storage read plus those written;
an op's are the sum over its launches. That is the traffic a GPU's DRAM sees when re-reads within
a launch hit its caches and a second launch reads again: the design's bound, counted per tensor.
Bytes outside every tensor argument are counted as stray.

The interpreter runs loads whose values the compiler would drop (fusednorm's backward loads the
bias it never uses in the plain mode): count them as the test's bound allows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect

import numpy as np
import torch
from triton.runtime import interpreter as interp


@dataclasses.dataclass
class Storage:
    names: list  # the kernel arguments naming this storage
    start: int
    nbytes: int
    read: np.ndarray  # bool per byte
    written: np.ndarray


@dataclasses.dataclass
class Launch:
    kernel: str
    storages: list
    stray: int = 0

    def distinct(self, tensor: torch.Tensor | None = None) -> int:
        """Distinct bytes read plus distinct bytes written, of one tensor's storage or all."""
        return sum(int(s.read.sum()) + int(s.written.sum()) for s in self.storages
                   if tensor is None or s.start == tensor.untyped_storage().data_ptr())

    def touch(self, addrs: np.ndarray, size: int, write: bool) -> None:
        for s in self.storages:
            inside = (addrs >= s.start) & (addrs < s.start + s.nbytes)
            if inside.any():
                off = (addrs[inside] - s.start).astype(np.int64)
                bitmap = s.written if write else s.read
                for j in range(size):
                    bitmap[off + j] = True
                addrs = addrs[~inside]
        self.stray += addrs.size * size


class Traffic:
    def __init__(self):
        self.launches: list[Launch] = []

    def distinct(self, tensor: torch.Tensor | None = None) -> int:
        return sum(launch.distinct(tensor) for launch in self.launches)

    @property
    def stray(self) -> int:
        return sum(launch.stray for launch in self.launches)


_active: list[Traffic] = []
_current: list[Launch] = []


def _account(ptrs, mask, write: bool) -> None:
    if not _current:
        return
    addrs = np.asarray(ptrs.data)
    if mask is not None:
        addrs = addrs[np.broadcast_to(np.asarray(mask.data, dtype=bool), addrs.shape)]
    addrs = addrs.reshape(-1).astype(np.uint64)
    if addrs.size:
        size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        _current[-1].touch(addrs, size, write)


@contextlib.contextmanager
def count_traffic():
    """Record the launches inside the block; yields a Traffic."""
    builder, fn_cls = interp.InterpreterBuilder, interp.InterpretedFunction
    saved = (builder.create_masked_load, builder.create_masked_store,
             builder.create_atomic_rmw, fn_cls.run)
    load, store, rmw, run = saved

    def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        _account(ptrs, mask, False)
        return load(self, ptrs, mask, other, cache_policy, is_volatile)

    def masked_store(self, ptrs, value, mask, cache_policy):
        _account(ptrs, mask, True)
        return store(self, ptrs, value, mask, cache_policy)

    def atomic_rmw(self, op, ptr, val, mask, sem, scope):
        _account(ptr, mask, False)
        _account(ptr, mask, True)
        return rmw(self, op, ptr, val, mask, sem, scope)

    def launch(self, *args, grid, warmup, **kwargs):
        if warmup:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        sig = inspect.signature(self.fn)
        bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
        storages = {}
        for name, v in bound.arguments.items():
            if isinstance(v, torch.Tensor) and v.untyped_storage().nbytes():
                st = v.untyped_storage()
                if st.data_ptr() not in storages:
                    n = st.nbytes()
                    storages[st.data_ptr()] = Storage([], st.data_ptr(), n, np.zeros(n, bool),
                                                      np.zeros(n, bool))
                storages[st.data_ptr()].names.append(name)
        _current.append(Launch(self.fn.__name__, list(storages.values())))
        try:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            _active[-1].launches.append(_current.pop())

    traffic = Traffic()
    _active.append(traffic)
    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    builder.create_atomic_rmw, fn_cls.run = atomic_rmw, launch
    try:
        yield traffic
    finally:
        (builder.create_masked_load, builder.create_masked_store,
         builder.create_atomic_rmw, fn_cls.run) = saved
        _active.pop()


def nbytes(*tensors) -> int:
    """|t| summed: what an op must move, each tensor once (None and empty tensors add 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
