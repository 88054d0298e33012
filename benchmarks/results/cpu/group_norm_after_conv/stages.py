"""python stages.py C H: our no-grad GroupNorm path's stages (stages_lib.path), right after a
3x3 convolution and again right after that, (1, C, H, H) float32."""
import statistics
import sys

import torch

import fusednorm
from stages_lib import path, pc

torch.manual_seed(0)
C, H = int(sys.argv[1]), int(sys.argv[2])
conv1 = torch.nn.Conv2d(C, C, 3, padding=1)
x = torch.randn(1, C, H, H)
go = fusednorm.GroupNorm(32, C)
names = ["entry checks", "_plan", "params", "spare+empty_like", "ptrs+pack+threads", "kernel (ctypes)"]
with torch.no_grad():
    h = conv1(x); go(h)
    cold = {n: [] for n in names}; hot = {n: [] for n in names}
    for it in range(3000):
        h = conv1(x)
        T = []; path(h, go.weight, go.bias, T)
        for i, n in enumerate(names): cold[n].append(T[i + 1] - T[i])
        T = []; path(h, go.weight, go.bias, T)
        for i, n in enumerate(names): hot[n].append(T[i + 1] - T[i])
tc = th = 0
for n in names:
    c, hh = statistics.median(cold[n]) / 1e3, statistics.median(hot[n]) / 1e3
    tc += c; th += hh
    print(f"{sys.argv[1:]} {n:20s} after a conv {c:6.2f} us   again right after {hh:6.2f} us")
print(f"{sys.argv[1:]} {'sum':20s} after a conv {tc:6.2f} us   again right after {th:6.2f} us")
