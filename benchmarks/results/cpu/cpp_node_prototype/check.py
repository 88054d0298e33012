import os, sys, time, statistics, copy; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch, fusednorm, prototype as gn_ext
torch.manual_seed(0)
shape = tuple(int(v) for v in sys.argv[1].split("x")); C = shape[1]
cl = len(sys.argv) > 2 and sys.argv[2] == "cl"  # channels last
fmt = torch.channels_last if cl else torch.contiguous_format
x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_(); dy = torch.randn(shape).contiguous(memory_format=fmt)
tm = torch.nn.GroupNorm(32, C)
with torch.no_grad(): tm.weight.normal_(); tm.bias.normal_()
om = fusednorm.GroupNorm(32, C); om.load_state_dict(tm.state_dict())
cm = fusednorm.GroupNorm(32, C); cm.load_state_dict(tm.state_dict())
from fusednorm import group_norms as G
orig = G._group_norm_fast_c
def grads(m):
    y = m(x); y.backward(dy); r = (y.detach().clone(), x.grad.clone(), m.weight.grad.clone(), m.bias.grad.clone())
    x.grad = None; m.weight.grad = m.bias.grad = None; return r
ro = grads(om); ro = grads(om)
gn_ext.install(); cpp_fast = G._group_norm_fast_c
rc = grads(cm); rc = grads(cm)
print("same bits:", all(torch.equal(a, b) for a, b in zip(ro, rc)), type(cm(x).grad_fn).__name__)
def fb(m, use):
    def f():
        G._group_norm_fast_c = use
        y = m(x); y.backward(dy)
    return f
cases = {"torch": fb(tm, orig), "ours py": fb(om, orig), "ours c++": fb(cm, cpp_fast)}
res = {k: [] for k in cases}
for r in range(21):
    items = list(cases.items())[:: (1 if r % 2 else -1)]
    for k, f in items:
        t = time.perf_counter()
        for _ in range(50): f()
        res[k].append((time.perf_counter() - t) / 50 * 1e6)
        x.grad = None
for k, v in res.items(): print(f"{k:10s} {statistics.median(v):7.1f} us   torch/this {statistics.median([a/b for a,b in zip(res['torch'], v)]):.3f}")
