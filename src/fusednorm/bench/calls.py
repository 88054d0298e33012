"""`python -m fusednorm bench --calls`: the cost of one small call, fusednorm against torch.

Small calls are where a norm library's Python and launch layers show: a 1×768 LayerNorm moves
6 KB. Each case is a call a model makes (functional or module, without grad or forward plus
backward), on the shapes of decoding and small batches. fusednorm and torch are timed in
interleaved rounds (each round: a sample of each, in alternating order, each sample enough
back-to-back calls to last a few milliseconds); the figure is the median over rounds of the
per-round ratio ours/torch, so a disturbance during one round moves one ratio, not the result.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fusednorm
from fusednorm.bench.timing import calls_per_sample

SHAPES = ((1, 768), (8, 768), (1, 4096))
GROUP_SHAPE = (2, 32, 4, 4)
# the bar for a small call: ours / torch per call
GOALS = {"nograd": 2.0, "fwdbwd": 1.5}


@dataclass
class Case:
    name: str
    mode: str  # "nograd" or "fwdbwd"
    ours: Callable[[], object]
    theirs: Callable[[], object]


def _fwdbwd(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    dy = torch.randn_like(x)

    def step():
        module(x).backward(dy)
    return step


def _nograd(fn: Callable[[], object]) -> Callable[[], object]:
    def call():
        with torch.no_grad():
            return fn()
    return call


def cases(dtype: torch.dtype = torch.float32) -> list[Case]:
    out = []
    for m, n in SHAPES:
        x = torch.randn(m, n, dtype=dtype)
        w, b = torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)
        tag = f"{m}x{n}"
        out.append(Case(f"layer_norm {tag}", "nograd",
                        _nograd(lambda x=x, w=w, b=b, n=n: fusednorm.layer_norm(x, (n,), w, b)),
                        _nograd(lambda x=x, w=w, b=b, n=n: F.layer_norm(x, (n,), w, b))))
        out.append(Case(f"rms_norm {tag}", "nograd",
                        _nograd(lambda x=x, w=w, n=n: fusednorm.rms_norm(x, (n,), w)),
                        _nograd(lambda x=x, w=w, n=n: F.rms_norm(x, (n,), w))))
        for kind in ("LayerNorm", "RMSNorm"):
            ours = getattr(fusednorm, kind)(n, dtype=dtype)
            theirs = getattr(torch.nn, kind)(n, dtype=dtype)
            out.append(Case(f"{kind} {tag}", "nograd", _nograd(lambda o=ours, x=x: o(x)),
                            _nograd(lambda t=theirs, x=x: t(x))))
            xg = x.clone().requires_grad_()
            out.append(Case(f"{kind} {tag}", "fwdbwd", _fwdbwd(ours, xg), _fwdbwd(theirs, xg)))
    x = torch.randn(*GROUP_SHAPE, dtype=dtype)
    c = GROUP_SHAPE[1]
    ours, theirs = fusednorm.GroupNorm(8, c, dtype=dtype), torch.nn.GroupNorm(8, c, dtype=dtype)
    tag = "x".join(map(str, GROUP_SHAPE))
    out.append(Case(f"group_norm {tag}", "nograd",
                    _nograd(lambda: fusednorm.group_norm(x, 8, ours.weight, ours.bias)),
                    _nograd(lambda: F.group_norm(x, 8, theirs.weight, theirs.bias))))
    out.append(Case(f"GroupNorm {tag}", "nograd", _nograd(lambda: ours(x)),
                    _nograd(lambda: theirs(x))))
    out.append(Case(f"GroupNorm {tag}", "fwdbwd", _fwdbwd(ours, x.clone().requires_grad_()),
                    _fwdbwd(theirs, x.clone().requires_grad_())))
    return out


def sample(fn: Callable[[], object], k: int) -> float:
    """Seconds per call of k back-to-back calls of fn."""
    t0 = time.perf_counter()
    for _ in range(k):
        fn()
    return (time.perf_counter() - t0) / k


def measure(case: Case, rounds: int, sample_s: float) -> dict:
    """Medians of the per-call times (µs) and of the per-round ratios ours/torch."""
    for fn in (case.ours, case.theirs):
        for _ in range(20):  # compile, plan, allocator
            fn()
    k_ours = calls_per_sample(case.ours, sample_s)
    k_theirs = calls_per_sample(case.theirs, sample_s)
    ours, theirs, ratios = [], [], []
    for r in range(rounds):
        if r % 2:
            t = sample(case.theirs, k_theirs)
            o = sample(case.ours, k_ours)
        else:
            o = sample(case.ours, k_ours)
            t = sample(case.theirs, k_theirs)
        ours.append(o)
        theirs.append(t)
        ratios.append(o / t)
    return {"case": case.name, "mode": case.mode, "ours_us": statistics.median(ours) * 1e6,
            "torch_us": statistics.median(theirs) * 1e6, "ratio": statistics.median(ratios),
            "ratio_q1": statistics.quantiles(ratios, n=4)[0] if rounds > 1 else ratios[0],
            "ratio_q3": statistics.quantiles(ratios, n=4)[2] if rounds > 1 else ratios[0],
            "goal": GOALS[case.mode]}


def table(rows: list[dict]) -> str:
    head = f"{'case':<22} {'mode':<7} {'fusednorm':>10} {'torch':>9} {'ours/torch':>11}  " \
           f"{'(q1-q3)':>11}  goal"
    lines = [head, "-" * len(head)]
    for r in rows:
        ok = "ok" if r["ratio"] <= r["goal"] else "MISSED"
        lines.append(f"{r['case']:<22} {r['mode']:<7} {r['ours_us']:>8.1f}us {r['torch_us']:>7.1f}us "
                     f"{r['ratio']:>10.2f}x  {r['ratio_q1']:>5.2f}-{r['ratio_q3']:<5.2f} "
                     f"<= {r['goal']:.1f}x {ok}")
    return "\n".join(lines)


def run(rounds: int = 15, sample_s: float = 5e-3, dtype: torch.dtype = torch.float32
        ) -> list[dict]:
    return [measure(c, rounds, sample_s) for c in cases(dtype)]
