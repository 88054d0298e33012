#!/usr/bin/env bash
# Every GPU check in one run, for a machine with an NVIDIA GPU, torch, triton, numba, pytest and
# hypothesis, but no network and nothing to install. Run from anywhere in the checkout:
#
#     scripts/gpu_check.sh OUT_DIR
#
# Writes to OUT_DIR: env.txt (GPU, driver, versions, date, commit), tests.log (+ tests.xml), the
# whole suite compiled on CUDA; memcheck.log, compute-sanitizer on the Triton kernel tests;
# launch.txt, per-call times of small launches (information, no pass/fail); bench/ and bench.log,
# the GPU benchmark; summary.txt. A failing step does not stop the others; the exit status is
# non-zero when any step failed.
set -u -o pipefail

out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
: >"$out/summary.txt"
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
failed=()

# step NAME CMD...: run CMD, its output shown and kept in OUT_DIR/NAME.log
step() {
    local name=$1
    shift
    echo "=== $name: $*" | tee -a "$out/summary.txt"
    "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
        echo "=== $name: ok" | tee -a "$out/summary.txt"
    else
        echo "=== $name: FAILED (exit $rc)" | tee -a "$out/summary.txt"
        failed+=("$name")
    fi
}

env_info() {
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    git status --short 2>/dev/null | sed 's/^/  changed: /'
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$PY" - <<'EOF'
import platform, torch, triton
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| triton", triton.__version__)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
          f"sm_{p.major}{p.minor}")
assert torch.cuda.is_available(), "no CUDA device visible to torch"
EOF
}
step env env_info
mv "$out/env.log" "$out/env.txt"

# The whole suite, compiled on CUDA tensors (conftest.py leaves TRITON_INTERPRET unset); it
# includes the GPU-only tests: split rows and groups give the same bits by the cooperative path
# and the leader path CI runs (test_gpu_cooperative_equals_leader,
# test_gpu_group_norm_cooperative_equals_leader), inputs on a second GPU.
step tests env FUSEDNORM_GPU=1 "$PY" -m pytest tests -q -rs -p no:cacheprovider \
    --junitxml="$out/tests.xml"

# Out-of-bounds and misaligned accesses in every kernel and path: the split paths (cooperative,
# and the leader's with waits) run on small shapes (the tests lower the chunk sizes), as do
# strided rows, zero-size inputs, the row blockings of the backward and GroupNorm's split groups.
# The full-size tests would take hours under the sanitizer.
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
if [ -n "$sanitizer" ]; then
    step memcheck env FUSEDNORM_GPU=1 "$sanitizer" --tool memcheck --error-exitcode 99 \
        --print-limit 50 "$PY" -m pytest tests/test_triton_kernels.py tests/test_group_norm.py \
        -q -p no:cacheprovider \
        -k "shapes_on_both_paths or residual_dropout_dh_out or strided or zero_size \
            or from_output_zero_centered or keep_mask or backward_is_deterministic \
            or wide_rows_with_default_blocks or groups_split_into_chunks"
else
    echo "=== memcheck: skipped, compute-sanitizer not found" | tee -a "$out/summary.txt"
fi

# Host time per call of small launches beside an empty Triton kernel (the target is within
# 1.5x of it for 1-64 rows of 4096), and the GPU time of the same calls. Information only.
launch_times() {
    "$PY" - <<'EOF'
import time
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench
from fusednorm.triton import layer_norm as T

@triton.jit
def _empty(X, N):
    pass

def host_us(fn, n=3000):
    for _ in range(100):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6

x0 = torch.empty(1, device="cuda")
print(f"{'call':44s} {'host us/call':>12s} {'gpu us':>8s}")
print(f"{'empty triton kernel':44s} {host_us(lambda: _empty[(1,)](x0, 1)):12.2f}")
for m in (1, 8, 64):
    n = 4096
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    wb, bb = w.bfloat16(), b.bfloat16()
    y, h, mean, rstd = T.norm_fwd(x, w, b, None, 1e-5, False, False, 0.0, 0, x.dtype, None)
    calls = {
        f"fusednorm fwd ({m}, {n}) bf16": lambda: T.norm_fwd(
            x, w, b, None, 1e-5, False, False, 0.0, 0, x.dtype, None),
        f"fusednorm bwd ({m}, {n}) bf16": lambda: T.norm_bwd(
            y, x, w, b, mean, rstd, None, 1e-5, False, False, 0.0, 0, False, x.dtype, None, True),
        f"torch F.layer_norm ({m}, {n}) bf16": lambda: F.layer_norm(x, (n,), wb, bb, 1e-5),
    }
    for name, fn in calls.items():
        print(f"{name:44s} {host_us(fn):12.2f} {do_bench(fn) * 1e3:8.2f}")
EOF
}
step launch launch_times
mv "$out/launch.log" "$out/launch.txt"

# The GPU benchmark (CSV, JSON and plots in OUT_DIR/bench).
step bench "$PY" -m fusednorm bench --device cuda --out "$out/bench"

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED steps: ${failed[*]}" | tee -a "$out/summary.txt"
    exit 1
fi
echo "all steps passed" | tee -a "$out/summary.txt"
