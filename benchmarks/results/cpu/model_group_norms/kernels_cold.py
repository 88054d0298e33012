"""GroupNorm backward kernels alone, ours (the launch plan's call) against torch's
native_group_norm_backward, each call right after a 64 MiB write has flushed the caches ("cold")
and once more ("hot"); 30 interleaved rounds, medians.

    PYTHONPATH=src python benchmarks/results/cpu/model_group_norms/kernels_cold.py 2x64x64x64 [cl]
"""
import statistics
import sys
import time

import torch

import fusednorm

shape = tuple(map(int, sys.argv[1].split('x'))); cl = len(sys.argv) > 2 and sys.argv[2] == "cl"
N, C = shape[:2]; g = 32
fmt = torch.channels_last if cl else torch.contiguous_format
x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
w = torch.randn(C); b = torch.randn(C)
dy = torch.randn(shape).contiguous(memory_format=fmt)
y = fusednorm.group_norm(x, g, w.requires_grad_(), b.requires_grad_())
node = y.grad_fn; plan = node.plan
xs, ws, bs, stats = node.saved_tensors
xd = x.detach()
HW = x[0,0].numel()
_, mean, rstd = torch.ops.aten.native_group_norm(xd, w.detach(), b.detach(), N, C, HW, g, 1e-5)
big = torch.empty(64 << 20, dtype=torch.uint8)
def flush(): big.add_(1)
pc = time.perf_counter
def ours(): return plan.kernels.backward(dy, xd, *plan.params(w.detach(), b.detach()), stats)
def theirs(): return torch.ops.aten.native_group_norm_backward(dy, xd, mean, rstd, w.detach(), N, C, HW, g, [True, True, True])
res = {"ours hot": [], "torch hot": [], "ours cold": [], "torch cold": []}
for r in range(30):
    for name, f in (("ours", ours), ("torch", theirs)):
        flush(); f()  # warm allocator
        flush(); t = pc(); f(); res[name + " cold"].append(pc() - t)
        t = pc(); f(); res[name + " hot"].append(pc() - t)
for k, v in res.items(): print(k, round(statistics.median(v) * 1e6, 1))
