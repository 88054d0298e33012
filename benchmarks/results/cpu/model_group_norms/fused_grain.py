"""The lead of fused_serial.py narrowed: only the fused plans that the SiLU's weight in the thread
grain makes parallel (serial without it) forced onto the calling thread ("B"), against the plans
as made ("default") and the unpatched model; prints each one's median speed-up over the unpatched
model and default/B with its 95% interval (above 1: B faster).

    PYTHONPATH=src python benchmarks/results/cpu/model_group_norms/fused_grain.py unet R dtype
"""
import copy, sys, time, torch, fusednorm, statistics
from fusednorm.bench import models as M
from fusednorm import group_norms as G
from fusednorm.cpu._launch import PARALLEL_GRAIN
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
xcost = 2 if dt in (torch.bfloat16, torch.float16) else 1
plans = [p.kernels for filed in G._PLANS._plans.values() for _, p in filed if getattr(p, "fast", False)]
edge = [k for k in plans if not k.cl and k.cap > 1 and k.shape[0] * k.shape[1] * k.shape[2] * xcost < PARALLEL_GRAIN]
caps = {id(k): k.cap for k in edge}
print("serial in B:", [k.shape for k in edge])
def serial(on):
    for k in edge: k.cap = 1 if on else caps[id(k)]
t = {"torch": [], "default": [], "B": []}
pc = time.perf_counter
for r in range(R):
    for k in (("torch", "default", "B") if r % 2 == 0 else ("B", "default", "torch")):
        m = {"torch": base, "default": fa, "B": fb}[k]
        serial(k == "B")
        s = pc(); step(m); t[k].append(pc() - s)
        serial(False)
out = []
for k in t:
    ratios = [a / b for a, b in zip(t["torch"], t[k])]
    out.append(f"{k} {statistics.median(ratios):.3f}")
d = [a / b for a, b in zip(t["default"], t["B"])]
lo, hi = median_interval(d)
print(" ".join(out), f"| default/B {statistics.median(d):.3f} ({lo:.3f}-{hi:.3f})")
