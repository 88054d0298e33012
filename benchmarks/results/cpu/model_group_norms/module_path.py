"""Where a patched GroupNorm module's inference call goes inside a diffusers model, piece by
piece: copies of the patched model whose GroupNorm `_eager` is cut down to parts of the module
path (A: the forward's frames and the parameters' lookup, then the kernel; B: A plus the state
checks; C: B plus the kept plan's configuration check, without the guard), the module path as it
ships ("eager"), the kernel call alone ("direct", no checks: not safe to ship) and torch's
module. Each GroupNorm forward timed by one identical wrapper; R rounds of one inference per
model, interleaved; GroupNorm milliseconds per inference, and the median per call.

    PYTHONPATH=src python benchmarks/results/cpu/model_group_norms/module_path.py unet|vae R dtype

(Run at 4a3e881, whose `_fusednorm_last` part C unpacks; later commits hold it differently.)
"""
import copy, statistics, sys, time, types
import torch
from torch import Tensor
import fusednorm
from fusednorm import _backend, group_norms as G
from fusednorm.group_norms import (ABSENT, _dispatch_modes, _forward_ad, _function_modes,
                                   _tracing_state, _transforms_active, any_enabled)
from fusednorm.bench import models as M

name, rounds, dtype = sys.argv[1], int(sys.argv[2]), getattr(torch, sys.argv[3])
workload = [w for w, v in M.IMAGE_WORKLOADS[name].items() if not v[2]][0]
torch.manual_seed(0)
base = M.MODELS[name](dtype).eval()
inputs = M._inputs(name, base, workload, dtype)
models = {"torch": base}
for v in ("eager", "A", "B", "C", "direct"):
    m = copy.deepcopy(base); fusednorm.patch(m); models[v] = m
    with torch.no_grad():
        m(*inputs)  # (each module keeps its plan)


def params(self):
    return self._parameters["weight"], self._parameters["bias"]


def common(input):
    return (type(input) is Tensor and not torch.compiler.is_compiling()
            and not (_transforms_active() or _forward_ad._current_level >= 0
                     or _dispatch_modes() or _function_modes() or _tracing_state() is not None))


def run(plan, input, weight, bias):
    if plan.copy_to is not None:
        input = input.contiguous(memory_format=plan.copy_to)
    if not plan.direct:
        weight, bias = plan.params(weight, bias)
    return plan.kernels.forward(input, weight, bias, True)[0]


def part_a(self, input, activation):
    weight, bias = params(self)
    return run(self._fusednorm_last[1], input, weight, bias)


def part_b(self, input, activation):
    weight, bias = params(self)
    assert common(input)
    return run(self._fusednorm_last[1], input, weight, bias)


def part_c(self, input, activation):
    weight, bias = params(self)
    assert common(input)
    guard, plan, config, held_weight, held_bias = self._fusednorm_last
    assert (weight is held_weight and bias is held_bias and not input.is_nested
            and config == (self.num_groups, self.eps, activation, torch.is_grad_enabled(),
                           _backend._current, any_enabled()))
    return run(plan, input, weight, bias)


for v, part in (("A", part_a), ("B", part_b), ("C", part_c)):
    for mod in models[v].modules():
        if isinstance(mod, G.GroupNorm):
            mod._eager = types.MethodType(part, mod)
for mod in models["direct"].modules():
    if isinstance(mod, G.GroupNorm):
        plan, (w, b) = mod._fusednorm_last[1], params(mod)
        mod.forward = lambda x, plan=plan, w=w, b=b: run(plan, x, w, b)
pc = time.perf_counter
calls = {v: [] for v in models}
for v, m in models.items():
    for mod in m.modules():
        if isinstance(mod, torch.nn.GroupNorm):
            def timed(x, forward=mod.forward, acc=calls[v]):
                t = pc(); y = forward(x); acc.append(pc() - t); return y
            mod.forward = timed


def infer(m):
    with torch.no_grad():
        return m(*inputs).sample


want = infer(base)
for v, m in models.items():
    print(f"{v:7} max |patched - torch| {(infer(m) - want).abs().max().item():.2e}")
for acc in calls.values():
    acc.clear()
steps = {v: [] for v in models}
for r in range(rounds):
    for v in (list(models) if r % 2 == 0 else list(models)[::-1]):
        t = pc(); infer(models[v]); steps[v].append(pc() - t)
n = len(calls["torch"]) // rounds
for v in models:
    print(f"{name} {sys.argv[3]} {v:7} inference {statistics.median(steps[v])*1e3:7.2f} ms  "
          f"GroupNorm {sum(calls[v])/rounds*1e3:5.2f} ms  ({n} calls, median "
          f"{statistics.median(calls[v])*1e6:5.1f} us)")
