import time, torch, statistics, sys
import fusednorm
from fusednorm import group_norms as G, _route
from fusednorm._autograd import unwrap_if_dead
from fusednorm.cpu.group_norm import CF_FWD
from fusednorm.cpu._launch import threads
torch.manual_seed(0)
C, H = int(sys.argv[1]), int(sys.argv[2])
conv1 = torch.nn.Conv2d(C, C, 3, padding=1)
x = torch.randn(1, C, H, H)
go = fusednorm.GroupNorm(32, C)
pc = time.perf_counter_ns
def path(input, weight, bias, T):
    T.append(pc())
    common = (type(input) is torch.Tensor and not torch.compiler.is_compiling() and _route.plain_state())
    input = unwrap_if_dead(input)
    T.append(pc())
    plan = G._plan(input, 32, weight, bias, 1e-5, False)
    T.append(pc())
    w, b = plan.params(weight, bias)
    k = plan.kernels
    T.append(pc())
    stats = getattr(k._spare, "stats", None)
    y = torch.empty_like(input)
    T.append(pc())
    mean = stats.data_ptr(); var = mean + k.shape[0] * k.groups * k.size
    blk = CF_FWD.pack_call(input.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(), mean, var) + k.tail
    n = threads(k.cap)
    T.append(pc())
    k._fwd(blk, n)
    T.append(pc())
    return y
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
