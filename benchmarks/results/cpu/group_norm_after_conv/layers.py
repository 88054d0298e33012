"""python layers.py: GroupNorm (1, 128, 16, 16) float32 through torch's module, ours, our function and
our inlined fast path (stages_lib.path), each call right after a 3x3 convolution of its input."""
import time, torch, statistics, sys
sys.path.insert(0, __import__("os").path.dirname(__file__))
import stages_lib as S
import fusednorm
from fusednorm import group_norms as G
C, H = 128, 16
conv1 = torch.nn.Conv2d(C, C, 3, padding=1)
x = torch.randn(1, C, H, H)
go = fusednorm.GroupNorm(32, C); gt = torch.nn.GroupNorm(32, C)
pc = time.perf_counter_ns
w, b = go.weight, go.bias
calls0 = {
    "torch module": lambda h: gt(h),
    "ours module": lambda h: go(h),
    "ours group_norm(h, 32, w, b)": lambda h: G.group_norm(h, 32, w, b),
    "ours inlined fast path": lambda h: S.path(h, w, b, []),
}
calls = dict(reversed(list(calls0.items())))
with torch.no_grad():
    go(conv1(x))
    for f in calls.values(): f(conv1(x))
    res = {n: [] for n in calls}
    for it in range(3000):
        for name, f in calls.items():
            h = conv1(x)
            t0 = pc(); f(h); t1 = pc()
            res[name].append(t1 - t0)
for name in calls:
    print(f"{name:30s} after a conv {statistics.median(res[name]) / 1e3:6.1f} us")
