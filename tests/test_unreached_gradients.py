"""A norm whose output no gradient reaches (a Function after it returns None for it) gives what
torch's norm gives: no gradient for its weight and bias, rather than zeros (an optimizer skips a
parameter whose gradient is None, where zeros would still apply weight decay and momentum)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import randn

import fusednorm


class _NoGradient(torch.autograd.Function):
    """The identity forward; no gradient backward."""

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


def _grads(call, x, w, b):
    y = call(x, w, b)
    y = y[0] if isinstance(y, tuple) else y
    # (x reaches the loss by another way too, so that the backward runs at all)
    loss = _NoGradient.apply(y).sum() + (x * 2).sum()
    return torch.autograd.grad(loss, (x, w, b), allow_unused=True)


CHANNELS = (4, 8, 5, 5)
ROWS = (4, 5, 8)


def _cases(lib):
    rm, rv = torch.zeros(8), torch.ones(8)
    return {
        "batch_norm train": (CHANNELS, lambda x, w, b: lib.batch_norm(x, None, None, w, b, True)),
        "batch_norm eval": (CHANNELS, lambda x, w, b: lib.batch_norm(x, rm, rv, w, b, False)),
        "group_norm": (CHANNELS, lambda x, w, b: lib.group_norm(x, 2, w, b)),
        "group_norm silu": (CHANNELS, lambda x, w, b: lib.group_norm(x, 2, w, b, activation="silu")
                            if lib is fusednorm else F.silu(F.group_norm(x, 2, w, b))),
        # (instance_norm's autograd Functions are the general ones, GroupNorm's and BatchNorm's)
        "instance_norm": (CHANNELS, lambda x, w, b: lib.instance_norm(x, None, None, w, b)),
        "instance_norm running": (CHANNELS, lambda x, w, b: lib.instance_norm(
            x, rm, rv, w, b, use_input_stats=False)),
        "layer_norm": (ROWS, lambda x, w, b: lib.layer_norm(x, (8,), w, b)),
        "rms_norm": (ROWS, lambda x, w, b: lib.rms_norm(x, (8,), w)),
    }


@pytest.mark.parametrize("case", list(_cases(F)))
def test_no_gradients_where_none_reach_the_norm(case):
    shape, ours = _cases(fusednorm)[case]
    theirs = _cases(F)[case][1]
    x, w, b = randn(*shape, requires_grad=True), randn(8, requires_grad=True), randn(8, requires_grad=True)
    for a, t in zip(_grads(ours, x, w, b), _grads(theirs, x, w, b)):
        assert (a is None) == (t is None)
        if t is not None:
            torch.testing.assert_close(a, t)


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_no_gradients_where_none_reach_a_fused_residual_norm(norm):
    x, res = randn(*ROWS, requires_grad=True), randn(*ROWS, requires_grad=True)
    w, b = randn(8, requires_grad=True), randn(8, requires_grad=True)
    b_ = b if norm == "layer_norm" else None

    def ours():
        return getattr(fusednorm, norm)(x, (8,), w, b_, residual=res)

    def theirs():
        h = x + res
        return (F.layer_norm(h, (8,), w, b) if norm == "layer_norm"
                else F.rms_norm(h, (8,), w)), h

    for call in (ours, theirs):
        y, h = call()
        loss = _NoGradient.apply(y).sum() + _NoGradient.apply(h).sum() + (x * 2).sum()
        grads = torch.autograd.grad(loss, (x, res, w, b), allow_unused=True)
        assert [g is None for g in grads] == [False, True, True, True], call.__name__
