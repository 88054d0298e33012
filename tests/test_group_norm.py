"""fusednorm.group_norm and GroupNorm against torch and the float64 reference: values, every
gradient, channels_last, the fused SiLU, errors, modules, determinism and torch.compile.

The shapes are the issue's: (1, 256, 1, 1) with 32 groups (8 channels of one position each), and
(20, 6, 10, 10) with 1 (LayerNorm-like), 3 and 6 (InstanceNorm-like) groups; plus every rank
(2-D to 5-D), channels_last, and a Triton tiling shrunk so that samples span several chunks.
Triton runs interpreted in CI, hence its smaller shapes.
"""

import concurrent.futures
import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    BACKENDS,
    GPU,
    THREAD_COUNTS,
    assert_close_to_ref,
    assert_three,
    determinism_backends,
    device_for,
    kernel_threads,
    pilot_outliers,
    randn,
    run_three,
    ulps_for,
)

import fusednorm
from fusednorm.cpu._channels import BLOCK, cl_rows
from fusednorm.group_norms import GroupNorm, group_norm
from fusednorm.instance_norms import InstanceNorm2d
from fusednorm.reference import group_norm_ref

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def torch_group_norm(x, groups, weight, bias, eps, activation=None):
    if weight is None and bias is not None:
        # torch 2.13's CPU backward fails for a bias without weight ("tensor does not have a
        # device"): add the bias outside
        y = F.group_norm(x, groups, None, None, eps) + bias.view((1, -1) + (1,) * (x.dim() - 2))
    else:
        y = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(y) if activation == "silu" else y


def run_group_norm(x, groups, weight, bias, eps=1e-5, backend="cpu", activation=None):
    """`run_three` of fusednorm's group_norm, torch's and the float64 reference."""
    def ours(x, w, b):
        with fusednorm.use_backend(backend):
            return group_norm(x, groups, w, b, eps, activation=activation)

    return run_three((x, weight, bias), ours,
                     lambda x, w, b: torch_group_norm(x, groups, w, b, eps, activation),
                     lambda x, w, b: group_norm_ref(x, groups, w, b, eps, activation))


def check(x, groups, weight=None, bias=None, eps=1e-5, backend="cpu", activation=None):
    results = run_group_norm(x, groups, weight, bias, eps, backend, activation)
    assert_three(results, x.dtype, ulps=ulps_for(backend))
    return results[0][0]


