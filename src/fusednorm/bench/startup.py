"""`python -m fusednorm bench --startup`: what a new process waits for before its first norm.

Each measurement is a fresh Python process (the only way to see a first call): it imports torch,
then fusednorm, runs torch's own module forward and backward once (torch's first-call costs: its
first backward imports sympy, ~0.4 s here, which any model pays once whatever its norms), then
the fusednorm module's first forward and first backward on the same input: what fusednorm adds.
The norms: LayerNorm on 8×768, GroupNorm(8, 32) and BatchNorm2d(32) on 2×32×8×8, each also in
channels_last (InstanceNorm runs GroupNorm's kernels). "cold" gives the process an empty kernel
cache (a fresh environment: the shipped kernels are finalized by LLVM, see cpu/_prebuilt.py),
"warm" the cache the cold one left (every later process), "numba" an empty cache without the
shipped kernels (FUSEDNORM_PREBUILT=0: what a kernel outside the archive, or a platform without
one, waits for numba; no goal, for reference). Repeated, the medians reported, torch's first call
beside them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import fusednorm
t2 = time.perf_counter()
norm, dtype = sys.argv[1], getattr(torch, sys.argv[2])
kind, _, layout = norm.partition("-")
shape, args = ((8, 768), (768,)) if kind == "LayerNorm" else ((2, 32, 8, 8), (32,))
if kind == "GroupNorm":
    args = (8, 32)
x = torch.randn(*shape, dtype=dtype)
if layout == "cl":
    x = x.contiguous(memory_format=torch.channels_last)
x.requires_grad_()
theirs = getattr(torch.nn, kind)(*args, dtype=dtype)
t_torch = time.perf_counter()
theirs(x).backward(torch.ones_like(x))
t_torch = time.perf_counter() - t_torch
ours = getattr(fusednorm, kind)(*args, dtype=dtype)
t3 = time.perf_counter()
y = ours(x)
t4 = time.perf_counter()
y.backward(torch.ones_like(y))
t5 = time.perf_counter()
print(json.dumps({"import_torch": t1 - t0, "import_fusednorm": t2 - t1, "forward": t4 - t3,
                  "backward": t5 - t4, "torch_first_call": t_torch,
                  "numba_imported": "numba" in sys.modules}))
"""

NORMS = ("LayerNorm", "GroupNorm", "GroupNorm-cl", "BatchNorm2d", "BatchNorm2d-cl")
GOALS = {"cold": 1.0, "warm": 0.15, "numba": None}  # seconds, first forward and backward each


def _child(norm: str, dtype: str, cache: str, prebuilt: bool = True) -> dict:
    env = dict(os.environ, FUSEDNORM_CACHE_DIR=cache, FUSEDNORM_PREBUILT="1" if prebuilt else "0")
    out = subprocess.run([sys.executable, "-c", _CHILD, norm, dtype], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(dtypes=("float32", "bfloat16"), repeats: int = 3, norms=NORMS) -> list[dict]:
    rows = []
    for norm in norms:
        for dtype in dtypes:
            rows += _measure(norm, dtype, repeats)
    return rows


def _measure(norm: str, dtype: str, repeats: int) -> list[dict]:
    runs = {"cold": [], "warm": [], "numba": []}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="fusednorm-cache-") as cache:
            runs["cold"].append(_child(norm, dtype, cache))
            runs["warm"].append(_child(norm, dtype, cache))
        with tempfile.TemporaryDirectory(prefix="fusednorm-cache-") as cache:
            runs["numba"].append(_child(norm, dtype, cache, prebuilt=False))
    rows = []
    for state, results in runs.items():
        row = {"norm": norm, "dtype": dtype, "cache": state, "repeats": repeats,
               "numba_imported": any(r["numba_imported"] for r in results)}
        for key in ("import_fusednorm", "forward", "backward", "import_torch",
                    "torch_first_call"):
            row[key] = statistics.median(r[key] for r in results)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'norm':<14} {'dtype':<9} {'cache':<5} {'import fusednorm':>16} {'1st forward':>12} "
            f"{'1st backward':>13}  goal each   numba imported  (torch's 1st fwd+bwd)")
    lines = [head, "-" * len(head)]
    for r in rows:
        goal = GOALS[r["cache"]]
        ok = ("" if goal is None else
              "ok" if max(r["forward"], r["backward"]) <= goal else "MISSED")
        goal = "-" if goal is None else f"<= {goal}s"
        lines.append(f"{r['norm']:<14} {r['dtype']:<9} {r['cache']:<5} "
                     f"{r['import_fusednorm']:>15.3f}s {r['forward']:>11.3f}s "
                     f"{r['backward']:>12.3f}s  {goal:<9} {ok:<6} "
                     f"{'yes' if r['numba_imported'] else 'no':<14}  "
                     f"({r['torch_first_call']:.3f}s)")
    return "\n".join(lines)
