"""Thin drop-ins for torch.nn.LayerNorm and torch.nn.RMSNorm.

Each subclasses torch's module and overrides only ``forward`` (plus keyword-only options torch
lacks), so constructor, attributes, ``reset_parameters``, ``extra_repr``, ``state_dict``, pickling
and meta-device construction are the installed torch's own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusednorm.row_norm import layer_norm, rms_norm


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


    def forward(self, input: Tensor, residual: Tensor | None = None
                ) -> Tensor | tuple[Tensor, Tensor]:
        if residual is None and not self.dropout_p and not self.zero_centered_weight \
                and not self.memory_efficient:
            return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
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


    def forward(self, input: Tensor, residual: Tensor | None = None
                ) -> Tensor | tuple[Tensor, Tensor]:
        if residual is None and not self.dropout_p and not self.zero_centered_weight \
                and not self.memory_efficient:
            return rms_norm(input, self.normalized_shape, self.weight, self.eps)
        return rms_norm(input, self.normalized_shape, self.weight, self.eps,
                        residual=residual, **self._options())

    def extra_repr(self) -> str:
        return super().extra_repr() + self._extra_options_repr()
