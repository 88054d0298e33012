"""Where a training step's GroupNorm time goes, in the model: per input shape, each GroupNorm
module's forward (forward hooks) and its autograd node's backward (grad_fn pre- and post-hooks),
torch's against fusednorm's, float32; then fusednorm's channels-first backward kernels alone
(their launches timed). Usage: python training_nodes.py unet|vae float32 ROUNDS"""
import copy, sys, collections, time
import torch
import fusednorm
from fusednorm.bench import models as M

name = sys.argv[1]; dtype = getattr(torch, sys.argv[2]); R = int(sys.argv[3]) if len(sys.argv) > 3 else 10
wl = [w for w, v in M.IMAGE_WORKLOADS[name].items() if v[2]][0]
torch.manual_seed(0)
base = M.MODELS[name](dtype).train()
inputs = M._inputs(name, base, wl, dtype)
ours = copy.deepcopy(base); fusednorm.patch(ours)
acc = {k: collections.defaultdict(float) for k in ("torch", "ours")}
fw = {k: collections.defaultdict(float) for k in ("torch", "ours")}
def instrument(model, key):
    for mod in model.modules():
        if isinstance(mod, torch.nn.GroupNorm):
            def pre(m, a):
                m._t0 = time.perf_counter()
            def post(m, a, out, key=key):
                fw[key][tuple(a[0].shape)] += time.perf_counter() - m._t0
                if not out.requires_grad: return
                fn = out.grad_fn; shape = tuple(a[0].shape); st = {}
                fn.register_prehook(lambda g, st=st: st.__setitem__("t", time.perf_counter()))
                fn.register_hook(lambda gi, go, st=st, shape=shape: acc[key].__setitem__(shape, acc[key][shape] + time.perf_counter() - st["t"]))
            mod.register_forward_pre_hook(pre); mod.register_forward_hook(post)
instrument(base, "torch"); instrument(ours, "ours")
steps = {"torch": M._step(base, inputs, True), "ours": M._step(ours, inputs, True)}
for _ in range(3):
    for s in steps.values(): s()
for k in acc: acc[k].clear(); fw[k].clear()
for r in range(R):
    for k, s in (steps.items() if r % 2 == 0 else list(steps.items())[::-1]):
        s()
print(f"{'shape':22s} bwd torch  ours  | fwd torch ours (us/step)")
for shp in sorted(acc["torch"], key=str):
    print(f"{str(shp):22s} {acc['torch'][shp]/R*1e6:8.0f} {acc['ours'][shp]/R*1e6:6.0f} | {fw['torch'][shp]/R*1e6:8.0f} {fw['ours'][shp]/R*1e6:6.0f}")
print("total bwd torch %.0f ours %.0f ; fwd torch %.0f ours %.0f" % tuple(sum(d.values())/R*1e6 for d in (acc["torch"], acc["ours"], fw["torch"], fw["ours"])))

# kernel-only time in-model
import gc
from fusednorm.cpu.group_norm import GroupNormPlan
kt = collections.defaultdict(float)
class Timed:
    def __init__(self, f, shape): self.f, self.shape = f, shape
    def __call__(self, *a):
        t = time.perf_counter(); self.f(*a); kt[self.shape] += time.perf_counter() - t
    def serial(self, *a):
        t = time.perf_counter(); self.f.serial(*a); kt[self.shape] += time.perf_counter() - t
    def on_threads(self, *a):
        t = time.perf_counter(); self.f.on_threads(*a); kt[self.shape] += time.perf_counter() - t
import warnings
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    plans = [o for o in gc.get_objects() if isinstance(o, GroupNormPlan)]
for p in plans:
    if not p.cl and p._bwd is not None:
        p._bwd = Timed(p._bwd, (p.shape, p.groups))
for k in acc: acc[k].clear()
for r in range(R):
    steps["ours"]()
print("kernel-only cf bwd (us/step):")
for k, v in sorted(kt.items(), key=str): print(" ", k, f"{v/R*1e6:.0f}")
