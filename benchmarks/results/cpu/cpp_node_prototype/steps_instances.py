"""The float32 training step of bench --models' unet or vae: K copies a side (unpatched, the
plain patch with the Python node, the plain patch with the prototype's C++ node), made in turn,
each timed once a round (the order alternating); a side's round time the mean over its copies.
Usage: PYTHONPATH=src python steps_instances.py unet|vae ROUNDS K"""
import copy
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch

import fusednorm
import prototype
from fusednorm import group_norms as G
from fusednorm.bench import models as M

name, rounds, K = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
wl = {"unet": "train 4x32x32", "vae": "train 2x64x64"}[name]
python_node = G._group_norm_fast_c
prototype.install()
cpp_node = G._group_norm_fast_c
torch.manual_seed(0)
base = M.MODELS[name](torch.float32).train()
inputs = M._inputs(name, base, wl, torch.float32)


def side_step(node):
    m = copy.deepcopy(base)
    if node is not None:
        fusednorm.patch(m)
    step = M._step(m, inputs, True)

    def run():
        G._group_norm_fast_c = node or python_node
        step()
    return run


sides = {"unpatched": [], "python node": [], "c++ node": []}
for _ in range(K):
    for side, node in (("unpatched", None), ("python node", python_node), ("c++ node", cpp_node)):
        sides[side].append(side_step(node))
order = [(s, i) for i in range(K) for s in sides]
for _ in range(2):
    for s, i in order:
        sides[s][i]()
k = M.calls_per_sample(sides["unpatched"][0], 0.5)
times = {s: [] for s in sides}
each = {s: [[] for _ in range(K)] for s in sides}
for r in range(rounds):
    got = {s: [] for s in sides}
    for s, i in (order if r % 2 == 0 else order[::-1]):
        t = M._time(sides[s][i], k)[0]
        got[s].append(t)
        each[s][i].append(t)
    for s in sides:
        times[s].append(statistics.fmean(got[s]))
for s in ("python node", "c++ node"):
    ratios = [u / o for u, o in zip(times["unpatched"], times[s])]
    lo, hi = M.median_interval(ratios)
    print(f"{name} {wl} float32 {s:12s} {statistics.median(times[s]) * 1e3:8.2f} ms  "
          f"unpatched/this {statistics.median(ratios):.3f}x ({lo:.3f}-{hi:.3f})")
print("each copy's median (ms): " + "; ".join(
    f"{s} " + " ".join(f"{statistics.median(t) * 1e3:.1f}" for t in each[s]) for s in sides))
