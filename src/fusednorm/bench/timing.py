"""Timing and memory.

Providers are timed round-robin: each round takes one sample of every provider, starting one
further along each time, so that drift (thermal, other processes) hits all of them alike; the
figure is the median sample. A sample is k back-to-back calls, with k doubled during warm-up
until a sample lasts at least `min_sample_s`, so per-call overhead is included, as users see it.

CPU: time.perf_counter. CUDA: CUDA events after a synchronize; the inputs rotate over enough
copies (at least 4x the L2 cache in bytes, at most 64) that small shapes are not served from L2.
"""

from __future__ import annotations

import collections
import itertools
import math
import statistics
import time
from collections.abc import Callable

import torch

from fusednorm.bench.cases import Inputs
from fusednorm.bench.providers import Fn


def calls_per_sample(fn: Callable[[], object], min_sample_s: float) -> int:
    """The fewest back-to-back calls of fn (a power of two, at most 2**16) that last
    min_sample_s together, on the CPU clock (the whole-call suites: --calls, --models)."""
    k = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        if time.perf_counter() - t0 >= min_sample_s or k >= 1 << 16:
            return k
        k *= 2


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """A confidence interval of the median of independent samples, whatever their distribution:
    the order statistics x(r) and x(n+1-r), r the largest rank with P(Bin(n, 1/2) < r) at most
    (1 - level)/2 (the sign test's). None when n is too small for that level (5 or fewer at
    95%). On these noisy machines it says whether a speed-up's median is shown above or below
    1.0, or not resolved by the rounds run."""
    n, tail = len(values), (1 - level) / 2
    r, below = 0, math.comb(n, 0) / 2**n  # below: P(Bin(n, 1/2) <= r)
    while r < n and below <= tail:
        r += 1
        below += math.comb(n, r) / 2**n
    if r == 0:
        return None
    ordered = sorted(values)
    return ordered[r - 1], ordered[n - r]


def per_round(theirs: dict, ours: dict) -> dict[str, float | None]:
    """Their time / ours, round by round (two entries of `measure`): the median and its 95%
    interval (`median_interval`; None where the rounds are too few)."""
    ratios = [t / o for t, o in zip(theirs["rounds"], ours["rounds"])]
    lo_hi = median_interval(ratios) or (None, None)
    return {"median": statistics.median(ratios), "ci95_lo": lo_hi[0], "ci95_hi": lo_hi[1]}


def n_copies(device: str, case_bytes: int) -> int:
    if device != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    return max(1, min(64, math.ceil(4 * l2 / max(case_bytes, 1))))


def make_call(fn: Fn, sets: list[Inputs], mode: str) -> Callable[[], object]:
    """A no-argument call doing one `mode` step on the next input set in rotation.

    For bwd, `call.prepare(k)` runs k forwards outside the clock; each call then runs one
    backward without retain_graph (compiled backwards refuse it, and training never uses it).
    """
    grads = mode != "fwd"
    for s in sets:
        for t in s.leaves:
            t.requires_grad_(grads)
    nxt = itertools.cycle(range(len(sets))).__next__

    if mode == "fwd":
        return lambda: fn(*sets[nxt()].args)
    if mode == "fwdbwd":
        def fwdbwd():
            s = sets[nxt()]
            outs = fn(*s.args)
            return torch.autograd.grad(outs, s.leaves, s.grad_outs[: len(outs)])
        return fwdbwd
    pending = collections.deque()

    def bwd():
        outs, s = pending.popleft()
        return torch.autograd.grad(outs, s.leaves, s.grad_outs[: len(outs)])

    def prepare(k: int) -> None:
        pending.clear()
        pending.extend((fn(*s.args), s) for s in (sets[nxt()] for _ in range(k)))
    bwd.prepare = prepare
    return bwd


def copy_call(xs: list[torch.Tensor]) -> Callable[[], object]:
    """The bandwidth reference: x.clone() (allocation included, as every norm's output is)."""
    nxt = itertools.cycle(xs).__next__
    return lambda: nxt().clone()


def launch_call(device: str) -> Callable[[], object]:
    """The latency reference on CUDA: one kernel launch doing almost nothing."""
    one = torch.zeros(1, device=device)
    return lambda: one.add_(1)


def _clock(device: str) -> Callable[[Callable[[], object], int], float]:
    """elapsed(call, k): seconds for k back-to-back calls."""
    if device != "cuda":
        def elapsed(call, k):
            t0 = time.perf_counter()
            for _ in range(k):
                call()
            return time.perf_counter() - t0
        return elapsed

    def elapsed_cuda(call, k):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(k):
            call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    return elapsed_cuda


def measure(calls: dict[str, Callable[[], object]], device: str, min_sample_s: float,
            budget_s: float, rounds: tuple[int, int]) -> dict[str, dict[str, float]]:
    """Per call name: median, min, q1, q3 of the per-call time (seconds), the sample count, and
    the samples in round order ("rounds": the i-th of each name's were taken in one round)."""
    clock = _clock(device)

    def elapsed(call, k):
        if hasattr(call, "prepare"):
            call.prepare(k)
        return clock(call, k)

    k, per_call = {}, {}
    for name, call in calls.items():  # warm-up doubles k until a sample is long enough
        k[name], t = 1, elapsed(call, 1)
        while t < min_sample_s and k[name] < 2**16:
            k[name] *= 2
            t = elapsed(call, k[name])
        per_call[name] = t / k[name]
    round_s = sum(k[n] * per_call[n] for n in calls)
    n_rounds = max(rounds[0], min(rounds[1], int(budget_s / max(round_s, 1e-9))))
    names = list(calls)
    samples = {n: [] for n in names}
    for r in range(n_rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            samples[name].append(elapsed(calls[name], k[name]) / k[name])
    stats = {}
    for name, xs in samples.items():
        q1, _, q3 = statistics.quantiles(xs, n=4) if len(xs) > 1 else (xs[0],) * 3
        stats[name] = {"median": statistics.median(xs), "min": min(xs), "q1": q1, "q3": q3,
                       "samples": len(xs), "calls_per_sample": k[name],
                       "rounds": xs}  # (one sample per round, in round order)
    return stats


def fwdbwd_memory(fn: Fn, inp: Inputs, device: str) -> int:
    """Bytes a forward+backward step needs beyond its inputs.

    CUDA: peak allocated during forward+backward minus what was allocated before.
    CPU: bytes held from forward to backward: the outputs plus the tensors autograd saved,
    deduplicated by storage, not counting storage the inputs own (a saved x costs nothing).
    Backward's transient buffers are not seen on CPU.
    """
    for t in inp.leaves:
        t.requires_grad_(True)
    grad_outs = inp.grad_outs
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        outs = fn(*inp.args)
        torch.autograd.grad(outs, inp.leaves, grad_outs[: len(outs)], allow_unused=True)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    owned = {t.untyped_storage().data_ptr() for t in inp.leaves}
    held: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in owned:
            held[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = fn(*inp.args)
    for o in outs:
        held[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
    return sum(held.values())
