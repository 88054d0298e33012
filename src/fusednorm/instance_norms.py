"""InstanceNorm on fusednorm's kernels: GroupNorm with one group per channel (`group_norms.py`),
plus torch's running statistics; in eval with tracked statistics a per-channel affine map, which
is BatchNorm's eval path (`batch_norms.py`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fusednorm import _route
from fusednorm._backend import resolve
from fusednorm._channel_functions import BatchNormFn, BatchSpec, GroupNormFn, GroupSpec
from fusednorm._checks import params_ok, raise_like_torch
from fusednorm._layout import torch_strides
from fusednorm._ops import needs_grad
from fusednorm._route import eager_only
from fusednorm.batch_norms import (
    _BatchNorm,
    _copy,
    _plain,
    batch_norm_forward,
    update_running_stats,
)
from fusednorm.group_norms import _channel_vector_ok, _group_norm


def _running_ok(t, c: int) -> bool:
    return (isinstance(t, Tensor) and t.dim() == 1 and t.shape[0] == c
            and t.is_floating_point() and not (torch.is_grad_enabled() and t.requires_grad))


def _instance_norm_ok(x, running_mean, running_var, weight, bias, use_input_stats, momentum,
                      eps) -> bool:
    if not isinstance(x, Tensor) or x.dim() < 2:
        return False
    if not isinstance(momentum, (int, float)) or not isinstance(eps, (int, float)):
        return False
    if use_input_stats:
        spatial = 1
        for size in x.shape[2:]:
            spatial *= size
        if spatial == 1:
            return False
    if (running_mean is None) != (running_var is None):
        return False
    c = x.shape[1]
    if running_mean is None:
        if not use_input_stats:
            return False
    elif not (_running_ok(running_mean, c) and _running_ok(running_var, c)
              and running_mean.device == x.device and running_var.device == x.device):
        return False
    return (_channel_vector_ok(weight, c) and _channel_vector_ok(bias, c)
            and params_ok(x, weight, bias))


def _replay_instance_norm(x, running_mean, running_var, weight, bias, use_input_stats,
                          momentum, eps):
    """torch's instance_norm on the same tensors (see `batch_norms._replay` for why)."""
    grad = torch.is_grad_enabled()

    def call():
        with torch.set_grad_enabled(grad):
            F.instance_norm(_plain(x), _copy(running_mean), _copy(running_var), _plain(weight),
                            _plain(bias), use_input_stats, momentum, eps)

    raise_like_torch(call, "instance_norm")


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``torch.nn.functional.instance_norm`` on fusednorm's kernels.

    With ``use_input_stats`` each (sample, channel) is normalized by its own statistics and
    the running statistics, when given, move towards their mean over the batch (unbiased
    variance); otherwise the running statistics normalize. The output is contiguous, as
    torch's.
    """
    way = _route.way(input, weight, bias, running_mean, running_var)
    if way in ("export", "torch", "nested", "ops") or (
            way == "transform" and use_input_stats and running_mean is not None):
        # torch's op: for export, for tensors the kernels cannot read, and for running
        # statistics updated in place under a transform (torch's rules for that under vmap)
        return F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats,
                               momentum, eps)
    if not _instance_norm_ok(input, running_mean, running_var, weight, bias, use_input_stats,
                             momentum, eps):
        _replay_instance_norm(input, running_mean, running_var, weight, bias, use_input_stats,
                              momentum, eps)
        return F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats,
                               momentum, eps)  # torch accepts what the kernels do not take
    backend = resolve(input)
    if backend == "torch" or input.numel() == 0:
        return F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats,
                               momentum, eps)
    if input.stride() != torch_strides(input, "instance"):
        # torch's answer, and its gradient, are contiguous: it normalizes a contiguous view
        input = input.contiguous().view(-1).view(input.shape)
    if way == "transform":
        if use_input_stats:  # (no running statistics: see above)
            spec = GroupSpec(input.shape[1], float(eps), False, backend)
            return GroupNormFn.apply(input, weight, bias, spec)[0]
        spec = BatchSpec(False, float(eps), backend)
        return BatchNormFn.apply(input, weight, bias, running_mean, running_var, spec)[0]
    if not use_input_stats:
        args = (input, weight, bias, running_mean, running_var, False, float(eps), "instance",
                backend)
        if needs_grad(input, weight, bias):
            return _BatchNorm.apply(*args)[0]
        return batch_norm_forward(*args)[0]
    c = input.shape[1]
    y, mean, var = _group_norm(input, weight, bias, c, float(eps), False, backend)
    if running_mean is not None:
        # torch updates a copy per sample, then averages the copies over the batch
        update_running_stats(running_mean, running_var, mean.mean(0), var.mean(0),
                             float(momentum), input.numel() // (input.shape[0] * c))
    return y

# ---------------------------------------------------------------------------------------------
# Modules: torch's own with the computation swapped. Constructor, parameters, buffers,
# state_dict, input checks (unbatched input included) and repr are torch's.


_instance_norm_eager = eager_only(instance_norm)
_is_scripting = torch.jit.is_scripting  # (TorchScript knows the function, not the name)


class _InstanceNormApply:
    # torch's _InstanceNorm.forward checks the input and unsqueezes unbatched input, then calls
    # this with torch's own arguments (under TorchScript: torch's instance_norm).
    def _apply_instance_norm(self, input: Tensor) -> Tensor:
        if _is_scripting():
            return F.instance_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias,
                self.training or not self.track_running_stats,
                self.momentum if self.momentum is not None else 0.0, self.eps)
        return _instance_norm_eager(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )


class InstanceNorm1d(_InstanceNormApply, torch.nn.InstanceNorm1d):
    """``torch.nn.InstanceNorm1d`` on fusednorm's kernels."""


class InstanceNorm2d(_InstanceNormApply, torch.nn.InstanceNorm2d):
    """``torch.nn.InstanceNorm2d`` on fusednorm's kernels."""


class InstanceNorm3d(_InstanceNormApply, torch.nn.InstanceNorm3d):
    """``torch.nn.InstanceNorm3d`` on fusednorm's kernels."""
