"""patch(model, fuse_activation=True): a GroupNorm whose output the holder's code sends straight
into a SiLU module computes the SiLU itself, and only such a norm (fusednorm._silu_after_norm)."""

import copy
import io

import pytest
import torch
from helpers import assert_close_to_ref
from torch import nn

import fusednorm
from fusednorm import _silu_after_norm
from fusednorm._silu_after_norm import GroupNormThenSiLU, SiLUAfterNorm


class Block(nn.Module):
    """diffusers' ResNet block in small: norm1 -> act, a time embedding through the same act,
    norm2 in configuration-chosen branches (only "default" sends it straight to act)."""

    def __init__(self, mode="default"):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(4, 8), nn.GroupNorm(4, 8)
        self.act = nn.SiLU()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.mode = mode

    def forward(self, x, temb):
        h = x
        h = self.norm1(h)
        h = self.act(h)
        h = self.conv(h) + self.act(temb)[:, :, None, None]
        if self.mode == "default":
            h = self.norm2(h)
        else:
            h = self.norm2(h)
            h = h * 2
        h = self.act(h)
        return x + h


class TwoUses(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.act = nn.GroupNorm(4, 8), nn.SiLU()

    def forward(self, x):
        h = x
        h = self.norm(h)
        h = self.act(h)
        return h + self.norm(x)  # the norm's output read by something else than the SiLU


class InLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.act = nn.GroupNorm(4, 8), nn.SiLU()

    def forward(self, x):
        x = self.norm(x)
        x = self.act(x)
        for _ in range(2):  # (read conservatively: a loop's next statement is not followed)
            x = self.norm(x)
            x = self.act(x)
        return x


def inputs():
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    return x, torch.randn(2, 8, requires_grad=True)


def outputs_and_grads(model, args):
    args = [a.detach().requires_grad_() for a in args]
    model.zero_grad(set_to_none=True)
    out = model(*args)
    torch.manual_seed(1)  # (the same cotangent for a float64 copy)
    (out * torch.randn(out.shape).to(out.dtype)).sum().backward()
    return [out.detach(), *(a.grad for a in args), *(p.grad for p in model.parameters())]


def assert_same_model(model, reference, args):
    """The patched model's output and gradients are the unpatched one's: both compared with a
    float64 copy of the unpatched model (the project's tolerance, `assert_close_to_ref`)."""
    exact = copy.deepcopy(reference).double()
    for got, want, ref in zip(outputs_and_grads(model, args),
                              outputs_and_grads(reference, args),
                              outputs_and_grads(exact, [a.double() for a in args]), strict=True):
        assert_close_to_ref(got, want, ref)


@pytest.fixture
def kernel_silu(monkeypatch):
    """The activation each fused norm asked the kernels for, call by call."""
    asked = []
    eager = fusednorm.GroupNorm._eager

    def recording(self, input, activation):
        asked.append(activation)
        return eager(self, input, activation)

    monkeypatch.setattr(fusednorm.GroupNorm, "_eager", recording)
    return asked


def test_a_norm_feeding_only_the_silu_computes_it(kernel_silu):
    torch.manual_seed(0)
    model = Block()
    reference = copy.deepcopy(model)
    report = fusednorm.patch(model, fuse_activation=True)
    assert sorted(report.fused_activation) == ["norm1", "norm2"]
    assert type(model.norm1) is GroupNormThenSiLU and type(model.act) is SiLUAfterNorm
    x, temb = inputs()
    assert_same_model(model, reference, (x, temb))
    assert kernel_silu == ["silu", "silu"]
    out = model.norm1(x.detach())  # called from elsewhere than the block: the plain norm
    torch.testing.assert_close(out, reference.norm1(x.detach()), rtol=1e-5, atol=1e-5)
    assert kernel_silu[2:] == [None] and not hasattr(out, _silu_after_norm._MARK)
    assert unpatch_restores(model, reference)


def test_the_silu_module_passes_a_marked_output_on_once():
    model = Block()
    fusednorm.patch(model, fuse_activation=True)
    out = torch.randn(2, 8, 5, 5)
    setattr(out, _silu_after_norm._MARK, True)
    assert model.act(out) is out  # (what the block's fused norm hands it)
    torch.testing.assert_close(model.act(out), torch.nn.functional.silu(out))  # mark taken off


def unpatch_restores(model, reference):
    fusednorm.unpatch(model)
    return all(type(a) is type(b) for a, b in zip(model.modules(), reference.modules(),
                                                   strict=True))


def test_a_configuration_change_stops_the_fusion(kernel_silu):
    """norm2 is fused for mode "default", where the other branch cannot run; set the mode after
    patching and that branch runs: the norm must not have applied the SiLU there."""
    torch.manual_seed(0)
    model = Block()
    reference = copy.deepcopy(model)
    fusednorm.patch(model, fuse_activation=True)
    model.mode = reference.mode = "other"
    assert_same_model(model, reference, inputs())
    assert kernel_silu == ["silu", None]


def test_an_equal_configuration_keeps_the_fusion(kernel_silu):
    """The guards compare the attribute with the object it held when fused; another object of
    the same value still passes the test itself."""
    model = Block()
    fusednorm.patch(model, fuse_activation=True)
    equal = b"default".decode()
    assert equal == model.mode and equal is not model.mode
    model.mode = equal
    with torch.no_grad():
        model(*inputs())
    assert kernel_silu == ["silu", "silu"]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_a_fused_model_fuses_in_its_own_blocks(how, kernel_silu):
    """An EMA copy, a saved and loaded model: each fused norm of the copy fuses when its own
    holder (the copy's block) calls it; before, a copy pointed at the original block and never
    fused, and pickling failed on the weak reference."""
    torch.manual_seed(0)
    model = Block()
    reference = copy.deepcopy(model)
    fusednorm.patch(model, fuse_activation=True)
    if how == "deepcopy":
        again = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        again = torch.load(buffer, weights_only=False)
    assert type(again.norm1) is GroupNormThenSiLU and type(again.act) is SiLUAfterNorm
    assert_same_model(again, reference, inputs())
    assert kernel_silu == ["silu", "silu"]
    del model  # (the copy does not depend on the original)
    with torch.no_grad():
        again(*inputs())
    assert kernel_silu[2:] == ["silu", "silu"]


def test_another_holder_of_the_same_class_gets_the_plain_norm(kernel_silu):
    """A block of the holder's class that calls the fused norm (shared after patching) sends its
    output into its own, plain SiLU: the norm must not have applied one."""
    torch.manual_seed(0)
    patched = Block()
    fusednorm.patch(patched, fuse_activation=True)
    other = Block()
    other.norm1 = patched.norm1
    reference = Block()
    reference.load_state_dict(other.state_dict())
    assert_same_model(other, reference, inputs())
    assert kernel_silu[0] is None


def test_a_configuration_that_reads_the_output_is_not_fused():
    model = Block(mode="other")
    report = fusednorm.patch(model, fuse_activation=True)
    assert sorted(report.fused_activation) == ["norm1"]
    assert type(model.norm2) is fusednorm.GroupNorm


@pytest.mark.parametrize("holder", [TwoUses, InLoop])
def test_outputs_read_elsewhere_are_not_fused(holder):
    torch.manual_seed(0)
    model = holder()
    reference = copy.deepcopy(model)
    report = fusednorm.patch(model, fuse_activation=True)
    assert report.fused_activation == {} and type(model.act) is nn.SiLU
    assert_same_model(model, reference, inputs()[:1])


def test_hooks_keep_a_norm_unfused():
    model = Block()
    model.norm1.register_forward_hook(lambda m, a, out: None)
    assert sorted(fusednorm.patch(model, fuse_activation=True).fused_activation) == ["norm2"]


def test_compiled_and_scripted_models_compute_unfused():
    torch.manual_seed(0)
    model = Block()
    reference = copy.deepcopy(model)
    fusednorm.patch(model, fuse_activation=True)
    x, temb = inputs()
    with torch.no_grad():
        want = reference(x, temb)
        torch.testing.assert_close(torch.compile(model)(x, temb), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.jit.script(model)(x, temb), want, rtol=1e-5, atol=1e-5)
