"""What torch's dispatcher does to its own norm ops, done for fusednorm's: autocast.

Autocast acts on dispatched ops; fusednorm's eager calls skip the dispatcher, so the public
functions apply torch's autocast policy themselves.

torch 2.13's autocast policy for layer_norm, rms_norm and group_norm, read from the dispatcher's
registrations (``torch._C._dispatch_dump("aten::layer_norm")``) and checked by the tests:

- CUDA: all three are on the float32 list: floating-point arguments other than float64 are cast
  to float32, so the output is float32.
- CPU: no autocast kernel is registered for them: they run in their arguments' dtypes (bfloat16
  in, bfloat16 out; float32 stays float32). Nothing to do.
"""

from __future__ import annotations

import torch

_FLOAT32_OPS = {"cuda": frozenset({"layer_norm", "rms_norm", "group_norm"})}


def casts(device_type: str) -> bool:
    """Whether autocast casts the norms' arguments on this device type now."""
    return device_type in _FLOAT32_OPS and torch.is_autocast_enabled(device_type)


# Whether autocast is on for any device (CUDA among them): one C call, where reading a tensor's
# device type alone costs ~0.3 µs, and the plan keys read this on every call.
any_enabled = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def casts_on(x: torch.Tensor) -> bool:
    """`casts` for x's device."""
    return any_enabled() and casts(x.device.type)


def autocast_cast(op_name: str, *tensors: torch.Tensor | None) -> tuple:
    """``tensors`` (None allowed; the input first) as torch's autocast passes them to
    ``aten::<op_name>`` on the input's device."""
    x = tensors[0]
    if not isinstance(x, torch.Tensor):
        return tensors
    device = x.device.type
    if op_name not in _FLOAT32_OPS.get(device, ()) or not torch.is_autocast_enabled(device):
        return tensors
    return tuple(t.to(torch.float32) if t is not None and t.device.type == device
                 and t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors)
