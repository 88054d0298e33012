"""What Inductor sees of the row norms: decompositions into torch ops, where Inductor's fusion of
the norm with its neighbours (the residual add, the casts, the gradient sums) measured faster
than our opaque kernels.

`row_norm.py` registers each op twice, `fusednorm::row_norm_fwd` / `row_norm_bwd` and
`row_norm_fwd_fusable` / `row_norm_bwd_fusable`, with the same implementation (our kernels), and
picks one per call when the graph is traced (`fusable`). Inductor's decomposition table holds
the `_fusable` ones only: in eager code, and under backends that do not decompose (aot_eager,
anything but Inductor), every call runs our kernel. A call gets the fusable op when
- it is traced under ``use_backend("auto")``: a backend chosen by hand keeps our kernels in
  compiled graphs too, and with them bitwise batch invariance and our weight-gradient order;
- its backend and direction are in `DECOMPOSED` (docs/DESIGN.md, "Under torch.compile");
- it has no dropout (the mask comes from our counter-based generator) and, for the backward,
  is not in the memory-saving mode (which recomputes x̂ from y).

The decompositions compute what the kernel contract (docs/DESIGN.md) specifies, in the same
dtypes: h = residual + x rounded once to h's dtype, statistics in float32 (float64 for float64),
two-pass variance, x̂ rounded to ``xhat_dtype`` before the affine, dw = Σ dy·x̂ with the
unrounded x̂; Inductor chooses the order of the sums.
"""

from __future__ import annotations

import torch

from fusednorm import _backend
from fusednorm._checks import compute_dtype

# (direction, backend) pairs that Inductor decomposes. CPU: Inductor's add + norm, forward and
# forward+backward, beat the opaque op at every size measured (a call through the op costs
# ~60 µs more in a compiled graph, and the add, the casts and the gradient sums stay passes of
# their own). Triton: never measured on a GPU, so our kernels stay.
DECOMPOSED = {("fwd", "cpu"), ("bwd", "cpu")}

_registered = False


def fusable(plan) -> tuple[bool, bool]:
    """Whether a traced call's forward and backward go to the ops Inductor decomposes."""
    if _backend._current != "auto" or plan.dropout_p > 0:
        return False, False
    return (("fwd", plan.backend) in DECOMPOSED,
            ("bwd", plan.backend) in DECOMPOSED and not plan.memory_efficient)


def register_decompositions() -> None:
    """Add the decompositions to Inductor's table, once per process; called while a graph with
    a fusable op is traced (importing Inductor costs seconds: never at import time)."""
    global _registered
    if _registered:
        return
    _registered = True
    from torch._inductor import decomposition

    ops = torch.ops.fusednorm
    decomposition.decompositions[ops.row_norm_fwd_fusable.default] = _row_norm_fwd
    decomposition.decompositions[ops.row_norm_bwd_fusable.default] = _row_norm_bwd
    # the table Inductor reads is a cached copy of that dict: renew it
    decomposition.fast_random_decomps.cache_clear()


def _row_norm_fwd(x, weight, bias, residual, eps, is_rms, zero_centered, dropout_p, seed,
                  out_dtype, residual_dtype, xhat_dtype, backend):
    from fusednorm._row_ops import affine, normalized

    stats = compute_dtype(x.dtype)
    h = x
    if residual is not None:  # added in the compute dtype, rounded once to h's dtype
        compute = compute_dtype(torch.promote_types(x.dtype, residual.dtype))
        h = (residual.to(compute) + x.to(compute)).to(residual_dtype)
    compute = compute_dtype(h.dtype)
    xhat, mean, rstd = normalized(h.to(compute), eps, is_rms)
    y = affine(xhat, weight, bias, zero_centered, out_dtype, xhat_dtype)
    return (y, h if residual is not None else x.new_empty((0,)),
            x.new_empty((0,), dtype=stats) if is_rms else mean.squeeze(-1).to(stats),
            rstd.squeeze(-1).to(stats))


def _row_norm_bwd(dy, h, weight, bias, mean, rstd, dh_out, eps, is_rms, zero_centered,
                  dropout_p, seed, has_residual, x_dtype, residual_dtype, need_weight_grad,
                  from_output, backend):
    from fusednorm._row_ops import first_order_grads

    dh, _, dw, db = first_order_grads(dy, h, weight, dh_out, None, eps, is_rms, zero_centered,
                                      1.0, bias is not None, rstd.dtype, (mean, rstd))
    empty = dy.new_empty((0,))
    need_dw = need_weight_grad and weight is not None
    need_db = need_weight_grad and bias is not None
    return (dh.to(x_dtype), dh.to(residual_dtype) if has_residual else empty,
            dw.to(weight.dtype) if need_dw else dy.new_empty((0,)),
            db.to(bias.dtype) if need_db else dy.new_empty((0,)))
