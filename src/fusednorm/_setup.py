"""`python -m fusednorm warmup` and `python -m fusednorm info`: the CPU kernel cache made ahead of
time, and what this installation runs on."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import time
from collections.abc import Callable

import torch

import fusednorm

WARMUP_DTYPES = ("float32", "bfloat16", "float16")


def _row_norms(dtype: torch.dtype) -> None:
    x = torch.randn(4, 64, dtype=dtype, requires_grad=True)
    r = torch.randn(4, 64, dtype=dtype, requires_grad=True)
    for params in (dtype, torch.float32) if dtype != torch.float32 else (dtype,):
        for norm in (fusednorm.LayerNorm(64, dtype=params), fusednorm.RMSNorm(64, dtype=params)):
            norm(x).sum().backward()
            y, h = norm(x, residual=r)
            (y.float().sum() + h.float().sum()).backward()
        y, h = fusednorm.LayerNorm(64, dtype=params, dropout_p=0.1)(x, residual=r)  # (training)
        (y.float().sum() + h.float().sum()).backward()
    if dtype != torch.float32:  # Hugging Face's Llama cast order (see patch.py)
        w = torch.ones(64, dtype=dtype, requires_grad=True)
        fusednorm.rms_norm(x, (64,), w, 1e-6, xhat_dtype=dtype).sum().backward()


def _channel_norms(dtype: torch.dtype) -> None:
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 8, 4, 4, dtype=dtype).contiguous(memory_format=layout)
        x.requires_grad_()
        for norm in (fusednorm.GroupNorm(4, 8, dtype=dtype), fusednorm.BatchNorm2d(8, dtype=dtype),
                     fusednorm.GroupNorm(4, 8, dtype=dtype, activation="silu")):
            norm(x).sum().backward()


def warmup(dtypes=WARMUP_DTYPES, progress: Callable[[str], None] = lambda s: None) -> int:
    """Compile (or load) the CPU kernels common calls use, for these dtypes: the row norms with
    and without residual (and dropout), parameters of the input's dtype and float32, forward and
    backward;
    GroupNorm (with and without its SiLU) and BatchNorm in both layouts. Returns the number of kernels now loaded."""
    from fusednorm.cpu import _channels, batch_norm, group_norm, layer_norm

    with fusednorm.use_backend("cpu"):
        for name in dtypes:
            dtype = getattr(torch, name)
            t0 = time.perf_counter()
            _row_norms(dtype)
            _channel_norms(dtype)
            progress(f"{name}: {time.perf_counter() - t0:.1f} s")
    kernels = [layer_norm._FWD, layer_norm._BWD, layer_norm._MASK, group_norm._CF_FWD,
               group_norm._CF_BWD, batch_norm._CF_FWD, batch_norm._CF_BWD, _channels._CL_FWD, _channels._CL_BWD]
    return sum(len(k._compiled) for k in kernels)


def build_native() -> str:
    """Build GroupNorm's C++ autograd node (cpu/_native.py) where a C++ compiler is at hand;
    what happened, as text (a failed build leaves the Python nodes, which work everywhere)."""
    from fusednorm.cpu import _native

    if not _native.enabled():
        return "C++ autograd node: off (FUSEDNORM_NATIVE=0)"
    t0 = time.perf_counter()
    try:
        path = _native.build()
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as e:
        # (no compiler, no ninja, a torch without headers: cpp_extension's errors)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"C++ autograd node: not built ({first[:200]}); GroupNorm keeps its Python node"
    return f"C++ autograd node: {path} ({time.perf_counter() - t0:.1f} s)"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info() -> str:
    """Versions, backends, threads and the kernel cache, as text."""
    from fusednorm.cpu import _launch, _native, _prebuilt

    cache = _launch.cache_dir()
    shipped = _prebuilt.shelf(_launch._runtime().source_hash)
    cached = sorted(cache.glob("*.o")) if cache.is_dir() else []
    openmp = _launch.openmp_runtime()
    triton = importlib.util.find_spec("triton") is not None
    triton_state = "available" if triton else 'not installed (pip install ".[gpu]")'
    lines = [
        f"fusednorm {fusednorm.__version__}",
        (f"torch {torch.__version__}, numba {_version('numba')}, "
         f"llvmlite {_version('llvmlite')}, triton {_version('triton')}"),
        "backends:",
        "  cpu     numba kernels, compiled on first use and cached (below)",
        (f"          {len(shipped.entries)} shipped as LLVM bitcode, finalized without numba "
         f"on a cache miss" if shipped.entries else
         f"          shipped kernels not used: {shipped.reason}"),
        (f"  triton  {triton_state}; "
         f"CUDA {'available' if torch.cuda.is_available() else 'not available'}"),
        f"  auto    picks cpu for CPU tensors, {'triton' if triton else 'torch'} for CUDA ones",
        "threads:",
        f"  torch.get_num_threads() = {torch.get_num_threads()}: the CPU kernels' thread count",
        f"  OpenMP runtime shared with torch: {openmp or 'none found (kernels run serially)'}",
        "kernel cache:",
        f"  {cache}",
        (f"  {len(cached)} kernels, {sum(p.stat().st_size for p in cached) / 1e6:.1f} MB "
         "(FUSEDNORM_CACHE_DIR moves it; `python -m fusednorm warmup` fills it)"),
        ("  GroupNorm's C++ autograd node: "
         + ("loaded" if _native.module() is not None else
            "not built (`python -m fusednorm warmup` builds it where a C++ compiler is)")),
    ]
    return "\n".join(lines)
