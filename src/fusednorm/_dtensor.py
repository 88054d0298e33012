"""DTensor sharding rules for the row norms' ops: tensor and sequence parallelism.

A row norm is computed where its rows live: with x sharded along any leading dim (sequence
parallelism shards (batch, sequence, hidden) along the sequence, Shard(1)) every rank runs the
kernels on its local rows, with replicated weight and bias, and no communication. The weight
and bias gradients are sums over all rows: each rank holds the sum over its own, a Partial(sum)
placement, which DTensor all-reduces when a replicated gradient is needed, as it does for
torch's own layer_norm. An x sharded along the normalized dim has no local rule: DTensor
gathers it first (Replicate), then the norm runs everywhere.

Registered when fusednorm is imported after torch.distributed.tensor, else the first time a
DTensor reaches a fusednorm function in eager mode (`_route.kind`): importing
torch.distributed.tensor costs a fraction of a second that most users never need.
"""

from __future__ import annotations

import sys

import torch

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from torch.distributed.tensor.experimental import register_sharding

    ops = torch.ops.fusednorm
    register_sharding([ops.row_norm_fwd.default, ops.row_norm_fwd_fusable.default])(_forward)
    register_sharding([ops.row_norm_bwd.default, ops.row_norm_bwd_fusable.default])(_backward)


def local_residual(x, residual):
    """(residual, whether h goes back local). SequenceParallel turns a norm's first input into
    a DTensor, not its keyword arguments: in a fused pre-norm layer the residual stream stays
    a plain tensor holding this rank's shard, as in the unfused model. Such a residual is taken
    as x's local shard (same placements), and h is handed back local, as the stream was."""
    if residual is None or not _is_dtensor(x) or _is_dtensor(residual):
        return residual, False
    from torch.distributed.tensor import DTensor

    if residual.shape != x.to_local().shape:
        return residual, False  # DTensor's own error for mixed tensors follows
    return DTensor.from_local(residual, x.device_mesh, x.placements, run_check=False), True


def _is_dtensor(t) -> bool:
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def _row_placements(ndim: int):
    """(placement of the rows, of the weight gradients) for each acceptable sharding: all
    replicated, or the rows (*, N) sharded along one leading dim."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    yield Replicate(), Replicate()
    for dim in range(ndim - 1):
        yield Shard(dim), Partial()


def _forward(x, weight, bias, residual, eps, is_rms, zero_centered, dropout_p, seed,
             out_dtype, residual_dtype, xhat_dtype, backend):
    from torch.distributed.tensor import Replicate

    r = Replicate()
    with_h = residual is not None or dropout_p > 0
    rules = []
    for rows, _ in _row_placements(x.ndim):
        outputs = [rows, rows if with_h else r, r if is_rms else rows, rows]
        inputs = [rows, _given(weight, r), _given(bias, r), _given(residual, rows), None, None,
                  None, None, r, None, None, None, None]
        rules.append((outputs, inputs))
    return rules


def _backward(dy, h, weight, bias, mean, rstd, dh_out, eps, is_rms, zero_centered, dropout_p,
              seed, has_residual, x_dtype, residual_dtype, need_weight_grad, from_output,
              backend):
    from torch.distributed.tensor import Replicate

    r = Replicate()
    rules = []
    for rows, grads in _row_placements(dy.ndim):
        outputs = [rows, rows if has_residual else r,
                   grads if need_weight_grad and weight is not None else r,
                   grads if need_weight_grad and bias is not None else r]
        inputs = [rows, rows, _given(weight, r), _given(bias, r), r if is_rms else rows, rows,
                  _given(dh_out, rows), None, None, None, None, r] + [None] * 6
        rules.append((outputs, inputs))
    return rules


def _given(t, placement):
    return None if t is None else placement
