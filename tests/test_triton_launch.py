"""What the Triton launchers share (fusednorm/triton/_launch.py): the device guard, the alignment
Triton is told about, the choice of exchange path; and, on a GPU, that the channel norms' split
groups give the same bits by either path and that every launcher runs on its input's device.
"""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
from helpers import GPU, randn

L = pytest.importorskip("fusednorm.triton._launch")
T = importlib.import_module("fusednorm.triton.layer_norm")
TG = importlib.import_module("fusednorm.triton.group_norm")
TB = importlib.import_module("fusednorm.triton.batch_norm")

LAUNCHERS = [T.norm_fwd, T.norm_bwd, T._launch_keep_mask, TG.group_norm_fwd, TG.group_norm_bwd,
             TB.batch_norm_fwd, TB.batch_norm_bwd]


class _Tensor:
    """Stands for a CUDA tensor: the guard reads only is_cuda and device."""

    def __init__(self, index):
        self.is_cuda = index is not None
        self.device = torch.device("cuda", index) if index is not None else torch.device("cpu")


@pytest.mark.parametrize("index, switched", [(1, [1]), (0, []), (None, [])],
                         ids=["other_gpu", "current_gpu", "cpu"])
def test_device_guard_launches_on_the_input_device(monkeypatch, index, switched):
    entered = []

    @contextlib.contextmanager
    def device(d):  # torch.cuda.device, recorded
        entered.append(d.index)
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    seen = []
    launcher = L.on_device(lambda t, *args, **kwargs: seen.append(list(entered)) or (args, kwargs))
    assert launcher(_Tensor(index), 1, k=2) == ((1,), {"k": 2})
    assert seen == [switched]  # the kernel ran inside the input's device, and only then


def test_every_launcher_is_guarded():
    for launcher in LAUNCHERS:
        assert getattr(launcher, "__wrapped__", None) is not None, launcher.__name__


def test_alignment_divides_n_and_every_stride():
    assert L.alignment(3000, 3000) == 8  # Triton alone sees no factor of 16 in 3000
    assert L.alignment(4096, 4096, 0) == 16  # a row stride 0 (expanded rows) divides anything
    assert L.alignment(100, 128) == 4 and L.alignment(7, 7) == 1


def test_interpreter_takes_the_leader_path_without_waiting():
    if GPU:
        pytest.skip("the interpreter's choice")
    assert L.sync_flags(torch.device("cpu"), 4) == (True, False)


# --- GPU only ------------------------------------------------------------------------------------

gpu_only = pytest.mark.skipif(not GPU, reason="needs FUSEDNORM_GPU=1 and a CUDA device")


@gpu_only
def test_gpu_split_paths_follow_the_sm_count(monkeypatch):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    dev = torch.device("cuda", 0)
    assert L.sync_flags(dev, sms) == (False, True)  # all chunks resident: cooperate
    assert L.sync_flags(dev, sms + 1) == (True, True)  # the leader never waits: any K
    monkeypatch.setattr(L, "COOPERATE", False)
    assert L.sync_flags(dev, 2) == (True, True)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gpu_group_norm_cooperative_equals_leader(monkeypatch, channels_last, dtype):
    """The SD-UNet GroupNorm (512 channels, 64x64, 32 groups: 16 chunks a group) by the GPU's
    cooperative path and by the leader path the interpreter runs: the same bits."""
    x = torch.randn(4, 512, 64 * 64, device="cuda").to(dtype)
    dy = torch.randn_like(x)
    if channels_last:
        x, dy = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (x, dy))
    w, b = torch.randn(512, device="cuda"), torch.randn(512, device="cuda")
    assert TG.tiling(512, 4096, 32, channels_last, TG.FWD_TILE).k > 1

    def run():
        y, mean, var = TG.group_norm_fwd(x, w, b, 32, 1e-5, True, channels_last)
        return (y, mean, var) + TG.group_norm_bwd(dy, x, w, b, mean, var, 32, 1e-5, True,
                                                  channels_last)

    cooperative = run()
    monkeypatch.setattr(L, "COOPERATE", False)
    for a, b_ in zip(cooperative, run()):
        assert torch.equal(a, b_)


@gpu_only
@pytest.mark.skipif(GPU and torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_channel_norms_launch_on_the_input_device():
    """Inputs on cuda:1 while cuda:0 is current: every channel-norm kernel runs on cuda:1 (run on
    cuda:0 it would read cuda:1's memory as if it were its own)."""
    assert torch.cuda.current_device() == 0
    x = randn(2, 8, 6, 5, device="cuda:1").view(2, 8, 30)
    w, b = randn(8, device="cuda:1"), randn(8, device="cuda:1")
    dy = torch.randn_like(x)
    y, mean, var = TG.group_norm_fwd(x, w, b, 4, 1e-5, False, False)
    dx, dw, db = TG.group_norm_bwd(dy, x, w, b, mean, var, 4, 1e-5, False, False)
    cpu = importlib.import_module("fusednorm.cpu.group_norm")
    want = cpu.group_norm_fwd(x.cpu(), w.cpu(), b.cpu(), 4, 1e-5, False, False)
    torch.testing.assert_close(y.cpu(), want[0])
    want = cpu.group_norm_bwd(dy.cpu(), x.cpu(), w.cpu(), b.cpu(), want[1], want[2], 4, 1e-5,
                              False, False)
    for ours, theirs in zip((dx, dw, db), want):
        assert ours.device == x.device
        torch.testing.assert_close(ours.cpu(), theirs)
    y, bmean, bvar = TB.batch_norm_fwd(x, w, b, None, None, 1e-5, False)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, w, b, True,
                                                                 0.0, 1e-5))
    dx, dw, db = TB.batch_norm_bwd(dy, x, w, b, bmean, bvar, 1e-5, True, False)
    xt = x.detach().requires_grad_()
    torch.nn.functional.batch_norm(xt, None, None, w, b, True, 0.0, 1e-5).backward(dy)
    torch.testing.assert_close(dx, xt.grad)
