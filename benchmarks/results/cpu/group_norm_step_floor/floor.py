"""GroupNorm 4x128x16x16 float32, 2 threads: where a (forward, autograd.grad) step's time goes."""
import time, torch, statistics
import torch.nn.functional as F
import fusednorm
from fusednorm.cpu import group_norm as CG
from fusednorm import group_norms as G
from fusednorm._autograd import fast_apply
shape=(4,128,16,16); C=128; N=4; HW=256
x = torch.randn(*shape, requires_grad=True); dy = torch.randn(*shape)
w = torch.randn(C, requires_grad=True); b = torch.randn(C, requires_grad=True)
pc = time.perf_counter_ns
med = lambda v: statistics.median(v)/1e3
inner = {}
def wrap(obj, name, tag):
    orig = getattr(obj, name)
    isstatic = isinstance(obj.__dict__[name], staticmethod)
    def f(*a, **k):
        t0 = pc(); r = orig(*a, **k); inner.setdefault(tag, []).append(pc() - t0); return r
    setattr(obj, name, staticmethod(f) if isstatic else f)
wrap(CG.GroupNormPlan, "forward", "kernel fwd")
wrap(CG.GroupNormPlan, "backward", "kernel bwd")
wrap(G._GroupNormFast, "forward", "Function.forward")
wrap(G._GroupNormFast, "backward", "Function.backward")
class Empty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, plan):
        y = torch.empty_like(x); s = torch.empty(2, N, 32)
        ctx.save_for_backward(x, w, b, s); ctx.plan = plan; ctx.set_materialize_grads(False)
        return y
    @staticmethod
    def backward(ctx, dy):
        x, w, b, s = ctx.saved_tensors
        need = ctx.needs_input_grad
        return torch.empty_like(x), torch.empty_like(w), torch.empty_like(b), None
empty = fast_apply(Empty)
steps = {"ours": lambda: fusednorm.group_norm(x, 32, w, b), "torch": lambda: F.group_norm(x, 32, w, b),
         "empty Function": lambda: empty(x, w, b, 1)}
res = {}
for rnd in range(3):
    for name, fn in steps.items():
        inner.clear(); tf, tb = [], []
        for _ in range(1000):
            t0 = pc(); y = fn(); t1 = pc(); torch.autograd.grad(y, (x, w, b), dy); t2 = pc()
            tf.append(t1 - t0); tb.append(t2 - t1)
        res.setdefault((name, "step forward"), []).append(med(tf))
        res.setdefault((name, "step backward"), []).append(med(tb))
        for k, v in inner.items():
            res.setdefault((name, k), []).append(med(v))
xd, wd, bd = x.detach(), w.detach(), b.detach()
y, mean, rstd = torch.ops.aten.native_group_norm(xd, wd, bd, N, C, HW, 32, 1e-5)
fusednorm.group_norm(x, 32, w, b); plan = G._PLANS.latest
_, stats = plan.kernels.forward(xd, wd, bd)
def t(f, n=500):
    ts = []
    for r in range(7):
        t0 = pc()
        for _ in range(n): f()
        ts.append((pc() - t0) / n / 1e3)
    return statistics.median(ts)
for rnd in range(3):
    res.setdefault(("torch", "aten fwd hot"), []).append(t(lambda: torch.ops.aten.native_group_norm(xd, wd, bd, N, C, HW, 32, 1e-5)))
    res.setdefault(("ours", "kernel fwd hot"), []).append(t(lambda: plan.kernels.forward(xd, wd, bd)))
    res.setdefault(("torch", "aten bwd hot"), []).append(t(lambda: torch.ops.aten.native_group_norm_backward(dy, xd, mean, rstd, wd, N, C, HW, 32, [True, True, True])))
    res.setdefault(("ours", "kernel bwd hot"), []).append(t(lambda: plan.kernels.backward(dy, xd, wd, bd, stats)))
print(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch.__version__, "threads", torch.get_num_threads())
for (name, what), v in res.items():
    print(f"{name:15s} {what:18s} median {statistics.median(v):6.1f} us  ({' '.join(f'{a:.1f}' for a in v)})")
