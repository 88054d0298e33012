"""The float64 references are the spec every other test trusts, so they are checked here against
torch's own ops where torch has the case (float32 and float64), and the default they share with
the library against constants written out by hand: a wrong default in reference.py would
otherwise make ours and the reference agree."""

import pytest
import torch
import torch.nn.functional as F
from helpers import BACKENDS, assert_close_to_ref, device_for, randn, ulps_for

import fusednorm
from fusednorm.reference import (
    add_norm_ref,
    batch_norm_ref,
    default_rms_eps,
    group_norm_ref,
    instance_norm_ref,
    layer_norm_ref,
    rms_norm_ref,
)

# torch.nn.functional.rms_norm's eps=None: the machine epsilon of the type it computes in
# (float32 for the half types), written out
DEFAULT_RMS_EPS = {torch.float16: 2.0**-23, torch.bfloat16: 2.0**-23, torch.float32: 2.0**-23,
                   torch.float64: 2.0**-52}
# rows whose mean square is about that epsilon, so that the default decides the result
TINY_STD = {torch.float16: 3e-4, torch.bfloat16: 3e-4, torch.float32: 3e-4, torch.float64: 1.5e-8}


@pytest.mark.parametrize("dtype", list(DEFAULT_RMS_EPS), ids=str)
def test_default_rms_eps_is_torchs(dtype):
    eps = DEFAULT_RMS_EPS[dtype]
    assert default_rms_eps(dtype) == eps
    x = randn(6, 16, dtype=dtype, std=TINY_STD[dtype])
    theirs = F.rms_norm(x, (16,))
    assert torch.equal(theirs, F.rms_norm(x, (16,), eps=eps))  # the table is torch's
    assert not torch.equal(theirs, F.rms_norm(x, (16,), eps=4 * eps))  # ... and it matters
    ref = rms_norm_ref(x, (16,), eps=eps)
    for backend in BACKENDS:
        with fusednorm.use_backend(backend):
            ours = fusednorm.rms_norm(x.to(device_for(backend)), (16,))
        assert_close_to_ref(ours, theirs, ref, what=backend, ulps=ulps_for(backend))


def _grads(fn, leaves, dy):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    y = fn(*leaves)
    return [y.detach(), *torch.autograd.grad(y, leaves, dy.to(y.dtype))]


# float64: torch is exact to ~1e-15, so the reference must be as well; float32: within torch's
# float32 error
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


def assert_same_as_torch(ref_fn, torch_fn, inputs, dtype):
    """The reference (in float64) and torch (in dtype) give the same values and gradients."""
    dy = randn(*inputs[0].shape, dtype=torch.float64)
    ref = _grads(ref_fn, [t.double() for t in inputs], dy)
    theirs = _grads(torch_fn, [t.to(dtype) for t in inputs], dy)
    for i, (r, t) in enumerate(zip(ref, theirs)):
        scale = max(1.0, r.abs().max().item())
        err = (r - t.double()).abs().max().item()
        assert err <= TOLERANCE[dtype] * scale, f"output {i}: {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("zero_centered", [False, True], ids=["w", "1+w"])
def test_row_norm_references_match_torch(dtype, zero_centered):
    x, w, b = randn(7, 3, 20, dtype=torch.float64), randn(3, 20), randn(3, 20)
    shift = 1 if zero_centered else 0  # torch has no zero-centred weight: it gets 1 + w
    assert_same_as_torch(
        lambda x, w, b: layer_norm_ref(x, (3, 20), w, b, 1e-5, zero_centered),
        lambda x, w, b: F.layer_norm(x, (3, 20), w + shift, b, 1e-5), [x, w, b], dtype)
    assert_same_as_torch(
        lambda x, w: rms_norm_ref(x, (20,), w, 1e-6, zero_centered),
        lambda x, w: F.rms_norm(x, (20,), w[0] + shift, 1e-6), [x, w[:1]], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_add_norm_reference_matches_torch(dtype):
    x, r, w = randn(9, 40, dtype=torch.float64), randn(9, 40), randn(40)
    keep, p = torch.rand(9, 40) >= 0.3, 0.3

    def ref(x, r, w):
        y, h = add_norm_ref(x, r, keep, p, rms_norm_ref, normalized_shape=(40,), weight=w,
                            eps=1e-6)
        return y + h.sin()  # h's gradient flows too

    def theirs(x, r, w):
        h = r + x * keep.to(x.dtype) / (1 - p)
        return F.rms_norm(h, (40,), w, 1e-6) + h.sin()

    assert_same_as_torch(ref, theirs, [x, r, w], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_channel_norm_references_match_torch(dtype):
    x, w, b = randn(3, 6, 4, 5, dtype=torch.float64), randn(6), randn(6)
    assert_same_as_torch(lambda x, w, b: group_norm_ref(x, 3, w, b, 1e-5, "silu"),
                         lambda x, w, b: F.silu(F.group_norm(x, 3, w, b, 1e-5)), [x, w, b], dtype)
    rm, rv = randn(6, dtype=torch.float64), randn(6, dtype=torch.float64).abs() + 0.5
    for training in (True, False):
        stats = [rm.clone().to(dtype), rv.clone().to(dtype)]
        assert_same_as_torch(
            lambda x, w, b, t=training: batch_norm_ref(x, rm, rv, w, b, t)[0],
            lambda x, w, b, t=training, s=stats: F.batch_norm(x, *s, w, b, t), [x, w, b], dtype)
        assert_same_as_torch(
            lambda x, w, b, t=training: instance_norm_ref(x, rm, rv, w, b, t)[0],
            lambda x, w, b, t=training: F.instance_norm(x, rm.to(dtype), rv.to(dtype), w, b, t),
            [x, w, b], dtype)
    # the running statistics the references update, against torch's
    for ref_fn, torch_fn in ((batch_norm_ref, F.batch_norm),
                             (instance_norm_ref, F.instance_norm)):
        stats = [rm.clone().to(dtype), rv.clone().to(dtype)]
        torch_fn(x.to(dtype), *stats, None, None, True, 0.1, 1e-5)
        _, new_mean, new_var = ref_fn(x, rm, rv, None, None, True, 0.1, 1e-5)
        for ours, theirs in ((new_mean, stats[0]), (new_var, stats[1])):
            err = (ours - theirs.double()).abs().max().item()
            assert err <= TOLERANCE[dtype] * max(1.0, ours.abs().max().item())
