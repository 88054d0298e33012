"""fusednorm: normalization layers for PyTorch with their own CPU and Triton kernels."""

__version__ = "0.1.0"  # kept equal to pyproject.toml's by tests/test_packaging.py

import sys

from fusednorm import _dtensor
from fusednorm._backend import current_backend, use_backend
from fusednorm.batch_norms import BatchNorm1d, BatchNorm2d, BatchNorm3d, batch_norm
from fusednorm.group_norms import GroupNorm, group_norm
from fusednorm.instance_norms import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, instance_norm
from fusednorm.modules import LayerNorm, RMSNorm
from fusednorm.patch import patch, unpatch
from fusednorm.row_norm import layer_norm, rms_norm

if "torch.distributed.tensor" in sys.modules:  # else registered when a DTensor first arrives
    _dtensor.register()

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "RMSNorm",
    "batch_norm",
    "current_backend",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "patch",
    "rms_norm",
    "unpatch",
    "use_backend",
]
