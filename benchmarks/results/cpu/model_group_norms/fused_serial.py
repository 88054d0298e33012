"""A lead, not a change: diffusers UNet inference patched with fuse_activation=True, each fused
GroupNorm with its threads as planned ("default") and forced onto the calling thread ("serial":
every CPU plan's cap set to 1 around that model's steps), against the unpatched model; R
interleaved rounds, medians of per-round unpatched/patched with the 95% interval. A fused norm
counts SiLU as extra work per element, so (1, 128, 256) float32 is split over both threads
with SiLU and not without.

    PYTHONPATH=src python benchmarks/results/cpu/model_group_norms/fused_serial.py unet R dtype
"""
import copy, sys, time, torch, fusednorm, statistics, collections
from fusednorm.bench import models as M
from fusednorm import group_norms as G
from fusednorm.bench.timing import median_interval
torch.manual_seed(0)
name = sys.argv[1]; R = int(sys.argv[2]); dt = getattr(torch, sys.argv[3])
batch, size = (1, 32) if name == "unet" else (1, 64)
base = M.MODELS[name](dt).eval()
fa = copy.deepcopy(base); fusednorm.patch(fa, fuse_activation=True)
fb = copy.deepcopy(base); fusednorm.patch(fb, fuse_activation=True)
x = torch.randn(batch, 3, size, size, dtype=dt)
def step(m):
    with torch.no_grad():
        return m(x, 10).sample if name == "unet" else m(x).sample
for m in (base, fa, fb): step(m); step(m)
plans = [p.kernels for filed in G._PLANS._plans.values() for _, p in filed if getattr(p, "fast", False)]
caps = {id(k): k.cap for k in plans if not k.cl}
print("plans", [(k.shape, k.cap) for k in plans if not k.cl])
def serial(on):
    for k in plans:
        if not k.cl: k.cap = 1 if on else caps[id(k)]
t = {"torch": [], "default": [], "serial": []}
pc = time.perf_counter
for r in range(R):
    for k in (("torch", "default", "serial") if r % 2 == 0 else ("serial", "default", "torch")):
        m = {"torch": base, "default": fa, "serial": fb}[k]
        serial(k == "serial")
        s = pc(); step(m); t[k].append(pc() - s)
        serial(False)
for k in t:
    ratios = [a / b for a, b in zip(t["torch"], t[k])]
    lo, hi = median_interval(ratios)
    print(f"{k:8} {statistics.median(t[k])*1e3:7.2f} ms  {statistics.median(ratios):.3f} ({lo:.3f}-{hi:.3f})")
