"""The float32 training steps of `bench --models` (unet, vae) with several instances a side
(`instances`: the unpatched model and copies, copies of each variant; see bench/models.py):
eager (plain patch), fused (fuse_activation) and unpatched copies.
Usage: PYTHONPATH=src python run.py ROUNDS INSTANCES OUT.json"""
import json
import sys

import torch

from fusednorm.bench import models as M

rounds, instances, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rows = M.run(models=("unet", "vae"), workloads=("train 4x32x32", "train 2x64x64"),
             dtypes=(torch.float32,), rounds=rounds, variants=("eager", "fused", "copy"),
             instances=instances, progress=lambda s: print(s, flush=True))
print(M.table(rows))
json.dump(rows, open(out, "w"), default=str)
