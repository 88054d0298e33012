"""The norms in torch's own ops, for torch.export and TorchScript's tracer.

An exported program is meant to run without fusednorm: on ONNX Runtime, TensorRT, ExecuTorch or
AOTInductor. So while exporting (and while TorchScript's tracer records, which sees aten ops
only), the public functions emit torch's norm ops with the kernels' semantics: the residual add
rounded once to h's dtype, statistics in float32, x̂ rounded to ``xhat_dtype`` before the
affine, the output in ``out_dtype``. `run_decompositions()` then leaves core ATen, and ONNX's
exporter finds its LayerNormalization (RMSNormalization from opset 23, GroupNormalization,
BatchNormalization, InstanceNormalization) in them rather than a tree of elementwise ops.
Dropout, when it is on in the exported program, is torch's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fusednorm._checks import compute_dtype
from fusednorm._row_ops import affine, effective_weight


def row_norm(spec, x: Tensor, residual: Tensor | None, weight: Tensor | None,
             bias: Tensor | None):
    """`layer_norm` / `rms_norm` (spec: `_row_functions.RowSpec`) in torch's ops."""
    h = x
    if spec.fused:  # residual + dropout(x) in the compute dtype, rounded once to h's dtype
        ct = compute_dtype(torch.promote_types(x.dtype, spec.residual_dtype))
        hc = x.to(ct)
        if spec.dropout_p > 0:
            hc = F.dropout(hc, spec.dropout_p)
        h = (hc if residual is None else residual.to(ct) + hc).to(spec.residual_dtype)
    y = _norm(spec, h, weight, bias)
    return (y, h) if spec.has_residual else y


def _norm(spec, h: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    shape, eps = list(spec.normalized_shape), spec.eps
    params = [p for p in (weight, bias) if p is not None]
    ct = compute_dtype(h.dtype)
    if spec.xhat_dtype == ct:  # rounding to the compute dtype is no rounding
        spec = spec.replace(xhat_dtype=None)
    if (not spec.zero_centered and spec.xhat_dtype is None and spec.out_dtype == h.dtype
            and all(p.dtype == h.dtype for p in params)):
        # torch's op computes exactly this: statistics and affine in float32, one rounding
        if spec.is_rms:
            return F.rms_norm(h, shape, weight, eps)
        return F.layer_norm(h, shape, weight, bias, eps)
    hc = h.to(ct)
    if spec.xhat_dtype is not None:  # x̂ rounded before the affine: the norm without it
        xhat = F.rms_norm(hc, shape, None, eps) if spec.is_rms else F.layer_norm(
            hc, shape, None, None, eps)
        return affine(xhat, weight, bias, spec.zero_centered, spec.out_dtype, spec.xhat_dtype)
    w = None if weight is None else effective_weight(weight, spec.zero_centered, ct)
    b = None if bias is None else bias.to(ct)
    if spec.is_rms:
        return F.rms_norm(hc, shape, w, eps).to(spec.out_dtype)
    return F.layer_norm(hc, shape, w, b, eps).to(spec.out_dtype)
