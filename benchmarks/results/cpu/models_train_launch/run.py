"""The float32 training steps of `bench --models` (unet, vae), 60 rounds: eager (plain patch),
fused (fuse_activation) and an unpatched copy. `GRAIN=4096` lowers the kernels' parallel grain
(an experiment: small calls on two threads, as torch runs them); `VARIANTS` picks the variants.
Usage: python run.py ROUNDS OUT.json"""
import sys, json, os, torch
from fusednorm.cpu import _launch as L
if os.environ.get("GRAIN"): L.PARALLEL_GRAIN = int(os.environ["GRAIN"])
from fusednorm.bench import models as M
rounds = int(sys.argv[1]); out = sys.argv[2]
rows = M.run(models=("unet", "vae"), workloads=("train 4x32x32", "train 2x64x64"), dtypes=(torch.float32,),
             rounds=rounds, progress=lambda s: print(s, flush=True), variants=tuple(os.environ.get("VARIANTS", "eager,fused,copy").split(",")))
print(M.table(rows))
json.dump(rows, open(out, "w"), default=str)
