"""fusednorm.instance_norm and InstanceNorm1d/2d/3d against torch and the float64 reference:
values and gradients, running statistics (train, eval, momentum None), unbatched input, errors
and state_dict compatibility.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    BACKENDS,
    assert_close_to_ref,
    assert_same_specials,
    assert_three,
    device_for,
    randn,
    run_three,
    ulps_for,
)

import fusednorm
from fusednorm.instance_norms import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, instance_norm
from fusednorm.reference import instance_norm_ref

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MODULES = {1: (InstanceNorm1d, torch.nn.InstanceNorm1d),
           2: (InstanceNorm2d, torch.nn.InstanceNorm2d),
           3: (InstanceNorm3d, torch.nn.InstanceNorm3d)}


def check(x, weight=None, bias=None, backend="cpu", running=None, use_input_stats=True,
          momentum=0.1):
    """ours, torch's and the reference's y, gradients and updated running statistics."""
    def with_stats(fn):
        def call(x, w, b):
            rm, rv = (None, None) if running is None else (running[0].clone(), running[1].clone())
            out = fn(x, rm, rv, w, b, use_input_stats, momentum, 1e-5)
            return out if isinstance(out, tuple) else (out, rm, rv)
        return call

    def ours(*args):
        with fusednorm.use_backend(backend):
            return instance_norm(*args)

    results = run_three((x, weight, bias), with_stats(ours), with_stats(F.instance_norm),
                        with_stats(instance_norm_ref))
    assert_three(results, x.dtype, ulps=ulps_for(backend))
    if running is not None:
        (_, _, (rm, rv)), (_, _, (rmt, rvt)), (_, _, (rmr, rvr)) = results
        assert rm.dtype == running[0].dtype
        assert_close_to_ref(rm, rmt, rmr, what="running_mean", ulps=ulps_for(backend))
        assert_close_to_ref(rv, rvt, rvr, what="running_var", ulps=ulps_for(backend))
    return results[0][0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_values_gradients_running_stats(backend, dtype, channels_last):
    dev = device_for(backend)
    x = randn(3, 6, 5, 4, dtype=dtype, device=dev, mean=0.5)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    running = (randn(6, dtype=ct, device=dev), randn(6, dtype=ct, device=dev).abs() + 0.5)
    w, b = randn(6, dtype=dtype, device=dev), randn(6, dtype=dtype, device=dev)
    y = check(x, w, b, backend, running)
    assert y.is_contiguous()  # as torch's, which normalizes a contiguous view
    # eval with tracked statistics: the running statistics normalize
    check(x, w, b, backend, running, use_input_stats=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(4, 6, 9), (2, 6, 3, 2, 4)], ids=str)
def test_other_ranks(backend, shape):
    dev = device_for(backend)
    check(randn(*shape, device=dev), randn(6, device=dev), None, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_3d(backend):
    dev = device_for(backend)
    x = randn(2, 6, 4, 3, 5, device=dev).to(memory_format=torch.channels_last_3d)
    running = (randn(6, device=dev), randn(6, device=dev).abs() + 0.5)
    y = check(x, randn(6, device=dev), randn(6, device=dev), backend, running)
    assert y.is_contiguous()  # as torch's


def _with_nan_and_inf(fn, backend):
    """fn's y and running statistics with a NaN in (0, 1) and a -inf in (2, 3)."""
    dev = device_for(backend)
    torch.manual_seed(0)
    x = randn(3, 4, 5, 5, device=dev)
    x[0, 1, 2, 2] = float("nan")
    x[2, 3, 0, 4] = float("-inf")
    rm, rv = torch.zeros(4, device=dev), torch.ones(4, device=dev)
    with fusednorm.use_backend(backend):
        y = fn(x, rm, rv)
    return y, rm, rv


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, in the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_like_torch(backend):
    """A NaN or inf poisons only its own (sample, channel), and the running statistics of that
    channel, as in torch."""
    (y, rm, rv), (yt, rmt, rvt) = (_with_nan_and_inf(f, backend)
                                   for f in (instance_norm, F.instance_norm))
    assert_same_specials(y, yt)
    assert y[1].isfinite().all() and rm[[0, 2]].isfinite().all()
    assert_same_specials(rm[:3], rmt[:3])  # channel 3's: test_inf_running_mean_like_torch
    assert_same_specials(rv, rvt)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, in the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_running_mean_like_torch(backend):
    rm, rmt = (_with_nan_and_inf(f, backend)[1] for f in (instance_norm, F.instance_norm))
    assert_same_specials(rm, rmt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("running_dtype", [torch.float64, torch.float16], ids=str)
def test_running_stats_of_another_dtype(backend, running_dtype):
    # torch accepts running statistics of any float dtype here (unlike batch_norm)
    dev = device_for(backend)
    running = (randn(6, dtype=running_dtype, device=dev),
               randn(6, dtype=running_dtype, device=dev).abs() + 0.5)
    x = randn(3, 6, 7, device=dev)
    check(x, None, None, backend, running)
    check(x, None, None, backend, running, use_input_stats=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 6, 4), (2, 0, 4), (2, 6, 0)], ids=str)
