"""GroupNorm's no-grad fast path (group_norms.group_norm, as of main at 83c9352) inlined, with a
time stamp appended to T after each stage; the kernel's statistics go to the plan's spare buffer,
which a call through the module has made first."""
import time

import torch

from fusednorm import _route
from fusednorm import group_norms as G
from fusednorm._autograd import unwrap_if_dead
from fusednorm.cpu._launch import threads
from fusednorm.cpu.group_norm import CF_FWD

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