# CPU: the issue's shapes in every dtype and both layouts.
CPU_CASES = [((1, 256, 1, 1), 32), ((20, 6, 10, 10), 1), ((20, 6, 10, 10), 3),
             ((20, 6, 10, 10), 6), ((3, 64, 70, 70), 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,groups", CPU_CASES)
def test_issue_shapes_cpu(shape, groups, channels_last, dtype):
    x = randn(*shape, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    y = check(x, groups, randn(c, dtype=dtype), randn(c, dtype=dtype))
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last
                           else torch.contiguous_format)


# Triton (interpreted in CI): small shapes; both layouts, every dtype.
@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not installed")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,groups", [((1, 256, 1, 1), 32), ((3, 6, 5, 4), 3)])
def test_issue_shapes_triton(shape, groups, channels_last, dtype):
    dev = device_for("triton")
    x = randn(*shape, dtype=dtype, device=dev)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    check(x, groups, randn(c, dtype=dtype, device=dev), randn(c, dtype=dtype, device=dev),
          backend="triton")


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not installed")
@pytest.mark.parametrize("sync", [False, True], ids=["leader", "leader_sync"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_triton_groups_split_into_chunks(monkeypatch, channels_last, sync):
    """Tiles of 64 elements: each group spans several chunks (10 channels first, 38 channels
    last, three groups to a tile), whose sums the chunks exchange, as on a GPU with realistic
    shapes. leader_sync adds what a GPU does on that path: tickets and waits."""
    kernels = importlib.import_module("fusednorm.triton.group_norm")
    monkeypatch.setattr(kernels, "FWD_TILE", 64)
    monkeypatch.setattr(kernels, "BWD_TILE", 64)
    if sync:
        monkeypatch.setattr(kernels, "sync_flags", lambda device, k: (True, True))
    dev = device_for("triton")
    x = randn(2, 12, 15, 10, dtype=torch.float32, device=dev, mean=3.0)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    assert kernels.tiling(12, 150, 3, channels_last, 64).k > 1
    check(x, 3, randn(12, device=dev), randn(12, device=dev), backend="triton",
          activation="silu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(4, 6), (3, 6, 7), (2, 6, 3, 2, 4)], ids=str)
def test_other_ranks(backend, shape):
    dev = device_for(backend)
    check(randn(*shape, device=dev), 2, randn(6, device=dev), randn(6, device=dev),
          backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_3d(backend):
    dev = device_for(backend)
    x = randn(2, 6, 4, 3, 5, device=dev).to(memory_format=torch.channels_last_3d)
    y = check(x, 3, randn(6, device=dev), randn(6, device=dev), backend=backend,
              activation="silu")
    assert y.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", ["w", "b", "none"])
def test_affine_combinations(backend, affine):
    dev = device_for(backend)
    w = randn(6, device=dev) if "w" in affine else None
    b = randn(6, device=dev) if "b" in affine else None
    check(randn(3, 6, 4, 5, device=dev), 3, w, b, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_input_float32_params(backend, dtype):
    dev = device_for(backend)
    results = run_group_norm(randn(3, 6, 4, 5, dtype=dtype, device=dev), 3,
                             randn(6, device=dev), randn(6, device=dev), backend=backend)
    (y, g, _), (yt, gt, _), _ = results
    assert y.dtype == yt.dtype == dtype and g[1].dtype == gt[1].dtype == torch.float32
    assert_three(results, dtype, ulps=ulps_for(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fused_silu(backend, dtype, channels_last):
    dev = device_for(backend)
    x = randn(3, 8, 5, 6, dtype=dtype, device=dev)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    check(x, 4, randn(8, dtype=dtype, device=dev), randn(8, dtype=dtype, device=dev),
          backend=backend, activation="silu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_large_mean_is_stable(dtype, channels_last):
    # mean 1e4 with unit spread: E[x²] − E[x]² would lose every digit in float32
    x = randn(2, 8, 16, 16, dtype=torch.float32, mean=1e4).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    # the float32 computation's own error is relative to the input (1e4), not to y: more than an
    # ulp of y in bfloat16; torch's error, which is as large, is the bound
    assert_three(run_group_norm(x, 2, randn(8), randn(8)), dtype, ulps=None)


def test_channels_last_statistics_far_from_their_pilot_values():
    # Each span's sums are taken about a pilot value; where it lies far from the channel's
    # mean (here 1e3 against a mean near 0 and a spread near 54), sums about it would amplify
    # their rounding ~300x, where torch's own E[x²] - E[x]² is accurate: they are taken again.
    n, c, h, w = 2, 8, 32, 40
    x = pilot_outliers(n, h * w, c, cl_rows(c))
    check(x.view(n, h, w, c).permute(0, 3, 1, 2), 2, randn(c), randn(c))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channels_first_statistics_far_from_their_pilot_values(dtype):
    # Each block's sums are taken about a pilot value, the median of its first, middle and last
    # elements; here 1e3 in a group of mean near 0 (a spread near 40), where sums about it would
    # amplify their rounding ~600x: they are taken again about the block's mean. Groups of 5120
    # elements: blocks of 2048, 2048 and 1024.
    n, c, h, w, groups = 2, 8, 32, 40, 2
    x = randn(n, c, h, w)
    rows = x.view(n * groups, -1)
    for o in range(0, rows.shape[1], BLOCK):
        k = min(BLOCK, rows.shape[1] - o)
        rows[:, [o, o + k // 2, o + k - 1]] = 1e3
    check(x.to(dtype), groups, randn(c, dtype=dtype), randn(c, dtype=dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_input_and_dy(backend):
    dev = device_for(backend)
    x = randn(3, 6, 8, 10, device=dev)[:, :, ::2, 1:]  # neither layout: copied once
    check(x, 3, randn(6, device=dev), randn(6, device=dev), backend=backend)


def test_torch_backend_is_torch():
    x = randn(2, 6, 5)
    with fusednorm.use_backend("torch"):
        y = group_norm(x, 3, activation="silu")
    assert torch.equal(y, F.silu(F.group_norm(x, 3)))


def test_transposed_input_reads_channels_innermost():
    x = randn(4, 10, 6).transpose(1, 2)  # (N, C, L) with channels innermost
    check(x, 3, randn(6), randn(6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_like_torch(backend):
    dev = device_for(backend)
    x = randn(2, 4, 3, 3, device=dev)
    x[0, 0, 1, 1] = float("nan")
    x[1, 3, 0, 0] = float("inf")
    with fusednorm.use_backend(backend):
        y = group_norm(x, 2)
    assert torch.equal(y.isnan(), F.group_norm(x, 2).isnan())
    assert y[0, 2:].isfinite().all() and y[1, :2].isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 6, 3, 3), (2, 6, 0), (2, 0, 3)], ids=str)
def test_empty_inputs_like_torch(backend, shape):
    dev = device_for(backend)
    groups = 3 if shape[1] else 1
    x, w, b = randn(*shape, device=dev), randn(shape[1], device=dev), randn(shape[1], device=dev)
    results = []
    for fn in (group_norm, F.group_norm):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        with fusednorm.use_backend(backend):
            y = fn(leaves[0], groups, leaves[1], leaves[2])
        y.sum().backward()
        results.append([y.detach()] + [t.grad for t in leaves])
    for a, b_ in zip(*results):  # (torch's dweight is NaN when there are no positions)
        torch.testing.assert_close(a, b_, equal_nan=True)


# --- errors: exactly torch's ------------------------------------------------------------------


def assert_same_error(ours, theirs):
    with pytest.raises(Exception) as expected:
        theirs()
    with pytest.raises(type(expected.value)) as got:
        ours()
    assert str(got.value) == str(expected.value)


ERROR_CASES = {
    "channels not divisible": lambda f: f(randn(2, 6, 3), 4),
    "one value per group": lambda f: f(randn(1, 32, 1, 1), 32),
    "one value per group 2-D": lambda f: f(randn(1, 6), 6),
    "1-D input": lambda f: f(randn(6), 3),
    "zero groups": lambda f: f(randn(2, 6, 3), 0),
    "negative groups": lambda f: f(randn(2, 6, 3), -1),
    "weight size": lambda f: f(randn(2, 6, 3), 3, randn(5)),
    "weight rank": lambda f: f(randn(2, 6, 3), 3, randn(6, 1)),
    "bias size": lambda f: f(randn(2, 6, 3), 3, None, randn(7)),
    "integer input": lambda f: f(torch.ones(2, 6, 3, dtype=torch.int32), 3),
    "float64 weight": lambda f: f(randn(2, 6, 3), 3, randn(6, dtype=torch.float64)),
    "float32 weight, float64 input": lambda f: f(randn(2, 6, 3, dtype=torch.float64), 3,
                                                 randn(6)),
    "bfloat16 weight, float16 input": lambda f: f(randn(2, 6, 3, dtype=torch.float16), 3,
                                                  randn(6, dtype=torch.bfloat16)),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors_match_torch(case):
    assert_same_error(lambda: ERROR_CASES[case](group_norm),
                      lambda: ERROR_CASES[case](F.group_norm))


def test_module_errors_match_torch():
    assert_same_error(lambda: GroupNorm(4, 6), lambda: torch.nn.GroupNorm(4, 6))
    with pytest.raises(ValueError, match="activation"):
        GroupNorm(2, 6, activation="relu")
    with pytest.raises(ValueError, match="activation"):
        group_norm(randn(2, 6, 3), 3, activation="gelu")


# --- modules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_module_matches_torch_module(affine, bias):
    ours, theirs = GroupNorm(3, 6, affine=affine, bias=bias), torch.nn.GroupNorm(3, 6, affine=affine, bias=bias)
    assert repr(ours) == repr(theirs)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    if affine:
        with torch.no_grad():
            for p in ours.parameters():
                p.copy_(randn(*p.shape))
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = randn(4, 6, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_module_with_silu():
    m = GroupNorm(2, 8, activation="silu")
    assert repr(m) == "GroupNorm(2, 8, eps=1e-05, affine=True, bias=True, activation='silu')"
    with torch.no_grad():
        m.weight.copy_(randn(8))
        m.bias.copy_(randn(8))
    x = randn(3, 8, 4, 4)
    yr = group_norm_ref(x, 2, m.weight.detach(), m.bias.detach(), activation="silu")
    assert_close_to_ref(m(x).detach(), F.silu(F.group_norm(x, 2, m.weight, m.bias)).detach(), yr)
    # state_dict is torch's: the activation is configuration, not state
    plain = torch.nn.GroupNorm(2, 8)
    plain.load_state_dict(m.state_dict())


def test_module_dtype_and_device_arguments():
    m = GroupNorm(2, 4, dtype=torch.float64)
    assert m.weight.dtype == torch.float64
    assert m(randn(2, 4, 3, dtype=torch.float64)).dtype == torch.float64


# --- autograd -----------------------------------------------------------------------------------


def test_gradcheck_and_gradgradcheck():
    x = randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    w = randn(4, dtype=torch.float64, requires_grad=True)
    b = randn(4, dtype=torch.float64, requires_grad=True)
    for activation in (None, "silu"):
        def fn(x, w, b, activation=activation):
            return group_norm(x, 2, w, b, activation=activation)
        assert torch.autograd.gradcheck(fn, (x, w, b))
        assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_backward_runs_our_kernel():
    # read in place, and copied into torch's layout first: both on the plan's kernels (the
    # copy's own backward hands the gradient on to the odd layout)
    # (the Python node, or from a plan's second backward on the C++ one: cpu/_native.py)
    ours = ("_GroupNormFastBackward", "CppFunction")
    x = randn(2, 4, 3, requires_grad=True)
    assert type(group_norm(x, 2).grad_fn).__name__ in ours
    odd = randn(4, 2, 3, requires_grad=True).transpose(0, 1)  # batch dim not outermost
    y = group_norm(odd, 2)
    assert type(y.grad_fn).__name__ in ours
    dy = randn(2, 4, 3)
    want = torch.autograd.grad(F.group_norm(odd, 2), odd, dy)[0]
    torch.testing.assert_close(torch.autograd.grad(y, odd, dy)[0], want)


# --- determinism --------------------------------------------------------------------------------


def _outputs(backend, x, w, b, activation=None):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    with fusednorm.use_backend(backend):
        y = group_norm(leaves[0], 4, leaves[1], leaves[2], activation=activation)
    grads = torch.autograd.grad(y, leaves, torch.ones_like(y) * torch.linspace(-1, 1, y.numel(),
                                                                              device=y.device
                                                                              ).view(y.shape))
    return [y.detach(), *grads]


@pytest.mark.parametrize("backend", determinism_backends())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_determinism_bitwise(backend, channels_last):
    dev = device_for(backend)
    x = randn(3, 8, 6, 5, device=dev)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = randn(8, device=dev), randn(8, device=dev)
    first = _outputs(backend, x, w, b, "silu")
    for a, b_ in zip(first, _outputs(backend, x, w, b, "silu")):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_cpu_result_does_not_depend_on_thread_count(channels_last, activation):
    """One thread against 3, 5 and 8: with 3 samples channels-last input also switches between
    the per-sample and the per-block kernels (on 2+ threads), which must agree bitwise."""
    x = randn(3, 16, 40, 40)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = randn(16), randn(16)
    runs = []
    for threads in THREAD_COUNTS:
        with kernel_threads(threads):
            runs.append(_outputs("cpu", x, w, b, activation))
    for threads, run in zip(THREAD_COUNTS[1:], runs[1:]):
        for a, b_ in zip(runs[0], run):
            assert torch.equal(a, b_), threads


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_python_threads_calling_one_module_at_once_get_their_own_results(channels_last):
    """Inference from several Python threads through one module (one launch plan, kernels
    running side by side with the GIL released): each call's scratch and statistics stay its
    own (channels last fails with one scratch buffer for all threads)."""
    module = fusednorm.GroupNorm(4, 16)
    inputs = [randn(2, 16, 48, 48, mean=float(i), std=1.0 + i) for i in range(4)]
    if channels_last:
        inputs = [x.contiguous(memory_format=torch.channels_last) for x in inputs]
    with torch.no_grad():
        alone = [module(x) for x in inputs]  # (one call at a time: the same bits, by design)

    def run(i):
        with torch.no_grad():
            for _ in range(100):
                assert torch.equal(module(inputs[i]), alone[i])

    with concurrent.futures.ThreadPoolExecutor(len(inputs)) as pool:
        for done in [pool.submit(run, i) for i in range(len(inputs))]:
            done.result()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("norm", ["group", "instance"])
def test_cpu_batch_invariance_bitwise(norm, channels_last, dtype):
    """Each sample alone gives the bits it gets inside the batch: y and every gradient. Five
    samples run the per-sample channels-last kernel, one sample the per-block one; a slice
    x[i:i + 1] of a channels_last batch must stay on the channels-last kernels."""
    x, dy = randn(5, 16, 24, 24, dtype=dtype, mean=1.0, std=3.0), randn(5, 16, 24, 24,
                                                                        dtype=dtype)
    if channels_last:
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    w, b = randn(16, dtype=dtype), randn(16, dtype=dtype)

    def outputs(x, dy):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        if norm == "group":
            y = group_norm(leaves[0], 4, leaves[1], leaves[2])
        else:
            y = fusednorm.instance_norm(leaves[0], weight=leaves[1], bias=leaves[2])
        return y.detach(), torch.autograd.grad(y, leaves[0], dy)[0]

    batch_y, batch_dx = outputs(x, dy)
    for i in range(x.shape[0]):
        y, dx = outputs(x[i:i + 1], dy[i:i + 1])
        # (channels last as torch's: group_norm's; instance_norm answers contiguous)
        assert y.is_contiguous(memory_format=torch.channels_last) == (channels_last
                                                                      and norm == "group")
        assert torch.equal(y, batch_y[i:i + 1]) and torch.equal(dx, batch_dx[i:i + 1])


@pytest.mark.skipif(not GPU, reason="needs FUSEDNORM_GPU=1 and a CUDA device: the channel "
                    "kernels index exact layouts, so offsets past 2^31 need a tensor that large")
def test_gpu_over_2_31_elements():
    """64-bit offsets: the last sample of a tensor just over 2^31 elements, y and dx."""
    if torch.cuda.get_device_properties(0).total_memory < 40 << 30:
        pytest.skip("needs 40 GiB of GPU memory")
    c = 64
    n = (1 << 31) // (c * 256 * 256) + 1
    x = torch.randn(n, c, 256, 256, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    w, b = randn(c, device="cuda"), randn(c, device="cuda")
    y = group_norm(x, 8, w, b)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    tail = x.detach()[-1:]  # one sample: its own statistics, its own dx (torch's and ref's)

    def theirs(t):
        return torch_group_norm(t, 8, w, b, 1e-5)

    _, (yt, gt, _), (yr, gr, _) = run_three((tail,), theirs, theirs,
                                            lambda t: group_norm_ref(t, 8, w, b), dy=dy[-1:])
    assert_close_to_ref(y[-1:].detach(), yt, yr, what="y")
    assert_close_to_ref(dx[-1:], gt[0], gr[0], what="dx")


def test_fused_silu_large_group_cpu():
    # a group above the size whose silu'(z) the backward keeps between its sweeps
    x = randn(2, 4, 200, 200, mean=0.5)
    check(x, 1, randn(4), randn(4), activation="silu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fused_silu_across_the_exponential_range(dtype, channels_last):
    # weights of 40: z = x̂·w + b spans about ±150, past both ends where exp(-z) is clamped
    # (z < -88: inf, z > 87: a tiny value) and through the whole polynomial between
    x = randn(2, 8, 32, 16, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = (40 * torch.rand(8) + 1).to(dtype) * torch.tensor([1, -1] * 4, dtype=dtype)
    check(x, 4, w, randn(8, dtype=dtype), activation="silu")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fused_silu_of_infinities_like_torch(channels_last):
    # z = ±inf through the bias: torch's silu(-inf) is -inf / (1 + inf), NaN, silu(inf) inf
    x = randn(2, 4, 3, 5)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    b = torch.tensor([float("inf"), float("-inf"), 0.5, float("nan")])
    y = group_norm(x, 2, randn(4), b, activation="silu")
    assert torch.equal(y.isnan(), F.silu(F.group_norm(x, 2, None, b)).isnan())
    assert torch.equal(y.isinf(), F.silu(F.group_norm(x, 2, None, b)).isinf())


# --- torch.compile and the registered ops -------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    gn = importlib.import_module("fusednorm.group_norms")

    dev = device_for(backend)
    for channels_last, x3 in ((False, randn(2, 6, 5, device=dev)),
                              (True, randn(2, 5, 6, device=dev).transpose(1, 2))):
        w, b = randn(6, device=dev), randn(6, device=dev)
        args = (x3, w, b, 3, 1e-5, True, channels_last, backend)
        torch.library.opcheck(gn._fwd_op, args)
        y, mean, var = gn._fwd_op(*args)
        torch.library.opcheck(gn._bwd_op, (torch.randn_like(y), x3, w, b, mean, var, 3, 1e-5,
                                           True, channels_last, backend))


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.norm = GroupNorm(4, 8, activation="silu")
        self.inorm = InstanceNorm2d(8, affine=True, track_running_stats=True)

    def forward(self, x):
        return self.inorm(self.norm(self.conv(x))) + x


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_matches_eager(compiler):
    torch._dynamo.reset()
    model = Block()
    x = randn(2, 8, 6, 6, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    outs = []
    for fn in (model, compiled):
        model.inorm.reset_running_stats()
        for t in [x, *model.parameters()]:
            t.grad = None
        y = fn(x)
        y.square().sum().backward()
        outs.append([y.detach()] + [t.grad.clone() for t in [x, *model.parameters()]]
                    + [model.inorm.running_mean.clone(), model.inorm.running_var.clone()])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# (bfloat16 only: float16 parameters take the same code with the other conversion, which the
# value tests reach; each case compiles four kernels of its own on a cold cache)
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("norm", ["group_norm", "group_norm_silu", "batch_norm"])
def test_half_parameters_are_read_in_place_with_float32_parameters_bits(norm, channels_last,
                                                                        dtype):
    """Half weight and bias reach the kernels as they are (no cast per call) and their
    gradients come back in their dtype: the same bits as float32 parameters of the same
    values, whose gradients torch then rounds; y and dx the same bits too."""
    from fusednorm import batch_norms

    x = randn(6, 16, 5, 7, dtype=dtype, mean=0.5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = randn(6, 16, 5, 7, dtype=dtype)
    w, b = randn(16, dtype=dtype), randn(16, dtype=dtype)
    outs = {}
    for params in (dtype, torch.float32):
        leaves = [x.detach().clone().requires_grad_(), w.to(params).requires_grad_(),
                  b.to(params).requires_grad_()]
        if norm == "batch_norm":
            y = batch_norms.batch_norm(leaves[0], None, None, leaves[1], leaves[2], True)
            plan = batch_norms._PLANS.latest
        else:
            y = group_norm(leaves[0], 4, leaves[1], leaves[2],
                           activation="silu" if norm == "group_norm_silu" else None)
            from fusednorm import group_norms

            plan = group_norms._PLANS.latest
        assert plan.fast and plan.params.dtype == params  # read as they are
        outs[params] = [y, *torch.autograd.grad(y, leaves, dy)]
    (y, dx, dw, db), (y32, dx32, dw32, db32) = outs[dtype], outs[torch.float32]
    assert dw.dtype == db.dtype == dtype and dw32.dtype == torch.float32
    assert torch.equal(y, y32) and torch.equal(dx, dx32)
    assert torch.equal(dw, dw32.to(dtype)) and torch.equal(db, db32.to(dtype))
