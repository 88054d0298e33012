#!/bin/bash
# Runs of main at 79891c7 (a worktree at $BASE: git worktree add /tmp/base 79891c7) alternated
# with runs of this checkout: row-norm and BatchNorm forward+backward cells.
ROOT="$(git rev-parse --show-toplevel)"; BASE="${BASE:-/tmp/base}"
OUT="$ROOT/benchmarks/results/cpu/row_batch_norm_launch"; PY="$ROOT/.venv/bin/python"
ARGS="--ops batch_norm,batch_norm_nhwc,layer_norm,rms_norm --dtypes float32,bfloat16 --modes fwdbwd --shapes 4x128x16x16,2x256x16x16,16x4096,64x4096 --providers fusednorm,torch"
for i in ${RUNS:-1 2 3}; do
  (cd "$BASE" && PYTHONPATH="$BASE/src" "$PY" -m fusednorm bench $ARGS --out "$OUT/base_run$i" > /dev/null 2>&1)
  (cd "$ROOT" && "$PY" -m fusednorm bench $ARGS --out "$OUT/new_run$i" > /dev/null 2>&1)
done
