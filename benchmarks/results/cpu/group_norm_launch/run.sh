#!/bin/bash
# Runs of main at 3c7d905 (a worktree at $BASE: git worktree add /tmp/base 3c7d905) alternated
# with runs of this checkout: GroupNorm forward+backward cells, results under this folder.
ROOT="$(git rev-parse --show-toplevel)"; BASE="${BASE:-/tmp/base}"
OUT="$ROOT/benchmarks/results/cpu/group_norm_launch"; PY="$ROOT/.venv/bin/python"
ARGS="--ops group_norm,group_norm_nhwc --dtypes float32,bfloat16 --modes fwdbwd --shapes 4x64x32x32,4x128x16x16,2x256x16x16 --providers fusednorm,torch"
for i in ${RUNS:-1 2 3}; do
  (cd "$BASE" && PYTHONPATH="$BASE/src" "$PY" -m fusednorm bench $ARGS --out "$OUT/base_run$i" > /dev/null 2>&1)
  (cd "$ROOT" && "$PY" -m fusednorm bench $ARGS --out "$OUT/new_run$i" > /dev/null 2>&1)
done
