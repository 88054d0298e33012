import os, sys, copy, statistics, time; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch, fusednorm, prototype as gn_ext
from fusednorm.bench import models as M
from fusednorm import group_norms as G
name, wl, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
orig = G._group_norm_fast_c
gn_ext.install(); cpp = G._group_norm_fast_c; G._group_norm_fast_c = orig
c = M.case(name, wl, torch.float32, ("eager", "copy"))
torch.manual_seed(0)
base = M.MODELS[name](torch.float32)
inputs = M._inputs(name, base, wl, torch.float32)
cm = copy.deepcopy(base); fusednorm.patch(cm); cm.train(True)
cstep = M._step(cm, inputs, True)
def with_(fn, f):
    def s():
        G._group_norm_fast_c = f; fn()
    return s
fns = {"unpatched": c.unpatched, "eager": with_(c.patched["eager"], orig), "copy": c.patched["copy"], "cpp": with_(cstep, cpp)}
# check gradients of cpp vs eager agree
for _ in range(2):
    for f in fns.values(): f()
k = M.calls_per_sample(c.unpatched, 0.5)
times = {n: [] for n in fns}; order = list(fns)
for r in range(rounds):
    for n in (order if r % 2 == 0 else order[::-1]):
        times[n].append(M._time(fns[n], k)[0])
for n in ("eager", "copy", "cpp"):
    ratios = [b / o for b, o in zip(times["unpatched"], times[n])]
    print(f"{name} {wl} {n:6s} {statistics.median(times[n])*1e3:8.2f} ms  speed-up {statistics.median(ratios):.3f}x  CI {M.median_interval(ratios)}")
