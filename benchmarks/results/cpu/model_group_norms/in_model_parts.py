"""Where a patched GroupNorm's time goes inside a training step (diffusers model of bench --models):
the module call, its forward, the plan lookup, the autograd Function, its body and the kernel
launch, and the backward node, its body and the kernel launch; each timed by wrapping it, medians
per call and sums per step over 6 steps.

    PYTHONPATH=src python benchmarks/results/cpu/model_group_norms/in_model_parts.py unet|vae
"""
import collections
import statistics
import sys
import time

import torch

import fusednorm
from fusednorm import group_norms as G
from fusednorm.bench import models as M
from fusednorm.cpu import group_norm as CG

torch.manual_seed(0)
name = sys.argv[1]
batch, size = (4, 32) if name == "unet" else (2, 64)
m = M.MODELS[name](torch.float32); fusednorm.patch(m)
pc = time.perf_counter
acc = collections.defaultdict(list)
def wrap(owner, attr, tag, static=False):
    orig = getattr(owner, attr)
    def f(*a, **k):
        t = pc(); r = orig(*a, **k); acc[tag].append(pc() - t); return r
    setattr(owner, attr, staticmethod(f) if static else f)
wrap(CG.GroupNormPlan, "backward", "kernel bwd (plan.backward)")
wrap(CG.GroupNormPlan, "forward", "kernel fwd (plan.forward)")
wrap(G._GroupNormFast, "backward", "Function.backward body", static=True)
wrap(G._GroupNormFast, "forward", "Function.forward body", static=True)
wrap(G, "_plan", "_plan lookup")
wrap(G, "_group_norm_fast", "fast_apply (Function)")
wrap(G, "group_norm", "group_norm()")
for cls in (G.GroupNorm,):
    wrap(cls, "forward", "GroupNorm.forward")
node_t = []
for mod in m.modules():
    if "GroupNorm" in type(mod).__name__:
        def post(mm, args, out):
            node = out.grad_fn
            if node is not None:
                st = {}
                node.register_prehook(lambda g, st=st: st.__setitem__("t", pc()))
                node.register_hook(lambda gi, go, st=st: acc["backward node"].append(pc() - st["t"]))
        mod.register_forward_hook(post)
        mod.register_forward_pre_hook(lambda mm, a: setattr(mm, "_t0", pc()))
        mod.register_forward_hook(lambda mm, a, o: acc["module call (hooks)"].append(pc() - mm._t0))
x = torch.randn(batch, 3, size, size)
def step():
    out = m(x, 10).sample if name == "unet" else m(x).sample
    out.square().mean().backward()
    for p in m.parameters(): p.grad = None
step(); step(); acc.clear()
n = 6
for _ in range(n): step()
for k, v in acc.items():
    print(f"{k:28} {sum(v)/n*1e3:6.2f} ms/step  median {statistics.median(v)*1e6:6.1f} us")
