"""A GroupNorm module keeps the plan of its last call and tries it first (`GroupNorm._eager`):
the next call takes it only with the same configuration, state and tensor signature; after
any change it gives torch's result (or error), and the module then keeps the new plan."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from helpers import randn

import fusednorm
from fusednorm import group_norms


def _pair(**kwargs):
    """(ours, torch's) GroupNorm(4, 8) with the same random parameters."""
    theirs = torch.nn.GroupNorm(4, 8, **kwargs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(randn(*p.shape, mean=1.0))
    ours = fusednorm.GroupNorm(4, 8, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _same(ours, theirs):
    assert ours.requires_grad == theirs.requires_grad
    assert ours.dtype == theirs.dtype and ours.stride() == theirs.stride()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.fixture
def calls(monkeypatch):
    """The plan lookups by key (the modules' way when their kept plan does not serve)."""
    seen = []
    planned = group_norms._planned

    def counted(*args):
        seen.append(args[0].shape)
        return planned(*args)

    monkeypatch.setattr(group_norms, "_planned", counted)
    return seen


def test_the_second_call_takes_the_kept_plan(calls):
    ours, theirs = _pair()
    x = randn(2, 8, 5, 6)
    for grad in (True, True, True, False, False, False):
        with torch.set_grad_enabled(grad):
            _same(ours(x), theirs(x))
    assert len(calls) == 2  # once with gradients, once without


def _silu_pair():
    ours, theirs = _pair()
    ours.activation = "silu"
    return ours, torch.nn.Sequential(theirs, torch.nn.SiLU())


# each: (ours, torch's) after the change; x, changed or not
CHANGES = {
    "eps": lambda o, t, x: (setattr(o, "eps", 0.5), setattr(t, "eps", 0.5), x)[-1],
    "num_groups": lambda o, t, x: (setattr(o, "num_groups", 2), setattr(t, "num_groups", 2),
                                   x)[-1],
    "shape": lambda o, t, x: x[:, :, :3],
    "channels_last": lambda o, t, x: x.contiguous(memory_format=torch.channels_last),
    "dtype": lambda o, t, x: (o.double(), t.double(), x.double())[-1],
    "frozen": lambda o, t, x: (o.requires_grad_(False), t.requires_grad_(False), x)[-1],
    "input requires grad": lambda o, t, x: x.requires_grad_(),
}


@pytest.mark.parametrize("change", CHANGES)
def test_any_change_meets_torchs_result(change, calls):
    ours, theirs = _pair()
    x = randn(2, 8, 5, 6)
    _same(ours(x), theirs(x))
    x = CHANGES[change](ours, theirs, x)
    _same(ours(x), theirs(x))
    assert len(calls) == 2
    _same(ours(x), theirs(x))  # (the new plan kept)
    assert len(calls) == 2


def test_the_activation_switched_on_and_off():
    ours, theirs = _pair()
    x = randn(2, 8, 5, 6)
    _same(ours(x), theirs(x))
    ours.activation = "silu"
    _same(ours(x), F.silu(theirs(x)))
    ours.activation = None
    _same(ours(x), theirs(x))


@pytest.mark.parametrize("first", [True, False])
def test_gradient_mode_switched(first):
    """A plan made with gradients records its autograd node; one made without does not."""
    ours, theirs = _pair()
    x = randn(2, 8, 5, 6)
    for grad in (first, not first, first):
        with torch.set_grad_enabled(grad):
            y, y_torch = ours(x), theirs(x)
        _same(y, y_torch)
        if grad:
            dy = randn(*y.shape)
            got = torch.autograd.grad(y, list(ours.parameters()), dy)
            want = torch.autograd.grad(y_torch, list(theirs.parameters()), dy)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("needs", ["x", "weight", "bias", "x,weight", "x,bias",
                                   "weight,bias", "x,weight,bias"])
def test_the_gradients_asked_for_and_no_others(needs):
    """The kept plan's backward returns the gradients of the inputs that require them (all
    three: the plan's shortcut), None for the others, on every call."""
    ours, theirs = _pair()
    needs = needs.split(",")
    for module in (ours, theirs):
        module.weight.requires_grad_("weight" in needs)
        module.bias.requires_grad_("bias" in needs)
    x = randn(2, 8, 5, 6).requires_grad_("x" in needs)
    for _ in range(3):
        for p in (*ours.parameters(), *theirs.parameters(), x):
            p.grad = None
        dy = randn(2, 8, 5, 6)
        ours(x).backward(dy)
        got = (x.grad, ours.weight.grad, ours.bias.grad)
        x.grad = None
        theirs(x).backward(dy)
        want = (x.grad, theirs.weight.grad, theirs.bias.grad)
        for name, g, w in zip(("x", "weight", "bias"), got, want):
            assert (g is None) == (name not in needs) == (w is None)
            if g is not None:
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_a_dead_functorch_wrapper_after_a_plain_call():
    """A tensor kept from inside a finished torch.func.grad is a functorch wrapper: the kept
    plan (which calls the autograd Function's C apply, without unwrapping) must not take it."""
    ours, theirs = _pair()
    x = randn(2, 8, 5, 6, requires_grad=True)
    ours(x).sum().backward()
    kept = []
    torch.func.grad(lambda t: (kept.append(t), (t * 2).sum())[1])(randn(2, 8, 5, 6))
    dead = kept[0]
    assert torch._C._functorch.is_functorch_wrapped_tensor(dead)
    y = ours(dead)
    _same(y, theirs(torch._C._functorch.unwrap_if_dead(dead)))
    y.sum().backward()  # (the plan taken was the unwrapped tensor's)


def test_inside_autocast_after_a_plain_call():
    ours, theirs = _pair()
    x = randn(2, 8, 5, 6, dtype=torch.bfloat16)
    ours.bfloat16(), theirs.bfloat16()
    _same(ours(x), theirs(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_torch = ours(x), theirs(x)
    assert y.dtype == y_torch.dtype  # (autocast runs group_norm in float32)
    torch.testing.assert_close(y, y_torch, rtol=1e-2, atol=1e-2)
    _same(ours(x), theirs(x))


def test_under_vmap_and_a_dispatch_mode_after_a_plain_call():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    ours, theirs = _pair()
    x = randn(3, 2, 8, 5, 6)
    _same(ours(x[0]), theirs(x[0]))
    with torch.no_grad():
        torch.testing.assert_close(torch.func.vmap(ours)(x), torch.func.vmap(theirs)(x))
    with Seen() as mode:
        _same(ours(x[0]), theirs(x[0]))
    assert mode.ops  # (the mode saw the call's ops: the kept plan did not take it)


def test_a_nested_tensor_after_a_dense_call():
    ours, theirs = _pair()
    x = randn(2, 8, 5, 6)
    _same(ours(x), theirs(x))
    nested = torch.nested.nested_tensor([randn(8, 5, 6), randn(8, 4, 6)])
    with pytest.raises(Exception) as want:
        theirs(nested)
    with pytest.raises(type(want.value)):
        ours(nested)
    _same(ours(x), theirs(x))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_called_module_copies_and_pickles(how):
    ours, theirs = _pair()
    x = randn(2, 8, 5, 6)
    ours(x)
    assert ours._fusednorm_last is not None
    again = copy.deepcopy(ours) if how == "deepcopy" else pickle.loads(pickle.dumps(ours))
    assert "_fusednorm_last" not in vars(again)
    _same(again(x), theirs(x))
    assert again.state_dict().keys() == theirs.state_dict().keys()


def test_two_modules_of_one_signature_keep_their_own_configuration():
    a, theirs_a = _pair()
    b, theirs_b = _pair(eps=0.5)
    x = randn(2, 8, 5, 6)
    for _ in range(2):
        _same(a(x), theirs_a(x))
        _same(b(x), theirs_b(x))


def test_silu_module_pair():
    ours, theirs = _silu_pair()
    x = randn(2, 8, 5, 6, requires_grad=True)
    _same(ours(x), theirs(x))
    _same(ours(x), theirs(x))
