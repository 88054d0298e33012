"""`python -m fusednorm bench --vmap`: the norms under torch.func.vmap, one launch a call.

A vmapped fusednorm call is the same norm over more rows (or, for GroupNorm, a larger batch): its
kernels run once for the whole batch. Each case times, in interleaved rounds, fusednorm under
vmap against torch's op under the same vmap and against a Python loop of fusednorm calls, one
per sample (what a transform without a batching rule would cost), and counts the kernel
launches of one vmapped call. Figures: medians over rounds of the per-round ratios.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.func as tf
import torch.nn.functional as F

import fusednorm
from fusednorm.bench.calls import sample as _sample
from fusednorm.bench.timing import calls_per_sample


@dataclass
class Case:
    name: str
    vmapped: Callable[[], object]  # fusednorm under vmap
    torch_vmapped: Callable[[], object]  # torch's op under the same vmap
    loop: Callable[[], object]  # fusednorm, one call per sample
    family: str  # whose launches are counted: "row_norm" or "group_norm"


def _per_sample_grads(module, x):
    params = {k: v.detach() for k, v in module.named_parameters()}

    def loss(p, xi):
        return tf.functional_call(module, p, (xi,)).square().sum()

    return lambda: tf.vmap(tf.grad(loss), in_dims=(None, 0))(params, x)


def cases(dtype: torch.dtype = torch.float32) -> list[Case]:
    out = []
    x = torch.randn(64, 128, 768, dtype=dtype)
    w, b = torch.randn(768, dtype=dtype), torch.randn(768, dtype=dtype)

    def ours(xi):
        return fusednorm.layer_norm(xi, (768,), w, b)

    out.append(Case("vmap layer_norm 64 x (128x768)", lambda: tf.vmap(ours)(x),
                    lambda: tf.vmap(lambda xi: F.layer_norm(xi, (768,), w, b))(x),
                    lambda: [ours(xi) for xi in x], "row_norm"))
    xs = torch.randn(32, 16, 768, dtype=dtype)
    ln_ours, ln_torch = fusednorm.LayerNorm(768, dtype=dtype), torch.nn.LayerNorm(768,
                                                                                  dtype=dtype)

    def loop_grads():
        for xi in xs:
            ln_ours.zero_grad(set_to_none=True)
            ln_ours(xi).square().sum().backward()

    out.append(Case("vmap(grad) LayerNorm 32 x (16x768)", _per_sample_grads(ln_ours, xs),
                    _per_sample_grads(ln_torch, xs), loop_grads, "row_norm"))
    g = torch.randn(8, 2, 64, 16, 16, dtype=dtype)
    gw, gb = torch.randn(64, dtype=dtype), torch.randn(64, dtype=dtype)

    def group(xi):
        return fusednorm.group_norm(xi, 32, gw, gb)

    out.append(Case("vmap group_norm 8 x (2x64x16x16)", lambda: tf.vmap(group)(g),
                    lambda: tf.vmap(lambda xi: F.group_norm(xi, 32, gw, gb))(g),
                    lambda: [group(xi) for xi in g], "group_norm"))
    return out


@contextlib.contextmanager
def _counting(family: str):
    """Counts the launches of one family's CPU forward kernels (the contract functions the
    registered ops call)."""
    from fusednorm.cpu import group_norm, layer_norm

    module, name = (layer_norm, "norm_fwd") if family == "row_norm" else (group_norm,
                                                                            "group_norm_fwd")
    original, count = getattr(module, name), [0]

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    setattr(module, name, counted)
    try:
        yield count
    finally:
        setattr(module, name, original)


def measure(case: Case, rounds: int, sample_s: float) -> dict:
    fns = {"vmapped": case.vmapped, "torch": case.torch_vmapped, "loop": case.loop}
    for fn in fns.values():
        for _ in range(3):  # compile, plan, allocator
            fn()
    with fusednorm.use_backend("cpu"), _counting(case.family) as launches:
        case.vmapped()
    k = {n: calls_per_sample(fn, sample_s) for n, fn in fns.items()}
    times = {n: [] for n in fns}
    order = list(fns)
    for r in range(rounds):
        for n in (order if r % 2 == 0 else order[::-1]):
            times[n].append(_sample(fns[n], k[n]))
    per_round = [(t, o, lp) for t, o, lp in zip(times["torch"], times["vmapped"], times["loop"])]
    return {"case": case.name, "ours_ms": statistics.median(times["vmapped"]) * 1e3,
            "torch_ms": statistics.median(times["torch"]) * 1e3,
            "loop_ms": statistics.median(times["loop"]) * 1e3,
            "torch_over_ours": statistics.median(t / o for t, o, _ in per_round),
            "loop_over_ours": statistics.median(lp / o for _, o, lp in per_round),
            "launches": launches[0]}


def table(rows: list[dict]) -> str:
    head = (f"{'case':<36} {'fusednorm':>10} {'torch':>9} {'torch/ours':>10} "
            f"{'loop':>9} {'loop/ours':>9}  launches")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['case']:<36} {r['ours_ms']:>8.2f}ms {r['torch_ms']:>7.2f}ms "
                     f"{r['torch_over_ours']:>9.2f}x {r['loop_ms']:>7.2f}ms "
                     f"{r['loop_over_ours']:>8.2f}x  {r['launches']}")
    return "\n".join(lines)


def run(rounds: int = 15, sample_s: float = 0.05, dtype: torch.dtype = torch.float32
        ) -> list[dict]:
    return [measure(c, rounds, sample_s) for c in cases(dtype)]
