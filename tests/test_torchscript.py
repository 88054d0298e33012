"""TorchScript: torch.jit.script of fusednorm's modules and of a patched model, in training and
eval, saved and loaded; the scripted module runs torch's ops (modules.py), so it is compared
with the eager module and with torch's module scripted, running statistics included."""

import io

import pytest
import torch
from torch import nn

import fusednorm

pytestmark = pytest.mark.filterwarnings("ignore")  # torch.jit is deprecated in torch 2.13

# name -> (fusednorm's module, torch's module or None (no counterpart), input shape)
MODULES = {
    "LayerNorm": (lambda: fusednorm.LayerNorm(8), lambda: nn.LayerNorm(8), (4, 8)),
    "LayerNorm_2d_no_bias": (lambda: fusednorm.LayerNorm((2, 4), bias=False),
                             lambda: nn.LayerNorm((2, 4), bias=False), (3, 2, 4)),
    "LayerNorm_no_affine": (lambda: fusednorm.LayerNorm(8, elementwise_affine=False),
                            lambda: nn.LayerNorm(8, elementwise_affine=False), (4, 8)),
    "LayerNorm_zero_centered": (lambda: fusednorm.LayerNorm(8, zero_centered_weight=True),
                                None, (4, 8)),
    "RMSNorm": (lambda: fusednorm.RMSNorm(8, eps=1e-6), lambda: nn.RMSNorm(8, eps=1e-6),
                (4, 8)),
    "RMSNorm_zero_centered": (lambda: fusednorm.RMSNorm(8, zero_centered_weight=True), None,
                              (4, 8)),
    "GroupNorm": (lambda: fusednorm.GroupNorm(2, 8), lambda: nn.GroupNorm(2, 8), (3, 8, 5)),
    "GroupNorm_silu": (lambda: fusednorm.GroupNorm(2, 8, activation="silu"), None, (3, 8, 5)),
    "BatchNorm2d": (lambda: fusednorm.BatchNorm2d(8), lambda: nn.BatchNorm2d(8), (3, 8, 2, 2)),
    "BatchNorm1d_cumulative": (lambda: fusednorm.BatchNorm1d(8, momentum=None),
                               lambda: nn.BatchNorm1d(8, momentum=None), (3, 8, 5)),
    "InstanceNorm1d_tracked": (lambda: fusednorm.InstanceNorm1d(8, track_running_stats=True,
                                                                affine=True),
                               lambda: nn.InstanceNorm1d(8, track_running_stats=True,
                                                         affine=True), (3, 8, 5)),
}


def _randomized(module):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(0.5, 1.5)
    return module


def _round_trip(scripted):
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(MODULES))
def test_scripted_module_matches_eager_and_torchs(name, training):
    make_ours, make_torch, shape = MODULES[name]
    eager, scripted_source = _randomized(make_ours()), _randomized(make_ours())
    scripted = _round_trip(torch.jit.script(scripted_source.train(training)))
    eager.train(training)
    theirs = None
    if make_torch is not None:
        theirs = torch.jit.script(_randomized(make_torch()).train(training))
    for step in range(2):  # twice: the running statistics move the same way
        torch.manual_seed(step)
        x = torch.randn(*shape, requires_grad=True)
        y = scripted(x)
        y.square().sum().backward()
        grad = x.grad
        x.grad = None
        expected = eager(x)  # (once a step: it moves the running statistics)
        torch.testing.assert_close(y, expected, msg=name)
        if theirs is not None:
            torch.testing.assert_close(y, theirs(x.detach()), msg=name)
        expected.square().sum().backward()
        torch.testing.assert_close(grad, x.grad)
    assert scripted.state_dict().keys() == eager.state_dict().keys()
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(scripted.state_dict()[key], value, msg=key)


def test_patched_model_scripts():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Conv1d(3, 4, 1),
                          nn.GroupNorm(2, 4), nn.BatchNorm1d(4))
    report = fusednorm.patch(model)
    assert len(report.replaced) == 3
    scripted = _round_trip(torch.jit.script(model))
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(scripted(x), model(x))
    assert isinstance(model[1], fusednorm.LayerNorm)  # scripting leaves the eager model as it is


def test_fused_residual_refuses_under_torchscript():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = fusednorm.RMSNorm(8)

        def forward(self, x, residual):
            return self.norm(x, residual)

    scripted = torch.jit.script(Block())
    with pytest.raises(torch.jit.Error, match="torch.export"):
        scripted(torch.randn(2, 8), torch.randn(2, 8))
