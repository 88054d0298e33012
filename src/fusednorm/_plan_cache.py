"""Launch plans by the signature of a call, found in well under a microsecond of Python.

A plan (row_norm.py, group_norms.py, batch_norms.py) holds what is decided once for one
signature of a call: everything its checks, the layout and the autograd decision depend on. Of
the tensor arguments that is each one's Python type, dispatch keys (the negation bit, a
functorch wrapper, inference mode), dtype, device, requires_grad, sizes and strides. Read
attribute by attribute into a key tuple that cost ~3 µs a call, the most of a small call's
overhead; torch's own guard check for compiled graphs (`TensorGuards`, C++) checks exactly those
in ~0.3 µs. So a plan is found by a key of the call's other arguments and the state (hashed),
then the guard of each plan filed under it is checked. Where this torch has no usable
`TensorGuards` (a private API), the tensors' signatures go into the key instead, as before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fusednorm._route import tensor_signature

# Stand-ins for absent (None) tensor arguments in a guard, one per position: a guard check fails
# where one tensor stands in two places (made for compiled graphs, it expects them told apart).
ABSENT = tuple(torch.empty(0) for _ in range(5))


def _guards() -> Callable | None:
    try:
        from torch._C._dynamo.guards import TensorGuards

        def guard(*tensors: Tensor) -> Callable:
            return TensorGuards(*tensors, dynamic_dims_sizes=None,
                                dynamic_dims_strides=None).check

        # (what the plans rely on it to tell apart: sizes, strides, dtype, requires_grad)
        probe = guard(torch.empty(2, 3), ABSENT[0])
        works = probe(torch.empty(2, 3), ABSENT[0]) and not any(
            probe(other, ABSENT[0]) for other in (
                torch.empty(3, 2), torch.empty(3, 2).t(), torch.empty(2, 3, dtype=torch.float64),
                torch.empty(2, 3, requires_grad=True)))
    except (ImportError, AttributeError, TypeError, RuntimeError):  # absent, or changed
        return None
    return guard if works else None


_guard = _guards()


def dense(tensors: tuple) -> bool:
    """Whether none of the tensors after the first is a strided nested tensor: a guard check
    ends the process on one (it reads the strides before the dispatch keys). The first is the
    input, whose sizes every key holds (read from a nested tensor, they raise); a jagged one is
    a Tensor subclass, which the check turns down first."""
    for t in tensors[1:]:
        if t.is_nested:
            return False
    return True


def _signatures_key(key: tuple, tensors: tuple) -> tuple:
    return (key, *(tensor_signature(t) for t in tensors))


class PlanCache:
    """Plans by signature: `get(key, tensors)` the plan made for a call with this key (hashable:
    the non-tensor arguments and the state) and tensors of the same signature, else None;
    `put` files a new one. `tensors` stand in a fixed order, `ABSENT[i]` for None in place i.
    Calls whose guard fails on their own tensors (one tensor in two places) are filed by the
    tensors' signatures, found after the guards. Cleared when full (a program that makes this
    many signatures is reshaping without end)."""

    def __init__(self, limit: int = 4096) -> None:
        self._plans: dict[tuple, list] = {}
        self._count, self._limit = 0, limit
        self.latest = None  # the plan of the last call that found or filed one (for tests)

    def get(self, key: tuple, tensors: tuple):
        try:
            filed = self._plans.get(key) if _guard is not None else None
            if filed is not None and dense(tensors):
                for check, plan in filed:
                    if check(*tensors):
                        self.latest = plan
                        return plan
            found = self._plans.get(_signatures_key(key, tensors))
        except (TypeError, RuntimeError, AttributeError):  # not a tensor, no strides
            return None
        if found is not None:
            self.latest = found[0][1]
            return self.latest
        return None

    def find(self, key: tuple, tensors: tuple) -> tuple:
        """`get`'s plan with the guard it is filed under: (guard, plan), (None, plan) for a plan
        filed by signature, (None, None) where none is filed."""
        plan = self.get(key, tensors)
        for check, filed in self._plans.get(key, ()) if plan is not None else ():
            if filed is plan:
                return check, plan
        return None, plan

    def put(self, key: tuple, tensors: tuple, plan) -> Callable | None:
        """File `plan` (unless the tensors have no strides: such calls make a plan each time);
        the guard the call's tensors pass, None where it is filed by signature or not at all."""
        try:
            for t in tensors:
                # (a tensor without strides, sparse or nested, raises here, where the C++ of a
                # guard made on it would end the process)
                t.stride()
            check = None if _guard is None else _guard(*tensors)
            if check is None or not check(*tensors):
                key, check = _signatures_key(key, tensors), None
        except (TypeError, RuntimeError, AttributeError):  # not a tensor, no strides: no plan
            return None
        if self._count >= self._limit:
            self._plans.clear()
            self._count = 0
        self._plans.setdefault(key, []).append((check, plan))
        self._count += 1
        self.latest = plan
        return check
