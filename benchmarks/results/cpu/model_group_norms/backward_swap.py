"""Our GroupNorm backward node inside an autoencoder training step with torch's backward kernel
(aten::native_group_norm_backward) called where ours is, the rest of our Python path unchanged:
if torch's kernel there is no faster than ours, our kernel is not what the patched model loses.
Prints per-call medians (6 steps): the statistics' rsqrt (two tiny ops), torch's kernel, the same
kernel called again at once, and the whole node.

    PYTHONPATH=src python benchmarks/results/cpu/model_group_norms/backward_swap.py vae
"""
import collections, statistics, sys, time, torch, fusednorm
from fusednorm.bench import models as M
from fusednorm.cpu import group_norm as CG
from fusednorm import group_norms as G
torch.manual_seed(0)
name = sys.argv[1]
batch, size = (4, 32) if name == "unet" else (2, 64)
m = M.MODELS[name](torch.float32); fusednorm.patch(m)
pc = time.perf_counter
acc = collections.defaultdict(list)
def aten_bwd(self, dy, x, weight, bias, stats):
    n, c, s = self.shape
    t0 = pc()
    rstd = (stats[1] + 1e-6).rsqrt()
    t1 = pc()
    r = torch.ops.aten.native_group_norm_backward(dy, x, stats[0], rstd, weight, n, c, s, self.groups, [True, True, True])
    t2 = pc()
    r2 = torch.ops.aten.native_group_norm_backward(dy, x, stats[0], rstd, weight, n, c, s, self.groups, [True, True, True])
    t3 = pc()
    acc["rsqrt"].append(t1 - t0); acc["aten bwd 1st"].append(t2 - t1); acc["aten bwd again"].append(t3 - t2)
    return r
CG.GroupNormPlan.backward = aten_bwd
for mod in m.modules():
    if "GroupNorm" in type(mod).__name__:
        def post(mm, args, out):
            node = out.grad_fn
            if node is not None:
                st = {}
                node.register_prehook(lambda g, st=st: st.__setitem__("t", pc()))
                node.register_hook(lambda gi, go, st=st: acc["node"].append(pc() - st["t"]))
        mod.register_forward_hook(post)
x = torch.randn(batch, 3, size, size)
def step():
    out = m(x, 10).sample if name == "unet" else m(x).sample
    out.square().mean().backward()
    for p in m.parameters(): p.grad = None
step(); step(); acc.clear()
for r in range(6): step()
for k, v in acc.items(): print(f"{k:16} {sum(v)/6*1e3:.2f} ms/step median {statistics.median(v)*1e6:.1f} us")