def test_empty_batches(backend, shape):
    dev = device_for(backend)
    rm, rv = torch.zeros(shape[1], device=dev), torch.ones(shape[1], device=dev)
    x = randn(*shape, device=dev, requires_grad=True)
    with fusednorm.use_backend(backend):
        y = instance_norm(x, rm, rv)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


# --- modules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_train_eval_like_torch(dims, momentum):
    ours_cls, torch_cls = MODULES[dims]
    ours = ours_cls(4, affine=True, track_running_stats=True, momentum=momentum)
    theirs = torch_cls(4, affine=True, track_running_stats=True, momentum=momentum)
    assert repr(ours) == repr(theirs)
    with torch.no_grad():
        ours.weight.copy_(randn(4))
        ours.bias.copy_(randn(4))
    theirs.load_state_dict(ours.state_dict())
    shape = (3, 4) + (5,) * dims
    for step in range(3):
        x = randn(*shape, mean=step, std=step + 1)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name))
    ours.eval()
    theirs.eval()
    x = randn(*shape)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    # unbatched input (C, *spatial)
    torch.testing.assert_close(ours(x[0]), theirs(x[0]), rtol=1e-5, atol=1e-5)


def test_module_default_is_stateless_and_eval_uses_instance_stats():
    ours, theirs = InstanceNorm2d(3), torch.nn.InstanceNorm2d(3)
    assert ours.running_mean is None and repr(ours) == repr(theirs)
    ours.eval()
    theirs.eval()
    x = randn(2, 3, 4, 4)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(x[1]), theirs(x[1]), rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_both_ways():
    ours = InstanceNorm1d(5, affine=True, track_running_stats=True)
    theirs = torch.nn.InstanceNorm1d(5, affine=True, track_running_stats=True)
    theirs(randn(2, 5, 6))  # running stats move away from their initial values
    ours.load_state_dict(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)
    ours(randn(2, 5, 6))
    theirs.load_state_dict(ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[k], v)


def test_torch_still_routes_modules_through_apply_instance_norm():
    """Our modules override torch's private _apply_instance_norm; if torch renames it, fail
    loudly instead of silently running torch's kernels."""
    assert hasattr(torch.nn.modules.instancenorm._InstanceNorm, "_apply_instance_norm")
    m = InstanceNorm2d(3)
    x = randn(2, 3, 4, 4, requires_grad=True)
    assert type(m(x).grad_fn).__name__ == "_GroupNormBackward"


def test_module_errors_match_torch():
    ours, theirs = InstanceNorm2d(3, affine=True), torch.nn.InstanceNorm2d(3, affine=True)
    for bad in (randn(2, 4, 5, 5), randn(2, 3, 5)):
        with pytest.raises(ValueError) as expected:
            theirs(bad)
        with pytest.raises(ValueError) as got:
            ours(bad)
        assert str(got.value) == str(expected.value)
    with pytest.warns(UserWarning, match="does not match num_features"):
        InstanceNorm2d(3)(randn(2, 4, 5, 5))


# --- errors -------------------------------------------------------------------------------------

ERROR_CASES = {
    "one spatial element": lambda f: f(randn(2, 6, 1)),
    "2-D input in training": lambda f: f(randn(2, 6)),
    "eval without running stats": lambda f: f(randn(2, 6, 4), use_input_stats=False),
    "only running_mean": lambda f: f(randn(2, 6, 4), torch.zeros(6)),
    "running stats size": lambda f: f(randn(2, 6, 4), torch.zeros(5), torch.ones(5)),
    "weight rank": lambda f: f(randn(2, 6, 4), weight=randn(6, 1)),
    "weight dtype": lambda f: f(randn(2, 6, 4), weight=randn(6, dtype=torch.float64)),
    "momentum None": lambda f: f(randn(2, 6, 4), torch.zeros(6), torch.ones(6), momentum=None),
    "running stats requiring grad": lambda f: f(randn(2, 6, 4),
                                                torch.zeros(6, requires_grad=True),
                                                torch.ones(6)),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors_match_torch(case):
    with pytest.raises(Exception) as expected:
        ERROR_CASES[case](F.instance_norm)
    with pytest.raises(type(expected.value)) as got:
        ERROR_CASES[case](instance_norm)
    assert str(got.value) == str(expected.value)


def test_a_model_pickled_when_instance_norm_lived_in_group_norms_loads():
    # InstanceNorm moved from group_norms.py to instance_norms.py: a model pickled before names
    # the old module (the pickle's global written as it was then)
    import pickle

    m = InstanceNorm2d(3, affine=True)
    with torch.no_grad():
        m.weight.normal_()
    old = pickle.dumps(m, protocol=0).replace(b"fusednorm.instance_norms\n",
                                              b"fusednorm.group_norms\n")
    assert b"fusednorm.group_norms\nInstanceNorm2d" in old
    loaded = pickle.loads(old)
    assert type(loaded) is InstanceNorm2d and torch.equal(loaded.weight, m.weight)
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(loaded(x), m(x))
