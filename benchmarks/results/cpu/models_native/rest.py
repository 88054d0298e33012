"""The diffusion cases of `bench --models` other than the float32 training steps (inference in
float32 and bfloat16, bfloat16 training where the CPU multiplies bfloat16 matrices), with several
copies a side: eager (plain patch) and unpatched copies.
Usage: PYTHONPATH=src python rest.py ROUNDS INSTANCES OUT.json"""
import json
import sys

import torch

from fusednorm.bench import models as M

rounds, instances, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rows = []
for dtype, workloads in ((torch.float32, ("infer 1x32x32", "infer 1x64x64")),
                         (torch.bfloat16, ("infer 1x32x32", "infer 1x64x64", "train 4x32x32",
                                           "train 2x64x64"))):
    rows += M.run(models=("unet", "vae"), workloads=workloads, dtypes=(dtype,), rounds=rounds,
                  variants=("eager", "copy"), instances=instances,
                  progress=lambda s: print(s, flush=True))
print(M.table(rows))
json.dump(rows, open(out, "w"), default=str)
