"""GroupNorm modules inside a training step, patched against unpatched: each forward timed by
module hooks, each backward node from its pre-hook to its hook (autograd node hooks), summed per
step; steps interleaved.

    PYTHONPATH=src python benchmarks/results/cpu/model_group_norms/in_model.py unet|vae [rounds]
"""
import collections
import copy
import statistics
import sys
import time

import torch

import fusednorm
from fusednorm.bench import models as M

torch.manual_seed(0)
name = sys.argv[1] if len(sys.argv) > 1 else "unet"
batch, size = (4, 32) if name == "unet" else (2, 64)
base = M.MODELS[name](torch.float32)
patched = copy.deepcopy(base); fusednorm.patch(patched)
pc = time.perf_counter
def instrument(model, acc):
    for mod in model.modules():
        if "GroupNorm" in type(mod).__name__:
            def pre(m, args):
                m._t0 = pc()
            def post(m, args, out):
                acc["fwd"].append(pc() - m._t0)
                node = out.grad_fn
                if node is not None:
                    st = {}
                    node.register_prehook(lambda g, st=st: st.__setitem__("t", pc()))
                    node.register_hook(lambda gi, go, st=st: acc["bwd"].append(pc() - st["t"]))
            mod.register_forward_pre_hook(pre); mod.register_forward_hook(post)
x = torch.randn(batch, 3, size, size)
def step(model):
    out = model(x, 10).sample if name == "unet" else model(x).sample
    out.square().mean().backward()
    for p in model.parameters(): p.grad = None
accs = {"torch": collections.defaultdict(list), "ours": collections.defaultdict(list)}
instrument(base, accs["torch"]); instrument(patched, accs["ours"])
for m in (base, patched): step(m); step(m)
for a in accs.values(): a.clear()
tot = {"torch": [], "ours": []}
for r in range(int(sys.argv[2]) if len(sys.argv) > 2 else 6):
    for k, m in (("torch", base), ("ours", patched)) if r % 2 == 0 else (("ours", patched), ("torch", base)):
        t = pc(); step(m); tot[k].append(pc() - t)
for k, a in accs.items():
    n = len(tot[k])
    print(k, f"step {statistics.median(tot[k])*1e3:.1f} ms; GN forwards {sum(a['fwd'])/n*1e3:.2f} ms/step ({len(a['fwd'])//n} calls, median {statistics.median(a['fwd'])*1e6:.1f} us); GN backward nodes {sum(a['bwd'])/n*1e3:.2f} ms/step (median {statistics.median(a['bwd'])*1e6:.1f} us)")
