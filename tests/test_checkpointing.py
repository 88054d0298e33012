"""Activation checkpointing: torch.utils.checkpoint (reentrant or not) recomputes fusednorm's
forward, dropout masks included, and selective activation checkpointing sees fusednorm's ops
(a dispatch mode routes the call through the registered ops, `_route.transforming`)."""

import functools

import pytest
import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

import fusednorm

BLOCKS = {
    "layer_norm_residual_dropout": (
        lambda: fusednorm.LayerNorm(16, dropout_p=0.3),
        lambda norm, x: sum(t.sin().sum() for t in norm(x, residual=2 * x)), (4, 16)),
    "rms_norm": (lambda: fusednorm.RMSNorm(16),
                 lambda norm, x: norm(x).sin().sum(), (4, 16)),
    "group_norm_silu": (lambda: fusednorm.GroupNorm(2, 4, activation="silu"),
                        lambda norm, x: norm(x).sin().sum(), (2, 4, 6)),
    "batch_norm": (lambda: fusednorm.BatchNorm1d(4), lambda norm, x: norm(x).sin().sum(),
                   (3, 4, 5)),
}


def _grads(name, wrap):
    make, loss, shape = BLOCKS[name]
    torch.manual_seed(0)
    norm = make()
    x = torch.randn(*shape, requires_grad=True)
    torch.manual_seed(1)  # the dropout seed: the recomputation must redraw the same mask
    wrap(lambda x: loss(norm, x), x).backward()
    return [x.grad, *(p.grad for p in norm.parameters())]


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_checkpointed_gradients_equal_plain_ones(name, reentrant):
    expected = _grads(name, lambda f, x: f(x))
    got = _grads(name, lambda f, x: checkpoint(f, x, use_reentrant=reentrant))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_selective_checkpointing_sees_fusednorms_ops():
    seen = []

    def policy(ctx, op, *args, **kwargs):
        seen.append(str(op))
        return (CheckpointPolicy.MUST_SAVE if "fusednorm" in str(op)
                else CheckpointPolicy.PREFER_RECOMPUTE)

    context = functools.partial(create_selective_checkpoint_contexts, policy)
    for name in ("rms_norm", "group_norm_silu"):
        expected = _grads(name, lambda f, x: f(x))
        got = _grads(name, lambda f, x, c=context: checkpoint(f, x, use_reentrant=False,
                                                              context_fn=c))
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e)
    assert any("fusednorm.row_norm_fwd" in op for op in seen)
    assert any("fusednorm.group_norm_fwd" in op for op in seen)
