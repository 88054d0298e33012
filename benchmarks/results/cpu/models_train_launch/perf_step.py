import copy, sys, time, os
import torch, fusednorm
from fusednorm.bench import models as M
name = sys.argv[1]; dtype = getattr(torch, sys.argv[2]); R = int(sys.argv[3]); which = sys.argv[4]
wl = [w for w, v in M.IMAGE_WORKLOADS[name].items() if v[2]][0]
torch.manual_seed(0)
base = M.MODELS[name](dtype).train()
inputs = M._inputs(name, base, wl, dtype)
m = copy.deepcopy(base)
if which == "ours": fusednorm.patch(m)
step = M._step(m, inputs, True)
for _ in range(3): step()
open(f"/tmp/ready_{which}", "w").close()
t = time.perf_counter()
for _ in range(R): step()
print(which, (time.perf_counter() - t) / R * 1e3, "ms/step")
