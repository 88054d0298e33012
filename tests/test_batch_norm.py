"""fusednorm.batch_norm and BatchNorm1d/2d/3d against torch and the float64 reference: values,
gradients and running statistics in training and eval, channels_last, momentum None, empty
batches, dtype rules, errors, state_dict compatibility, determinism and torch.compile.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    BACKENDS,
    THREAD_COUNTS,
    assert_close_to_ref,
    assert_same_specials,
    assert_three,
    determinism_backends,
    device_for,
    inf_running_mean_differs,
    kernel_threads,
    pilot_outliers,
    randn,
    run_three,
    ulps_for,
)

import fusednorm
from fusednorm.batch_norms import BatchNorm1d, BatchNorm2d, BatchNorm3d, batch_norm
from fusednorm.cpu._channels import BLOCK, cl_rows
from fusednorm.reference import batch_norm_ref

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MODULES = {1: (BatchNorm1d, torch.nn.BatchNorm1d), 2: (BatchNorm2d, torch.nn.BatchNorm2d),
           3: (BatchNorm3d, torch.nn.BatchNorm3d)}


def check(x, weight=None, bias=None, backend="cpu", running=None, training=True,
          momentum=0.1):
    """ours, torch's and the reference's y, gradients and updated running statistics."""
    def with_stats(fn):
        def call(x, w, b):
            rm, rv = (None, None) if running is None else (running[0].clone(), running[1].clone())
            out = fn(x, rm, rv, w, b, training, momentum, 1e-5)
            return out if isinstance(out, tuple) else (out, rm, rv)
        return call

    def ours(*args):
        with fusednorm.use_backend(backend):
            return batch_norm(*args)

    results = run_three((x, weight, bias), with_stats(ours), with_stats(F.batch_norm),
                        with_stats(batch_norm_ref))
    assert_three(results, x.dtype, ulps=ulps_for(backend))
    if running is not None:
        (_, _, (rm, rv)), (_, _, (rmt, rvt)), (_, _, (rmr, rvr)) = results
        assert rm.dtype == running[0].dtype
        assert_close_to_ref(rm, rmt, rmr, what="running_mean", ulps=ulps_for(backend))
        assert_close_to_ref(rv, rvt, rvr, what="running_var", ulps=ulps_for(backend))
    return results[0][0]


def running_stats(c, dtype, device):
    return randn(c, dtype=dtype, device=device), randn(c, dtype=dtype, device=device).abs() + 0.5


# Training on three shapes (the statistics' splits depend on them); eval normalizes with given
# statistics, element by element, so one shape suffices.
SHAPES = [((20, 6, 10, 10), True), ((4, 64, 33, 35), True), ((37, 16, 12, 10), True),
          ((37, 16, 12, 10), False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,training", SHAPES, ids=str)
def test_values_cpu(shape, training, channels_last, dtype):
    x = randn(*shape, dtype=dtype, mean=0.5)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    y = check(x, randn(c, dtype=dtype), randn(c, dtype=dtype), "cpu",
              running_stats(c, dtype, "cpu"), training)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last
                           else torch.contiguous_format)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cpu_result_does_not_depend_on_thread_count(channels_last, dtype):
    """One thread (the serial kernels) against 3, 5 and 8: the same bits, forward, running
    statistics and backward. N = 37 splits into uneven chunks of samples; the call is above the
    parallel grain."""
    x, dy = randn(37, 16, 12, 10, dtype=dtype, mean=0.5), randn(37, 16, 12, 10, dtype=dtype)
    if channels_last:
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    w, b = randn(16, dtype=dtype), randn(16, dtype=dtype)

    def outputs():
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        rm, rv = torch.zeros(16, dtype=dtype), torch.ones(16, dtype=dtype)
        y = batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], training=True)
        return [y.detach(), rm, rv, *torch.autograd.grad(y, leaves, dy)]

    runs = []
    for threads in THREAD_COUNTS:
        with kernel_threads(threads):
            runs.append(outputs())
    for threads, run in zip(THREAD_COUNTS[1:], runs[1:]):
        for a, b_ in zip(runs[0], run):
            assert torch.equal(a, b_), threads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_a_plain_call_runs_on_its_plan_with_the_general_paths_bits(channels_last, training,
                                                                    dtype, monkeypatch):
    """Plain tensors take the launch plan of their signature, x read in place; the same call
    through the general path gives the same bits: y, running statistics, every gradient (the
    plan's own parameter stand-ins and conversions included: no weight, float32 weight)."""
    from fusednorm import _route, batch_norms

    x = randn(6, 12, 5, 7, dtype=dtype, mean=0.5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = randn(6, 12, 5, 7, dtype=dtype).contiguous(memory_format=torch.channels_last)
    for w, b in ((randn(12, dtype=dtype), randn(12, dtype=dtype)),
                 (randn(12), None), (None, None)):
        running = running_stats(12, dtype if w is None else w.dtype, "cpu")

        def outputs(w=w, b=b, running=running):
            leaves = [t if t is None else t.detach().clone().requires_grad_() for t in (x, w, b)]
            rm, rv = (t.clone() for t in running)
            y = batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], training, 0.1, 1e-5)
            grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy)
            return [y.detach(), rm, rv, *grads]

        planned = outputs()
        plan = batch_norms._PLANS.latest  # the plan of the call just made
        assert plan.fast and plan.stride == x.stride()
        with monkeypatch.context() as m:
            m.setattr(_route, "plain_state", lambda: False)
            general = outputs()
        assert len(planned) == len(general)
        for a, b_ in zip(planned, general):
            assert a.dtype == b_.dtype and a.stride() == b_.stride() and torch.equal(a, b_)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not installed")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_values_triton(training, channels_last, dtype):
    dev = device_for("triton")
    x = randn(3, 6, 5, 4, dtype=dtype, device=dev, mean=0.5)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    check(x, randn(6, dtype=dtype, device=dev), randn(6, dtype=dtype, device=dev), "triton",
          running_stats(6, dtype, dev), training)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not installed")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_triton_several_chunks_per_sample(monkeypatch, channels_last):
    kernels = importlib.import_module("fusednorm.triton.batch_norm")
    monkeypatch.setattr(kernels, "TILE", 64)
    monkeypatch.setattr(kernels, "TILES_PER_CHUNK", 2)
    dev = device_for("triton")
    x = randn(3, 12, 15, 10, device=dev, mean=2.0)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    assert kernels.tiling(12, 150, channels_last)[3] > 1
    check(x, randn(12, device=dev), randn(12, device=dev), "triton", running_stats(12, x.dtype, dev))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(7, 5), (1, 5, 3), (4, 5, 7), (2, 5, 3, 2, 4), (3, 5, 1, 1)],
                         ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_ranks(backend, shape, training):
    dev = device_for(backend)
    check(randn(*shape, device=dev), randn(5, device=dev), randn(5, device=dev), backend,
          running_stats(5, torch.float32, dev), training)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_without_running_stats_and_affine(backend):
    dev = device_for(backend)
    check(randn(4, 6, 5, device=dev), None, None, backend, None, True)
    check(randn(4, 6, 5, device=dev), randn(6, device=dev), None, backend, None, True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_input_float32_params_and_stats(backend, dtype):
    dev = device_for(backend)
    x = randn(4, 6, 5, dtype=dtype, device=dev)
    for training in (True, False):
        check(x, randn(6, device=dev), randn(6, device=dev), backend,
              running_stats(6, torch.float32, dev), training)


def test_transposed_input_reads_channels_innermost():
    x = randn(4, 10, 6).transpose(1, 2)  # BatchNorm1d on (N, L, C).transpose(1, 2)
    check(x, randn(6), randn(6), "cpu", running_stats(6, torch.float32, "cpu"))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_large_mean_is_stable(channels_last):
    x = randn(8, 4, 16, 16, mean=1e4)
    check(x.to(memory_format=torch.channels_last) if channels_last else x, randn(4), randn(4))


def test_channels_last_statistics_far_from_their_pilot_values():
    # as test_group_norm's: BatchNorm's channels-last statistics are those of one sample of
    # all N·H·W rows
    n, c, h, w = 2, 8, 32, 40
    x = pilot_outliers(1, n * h * w, c, cl_rows(c))
    check(x.view(n, h, w, c).permute(0, 3, 1, 2), randn(c), randn(c), "cpu",
          running_stats(c, torch.float32, "cpu"))


def test_channels_first_statistics_far_from_their_pilot_values():
    # as test_group_norm's: each (n, c) row's blocks (rows of 2500 positions: 2048, then 452)
    # summed about the median of their first, middle and last values, here 1e3 in a row of
    # mean near 0; the sums are taken again about the block's mean
    x = randn(3, 5, 50, 50)  # (an odd channel count: the last row is read with itself)
    rows = x.view(15, -1)
    for o in range(0, rows.shape[1], BLOCK):
        k = min(BLOCK, rows.shape[1] - o)
        rows[:, [o, o + k // 2, o + k - 1]] = 1e3
    check(x, randn(5), randn(5), "cpu", running_stats(5, torch.float32, "cpu"))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float16_channels_above_the_kept_size(training):
    """float16 channels first is read per channel, kept converted between the two sweeps up to
    64K values (cpu/batch_norm.py): 80,000 values per channel take the path that reads twice."""
    x = randn(2, 3, 200, 200, dtype=torch.float16, mean=0.5)
    check(x, randn(3, dtype=torch.float16), randn(3, dtype=torch.float16), "cpu",
          running_stats(3, torch.float16, "cpu"), training)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_3d(backend):
    dev = device_for(backend)
    x = randn(3, 6, 4, 3, 5, device=dev).to(memory_format=torch.channels_last_3d)
    y = check(x, randn(6, device=dev), randn(6, device=dev), backend,
              running_stats(6, torch.float32, dev))
    assert y.is_contiguous(memory_format=torch.channels_last_3d)


def _with_nan_and_inf(fn, backend, training):
    """fn's y and running statistics on a batch with a NaN in channel 1 and an inf in 3."""
    dev = device_for(backend)
    torch.manual_seed(0)
    x = randn(4, 5, 3, 3, device=dev)
    x[0, 1, 1, 1] = float("nan")
    x[2, 3, 0, 2] = float("inf")
    w, b = randn(5, device=dev), randn(5, device=dev)
    rm, rv = running_stats(5, torch.float32, dev)
    with fusednorm.use_backend(backend):
        y = fn(x, rm, rv, w, b, training)
    return y, rm, rv


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, in the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_and_inf_like_torch(backend, training):
    """A NaN or inf poisons its channel's batch statistics (training) or only its own element
    (eval), as in torch; the other channels stay finite and right."""
    (y, rm, rv), (yt, rmt, rvt) = (_with_nan_and_inf(f, backend, training)
                                   for f in (batch_norm, F.batch_norm))
    assert_same_specials(y, yt)
    assert y[:, [0, 2, 4]].isfinite().all()
    keep = [0, 1, 2, 4]  # the inf channel's running mean: test_inf_running_mean_like_torch
    assert_same_specials(rm[keep], rmt[keep])
    assert_same_specials(rv, rvt)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, in the interpreter
@pytest.mark.parametrize("backend", [inf_running_mean_differs(b) for b in BACKENDS])
def test_inf_running_mean_like_torch(backend):
    rm, rmt = (_with_nan_and_inf(f, backend, True)[1] for f in (batch_norm, F.batch_norm))
    assert_same_specials(rm, rmt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 6, 3, 3), (4, 6, 0), (0, 6)], ids=str)
def test_empty_batches_keep_running_stats(backend, shape):
    dev = device_for(backend)
    ours = running_stats(6, torch.float32, dev)
    theirs = (ours[0].clone(), ours[1].clone())
    x = randn(*shape, device=dev, requires_grad=True)
    w = randn(6, device=dev, requires_grad=True)
    with fusednorm.use_backend(backend):
        y = batch_norm(x, *ours, w, None, True)
    yt = F.batch_norm(x, *theirs, w, None, True)
    assert y.shape == yt.shape == x.shape
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


# --- modules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track", [True, False])
def test_module_train_eval_like_torch(dims, momentum, track):
    ours_cls, torch_cls = MODULES[dims]
    ours = ours_cls(4, momentum=momentum, track_running_stats=track)
    theirs = torch_cls(4, momentum=momentum, track_running_stats=track)
    assert repr(ours) == repr(theirs)
    with torch.no_grad():
        ours.weight.copy_(randn(4))
        ours.bias.copy_(randn(4))
    theirs.load_state_dict(ours.state_dict())
    shape = (3, 4) + (5,) * dims if dims > 1 else (6, 4)
    for step in range(3):
        x = randn(*shape, mean=step, std=step + 1)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    for name, buf in theirs.named_buffers():
        torch.testing.assert_close(getattr(ours, name), buf)
    ours.eval()
    theirs.eval()
    x = randn(*shape)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_cumulative_average_against_reference():
    """momentum=None: running stats are the plain average of the batches' statistics."""
    m = BatchNorm2d(3, momentum=None)
    batches = [randn(4, 3, 5, 5, mean=i, std=i + 1) for i in range(3)]
    for x in batches:
        m(x)
    mean = torch.stack([x.double().mean((0, 2, 3)) for x in batches]).mean(0)
    var = torch.stack([x.double().var((0, 2, 3)) for x in batches]).mean(0)
    torch.testing.assert_close(m.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert m.num_batches_tracked.item() == 3


def test_module_bias_false_and_no_affine():
    for kw in ({"bias": False}, {"affine": False}):
        ours, theirs = BatchNorm2d(3, **kw), torch.nn.BatchNorm2d(3, **kw)
        assert repr(ours) == repr(theirs)
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
        x = randn(4, 3, 5, 5)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_both_ways_and_old_checkpoints():
    theirs = torch.nn.BatchNorm2d(3)
    theirs(randn(4, 3, 5, 5))
    ours = BatchNorm2d(3)
    ours.load_state_dict(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)
    ours(randn(4, 3, 5, 5))
    theirs.load_state_dict(ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[k], v)
    # a checkpoint from before num_batches_tracked existed (state_dict version 1)
    old = theirs.state_dict()
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1
    fresh = BatchNorm2d(3)
    fresh.load_state_dict(old)
    assert fresh.num_batches_tracked.item() == 0


def test_module_input_dim_errors_match_torch():
    for dims in (1, 2, 3):
        ours_cls, torch_cls = MODULES[dims]
        with pytest.raises(ValueError) as expected:
            torch_cls(3)(randn(3))
        with pytest.raises(ValueError) as got:
            ours_cls(3)(randn(3))
        assert str(got.value) == str(expected.value)


# --- errors and dtype rules ---------------------------------------------------------------------

ERROR_CASES = {
    "one value per channel": lambda f: f(randn(1, 6), torch.zeros(6), torch.ones(6), None, None,
                                         True),
    "one value per channel 4-D": lambda f: f(randn(1, 6, 1, 1), None, None, None, None, True),
    "1-D input": lambda f: f(randn(6), torch.zeros(6), torch.ones(6), None, None, True),
    "eval without running stats": lambda f: f(randn(4, 6), None, None),
    "only running_mean": lambda f: f(randn(4, 6), torch.zeros(6), None, None, None, True),
    "running stats size": lambda f: f(randn(4, 5), torch.zeros(6), torch.ones(6), None, None,
                                      True),
    "running stats rank": lambda f: f(randn(4, 6), torch.zeros(6, 1), torch.ones(6, 1), None,
                                      None, True),
    "weight size": lambda f: f(randn(4, 6), None, None, randn(5), None, True),
    "eps zero in training": lambda f: f(randn(4, 6), None, None, None, None, True, 0.1, 0.0),
    "negative eps": lambda f: f(randn(4, 6), torch.zeros(6), torch.ones(6), eps=-1.0),
    "momentum None": lambda f: f(randn(4, 6), torch.zeros(6), torch.ones(6), None, None, True,
                                 None),
    "running stats float64": lambda f: f(randn(4, 6), torch.zeros(6).double(),
                                         torch.ones(6).double(), None, None, True),
    "running stats requiring grad": lambda f: f(randn(4, 6), torch.zeros(6, requires_grad=True),
                                                torch.ones(6), None, None, True),
    "integer input": lambda f: f(torch.ones(4, 6, dtype=torch.int32), None, None, None, None,
                                 True),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors_match_torch(case):
    with pytest.raises(Exception) as expected:
        ERROR_CASES[case](F.batch_norm)
    with pytest.raises(type(expected.value)) as got:
        ERROR_CASES[case](batch_norm)
    assert str(got.value) == str(expected.value)


def test_weight_of_any_shape_with_c_elements_like_torch():
    x, w = randn(4, 6, 5), randn(2, 3, requires_grad=True)
    y = batch_norm(x, None, None, w, None, True)
    yt = F.batch_norm(x, None, None, w, None, True)
    yr, _, _ = batch_norm_ref(x, None, None, w.view(6), None, True)
    assert_close_to_ref(y.detach(), yt.detach(), yr)
    # (torch 2.13's own backward fails on such a weight; ours gives it its shape)
    dy = randn(4, 6, 5)
    (dw,) = torch.autograd.grad(y, w, dy)
    wr = w.detach().double().view(6).requires_grad_()
    (dwr,) = torch.autograd.grad(batch_norm_ref(x, None, None, wr, None, True)[0], wr, dy.double())
    assert dw.shape == (2, 3)
    torch.testing.assert_close(dw.view(6).double(), dwr, rtol=1e-5, atol=1e-5)


def test_dtype_combinations_accepted_or_refused_like_torch():
    """Every (input, weight/bias, running stats) dtype combination: ours runs where torch runs
    (same output dtype) and raises torch's error where torch refuses."""
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, None]
    for training in (True, False):
        for xd in dtypes[:4]:
            for pd in dtypes:
                for rd in dtypes if training else dtypes[:4]:
                    x = randn(4, 3, 5, dtype=xd)
                    w = None if pd is None else randn(3, dtype=pd)

                    def call(f, rd=rd, w=w, x=x, training=training):
                        rm = None if rd is None else torch.zeros(3, dtype=rd)
                        rv = None if rd is None else torch.ones(3, dtype=rd)
                        return f(x, rm, rv, w, w, training)

                    try:
                        expected = call(F.batch_norm)
                    except (RuntimeError, ValueError, TypeError) as e:
                        # torch refuses: so must we, with its message
                        with pytest.raises(type(e)) as got:
                            call(batch_norm)
                        assert str(got.value) == str(e)
                        continue
                    assert call(batch_norm).dtype == expected.dtype


# --- autograd, determinism, compile -------------------------------------------------------------


def test_gradcheck_and_gradgradcheck():
    x = randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    w = randn(2, dtype=torch.float64, requires_grad=True)
    b = randn(2, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64) * 1.5
    for training in (True, False):
        def fn(x, w, b, training=training):
            return batch_norm(x, rm.clone(), rv.clone(), w, b, training)
        assert torch.autograd.gradcheck(fn, (x, w, b))
        assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("backend", determinism_backends())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_determinism_bitwise(backend, channels_last):
    dev = device_for(backend)
    x = randn(5, 8, 6, 5, device=dev)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)

    def outputs():
        leaves = [t.detach().clone().requires_grad_() for t in (x, torch.ones(8, device=dev),
                                                                torch.zeros(8, device=dev))]
        rm, rv = torch.zeros(8, device=dev), torch.ones(8, device=dev)
        with fusednorm.use_backend(backend):
            y = batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], True)
        return [y.detach(), rm, rv, *torch.autograd.grad(y, leaves, y.detach().cos())]

    for a, b in zip(outputs(), outputs()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    bn = importlib.import_module("fusednorm.batch_norms")
    dev = device_for(backend)
    for channels_last, x3 in ((False, randn(3, 6, 5, device=dev)),
                              (True, randn(3, 5, 6, device=dev).transpose(1, 2))):
        w, b = randn(6, device=dev), randn(6, device=dev)
        rm, rv = running_stats(6, torch.float32, dev)
        for stats in ((None, None), (rm, rv)):
            args = (x3, w, b, *stats, 1e-5, channels_last, backend)
            torch.library.opcheck(bn._fwd_op, args)
        y, mean, var = bn._fwd_op(x3, w, b, None, None, 1e-5, channels_last, backend)
        for training, (m, v) in ((True, (mean, var)), (False, (rm, rv))):
            torch.library.opcheck(bn._bwd_op, (torch.randn_like(y), x3, w, b, m, v, 1e-5,
                                               training, channels_last, backend))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.bn = BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)).relu()


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_training_step_matches_eager(compiler):
    torch._dynamo.reset()
    eager, compiled_model = Net(), Net()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend=compiler)
    x = randn(3, 4, 6, 6)
    for model in (eager, compiled):
        for mode in ("train", "eval"):
            getattr(model, mode)()
            model(x).square().sum().backward()
    for (name, a), b in zip(eager.state_dict().items(), compiled_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    for a, b in zip(eager.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)
