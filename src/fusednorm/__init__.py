"""fusednorm: normalization layers for PyTorch with their own CPU and Triton kernels."""

from fusednorm._backend import current_backend, use_backend
from fusednorm.row_norm import layer_norm, rms_norm
from fusednorm.modules import LayerNorm, RMSNorm
from fusednorm.patch import patch, unpatch

__all__ = [
    "LayerNorm",
    "RMSNorm",
    "current_backend",
    "layer_norm",
    "patch",
    "rms_norm",
    "unpatch",
    "use_backend",
]
