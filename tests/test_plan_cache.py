"""A call meets the launch plan of its own signature only (`_plan_cache.py`): after a call, the
same shapes with a tensor changed in anything a plan depends on (a parameter's dtype swapped in
place, requires_grad switched off, a lazily negated input, other strides) give torch's result or
torch's error, never the first call's plan. Through torch's guard check, and through the keys of
signatures used where a torch has no usable guard check."""

import pytest
import torch
import torch.nn.functional as F
from helpers import randn

import fusednorm
from fusednorm import _plan_cache, batch_norms, group_norms, row_norm

SHAPE = (4, 8, 5, 6)
CASES = {
    "group_norm": (lambda lib, x, w, b: lib.group_norm(x, 4, w, b)),
    "batch_norm": (lambda lib, x, w, b: lib.batch_norm(x, None, None, w, b, True)),
    "layer_norm": (lambda lib, x, w, b: lib.layer_norm(x, (SHAPE[-1],), w, b)),
}


def _params(name):
    c = SHAPE[-1] if name == "layer_norm" else SHAPE[1]
    return (torch.nn.Parameter(randn(c, mean=1.0)), torch.nn.Parameter(randn(c)))


@pytest.fixture(params=["guard", "signatures"])
def check(request, monkeypatch):
    """Fresh plan caches, with torch's guard check or without one."""
    if request.param == "signatures":
        monkeypatch.setattr(_plan_cache, "_guard", None)
    elif _plan_cache._guard is None:
        pytest.skip("this torch has no usable TensorGuards")
    for module in (group_norms, batch_norms, row_norm):
        monkeypatch.setattr(module, "_PLANS", _plan_cache.PlanCache())
    return request.param


def _same(ours, theirs):
    assert ours.requires_grad == theirs.requires_grad
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_parameters_changed_in_place_meet_a_new_plan(name, check):
    call = CASES[name]
    x = randn(*SHAPE)
    w, b = _params(name)
    _same(call(fusednorm, x, w, b), call(F, x, w, b))
    # requires_grad off: no graph (a stale plan would still record its autograd node)
    w.requires_grad_(False)
    b.requires_grad_(False)
    _same(call(fusednorm, x, w, b), call(F, x, w, b))
    # the parameters' storage swapped for float64 (Module.double() does this): torch's error,
    # not float64 memory read as float32
    w.data, b.data = w.data.double(), b.data.double()
    with pytest.raises(RuntimeError) as theirs:
        call(F, x, w, b)
    with pytest.raises(type(theirs.value)):
        call(fusednorm, x, w, b)


@pytest.mark.parametrize("name", CASES)
def test_inputs_of_the_same_shape_meet_their_own_plan(name, check):
    call = CASES[name]
    w, b = _params(name)
    x = randn(*SHAPE)
    _same(call(fusednorm, x, w, b), call(F, x, w, b))
    negated = torch._neg_view(randn(*SHAPE))  # (the same strides, the negation bit set)
    _same(call(fusednorm, negated, w, b), call(F, negated, w, b))
    strided = randn(*reversed(SHAPE)).permute(3, 2, 1, 0)  # (the same shape, other strides)
    _same(call(fusednorm, strided, w, b), call(F, strided, w, b))
    x.requires_grad_()
    y = call(fusednorm, x, w, b)
    assert y.requires_grad
    grads = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
    y_torch = call(F, x, w, b)
    for ours, theirs in zip(grads, torch.autograd.grad(y_torch, (x, w, b),
                                                        torch.ones_like(y_torch))):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_a_plan_is_found_again_and_each_signature_has_its_own(check):
    """One plan per signature: the same call finds the plan it filed, another dtype of the
    weight files another."""
    x = randn(*SHAPE)
    w, b = _params("group_norm")
    fusednorm.group_norm(x, 4, w, b)
    first = group_norms._PLANS.latest
    fusednorm.group_norm(x.clone(), 4, w, b)
    assert group_norms._PLANS.latest is first
    with torch.no_grad():
        fusednorm.group_norm(x, 4, w, b)
    assert group_norms._PLANS.latest is not first  # (no gradient: another plan)


@pytest.mark.parametrize("name", CASES)
def test_absent_and_repeated_tensors_find_their_plan(name, check):
    """Calls with no weight and bias, and with one tensor passed twice (a guard check fails on
    those: they are filed by signature), find the plan they filed on the next call."""
    call = CASES[name]
    x = randn(*SHAPE)
    w, _ = _params(name)
    cache = {"group_norm": group_norms, "batch_norm": batch_norms,
             "layer_norm": row_norm}[name]._PLANS
    for weight, bias in ((None, None), (w, w)):
        _same(call(fusednorm, x, weight, bias), call(F, x, weight, bias))
        first = cache.latest
        _same(call(fusednorm, x, weight, bias), call(F, x, weight, bias))
        assert cache.latest is first
        guarded = any(plan is first and guard is not None
                      for filed in cache._plans.values() for guard, plan in filed)
        # (absent tensors have stand-ins of their own, so those calls keep the quick check)
        assert guarded == (check == "guard" and weight is None)


@pytest.mark.parametrize("name", CASES)
def test_a_call_outside_autocast_and_inside_it_find_a_plan_each(name, check, monkeypatch):
    """The same call outside autocast, inside it, then outside again: each gets the dtype of
    CUDA's policy (given to the CPU here), float32 inside where torch casts the op."""
    from fusednorm._autocast import _FLOAT32_OPS

    monkeypatch.setitem(_FLOAT32_OPS, "cpu", _FLOAT32_OPS["cuda"])
    call = CASES[name]
    x = randn(*SHAPE, dtype=torch.bfloat16)
    w, b = (p.detach().bfloat16() for p in _params(name))
    cast = name != "batch_norm"  # (torch's CUDA autocast leaves batch_norm alone)
    for inside in (False, True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside):
            y = call(fusednorm, x, w, b)
        theirs = (call(F, x.float(), w.float(), b.float()) if inside and cast
                  else call(F, x, w, b))
        assert y.dtype == theirs.dtype, (inside, y.dtype)
        torch.testing.assert_close(y, theirs, rtol=2e-2, atol=2e-2)  # (bfloat16's rounding)
