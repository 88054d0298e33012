"""Thin drop-ins for torch.nn.LayerNorm and torch.nn.RMSNorm.

Each subclasses torch's module and overrides only ``forward`` (plus keyword-only options torch
lacks), so constructor, attributes, ``reset_parameters``, ``extra_repr``, ``state_dict``, pickling
and meta-device construction are the installed torch's own.

TorchScript: ``torch.jit.script`` compiles ``forward``'s ``torch.jit.is_scripting()`` branch,
torch's own ops with the module's options (the kernels are Python, which a scripted model saved
for C++ or mobile cannot call); the eager branch calls `torch.jit.unused` copies of the
functionals (`_route.eager_only`) and methods. A scripted module returns one tensor: the fused
residual's (y, h) form raises there.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fusednorm._route import eager_only
from fusednorm.row_norm import layer_norm, rms_norm

_layer_norm, _rms_norm = eager_only(layer_norm), eager_only(rms_norm)
_is_scripting = torch.jit.is_scripting  # (TorchScript knows the function, not the name)

# TorchScript parses these annotations (it reads neither `X | None` nor a postponed annotation
# that names a typing construct it lacks): hence `Optional`.


class _FusedOptions:
    """Keyword-only options shared by the row norms: fused residual/dropout and friends."""

    def _set_options(self, dropout_p, residual_in_fp32, zero_centered_weight, memory_efficient):
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"dropout probability has to be in [0, 1), but got {dropout_p}")
        self.dropout_p = dropout_p
        self.residual_in_fp32 = residual_in_fp32
        self.zero_centered_weight = zero_centered_weight
        self.memory_efficient = memory_efficient

    def reset_parameters(self) -> None:
        super().reset_parameters()  # torch's, next in the MRO
        if getattr(self, "zero_centered_weight", False) and self.weight is not None:
            torch.nn.init.zeros_(self.weight)  # 1 + w starts as the identity

    def _options(self) -> dict:
        # self.training is read only when there is dropout to switch off: otherwise train and
        # eval run the very same code (and torch.compile needs no guard on it).
        return {
            "dropout_p": self.dropout_p if self.dropout_p and self.training else 0.0,
            "residual_in_fp32": self.residual_in_fp32,
            "zero_centered_weight": self.zero_centered_weight,
            "memory_efficient": self.memory_efficient,
        }

    def _extra_options_repr(self) -> str:
        defaults = {"dropout_p": 0.0, "residual_in_fp32": False, "zero_centered_weight": False,
                        "memory_efficient": False}
        return "".join(f", {k}={getattr(self, k)}" for k, v in defaults.items()
                       if getattr(self, k) != v)


class LayerNorm(_FusedOptions, torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` on fusednorm's kernels.

    ``forward(x, residual=None)``: with a residual returns ``(y, h)``, h = residual +
    dropout(x) and y = LayerNorm(h) in one pass; without one, y = LayerNorm(dropout(x)) alone.
    The same in training and eval (dropout only in training).
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, *, dropout_p: float = 0.0,
                 residual_in_fp32: bool = False, zero_centered_weight: bool = False,
                 memory_efficient: bool = False) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self._set_options(dropout_p, residual_in_fp32, zero_centered_weight, memory_efficient)
        if zero_centered_weight:
            self.reset_parameters()


    def forward(self, input: Tensor, residual: Optional[Tensor] = None):  # noqa: UP045
        """``y``, or ``(y, h)`` when a residual is passed (not under TorchScript)."""
        if _is_scripting():
            _no_residual_in_script(residual)
            x = _dropout_in_script(input, self.dropout_p, self.training)
            weight, bias = self.weight, self.bias
            if self.zero_centered_weight and weight is not None:  # (1 + w) in the compute dtype
                ct = torch.float64 if x.dtype == torch.float64 else torch.float32
                return F.layer_norm(x.to(ct), self.normalized_shape, weight.to(ct) + 1.0,
                                    None if bias is None else bias.to(ct), self.eps
                                    ).to(x.dtype)
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        if residual is None and self.dropout_p == 0.0 and not self.zero_centered_weight \
                and not self.memory_efficient:
            return _layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return self._fused_forward(input, residual)

    @torch.jit.unused
    def _fused_forward(self, input, residual):
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                          residual=residual, **self._options())

    def extra_repr(self) -> str:
        return super().extra_repr() + self._extra_options_repr()


class RMSNorm(_FusedOptions, torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` on fusednorm's kernels; ``forward(x, residual=None)`` as LayerNorm."""

    def __init__(self, normalized_shape, eps: float | None = None,
                 elementwise_affine: bool = True, device=None, dtype=None, *,
                 dropout_p: float = 0.0, residual_in_fp32: bool = False,
                 zero_centered_weight: bool = False, memory_efficient: bool = False) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self._set_options(dropout_p, residual_in_fp32, zero_centered_weight, memory_efficient)
        if zero_centered_weight:
            self.reset_parameters()


    def forward(self, input: Tensor, residual: Optional[Tensor] = None):  # noqa: UP045
        """``y``, or ``(y, h)`` when a residual is passed (not under TorchScript)."""
        if _is_scripting():
            _no_residual_in_script(residual)
            x = _dropout_in_script(input, self.dropout_p, self.training)
            weight = self.weight
            if self.zero_centered_weight and weight is not None:  # (1 + w) in the compute dtype
                ct = torch.float64 if x.dtype == torch.float64 else torch.float32
                return F.rms_norm(x.to(ct), self.normalized_shape, weight.to(ct) + 1.0,
                                  self.eps).to(x.dtype)
            return F.rms_norm(x, self.normalized_shape, weight, self.eps)
        if residual is None and self.dropout_p == 0.0 and not self.zero_centered_weight \
                and not self.memory_efficient:
            return _rms_norm(input, self.normalized_shape, self.weight, self.eps)
        return self._fused_forward(input, residual)

    @torch.jit.unused
    def _fused_forward(self, input, residual):
        return rms_norm(input, self.normalized_shape, self.weight, self.eps,
                        residual=residual, **self._options())

    def extra_repr(self) -> str:
        return super().extra_repr() + self._extra_options_repr()


def _no_residual_in_script(residual: Optional[Tensor]) -> None:  # noqa: UP045
    if residual is not None:
        raise RuntimeError(
            "fusednorm: forward(x, residual) returns (y, h), which a TorchScript module cannot "
            "(one return type): add the residual before the norm in scripted code, or export "
            "the model with torch.export, which keeps the fused form")


def _dropout_in_script(x: Tensor, p: float, training: bool) -> Tensor:
    # torch's dropout (its generator): a scripted model has no access to the kernels' masks
    return F.dropout(x, p) if p > 0.0 and training else x
