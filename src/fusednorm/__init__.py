"""fusednorm: normalization layers for PyTorch with their own CPU and Triton kernels."""

from fusednorm._backend import current_backend, use_backend

__all__ = ["current_backend", "use_backend"]
