"""`bench --models` for the UNet's inference alone (the CLI runs every workload of a model):

    PYTHONPATH=src python benchmarks/results/cpu/models_module_plan_unet_infer/run.py > results.txt
"""
import json, pathlib, torch
from fusednorm.bench import models as M

rows = M.run(models=("unet",), workloads=("infer 1x32x32",), dtypes=(torch.float32, torch.bfloat16),
             rounds=120, variants=("eager", "fused", "copy"))
print(M.table(rows))
pathlib.Path(__file__).with_name("results.json").write_text(json.dumps(rows))
