"""The implementations compared. Each provider builds, for one op, a function
f(x, weight, bias, residual) -> (y,) or (y, h), or raises Unavailable with the reason.

Peers are optional: each is imported only when asked for, and an ImportError, a CPU device for
a CUDA-only peer, or an op the peer lacks makes it Unavailable rather than an error.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fusednorm.bench.cases import EPS, GROUPS, RMS_EPS

Fn = Callable[..., tuple]


class Unavailable(Exception):
    pass


def _needs(op: str, table: dict[str, Fn], who: str) -> Fn:
    if op not in table:
        raise Unavailable(f"{who} has no {op}")
    return table[op]


def _cuda_only(device: str, who: str) -> None:
    if device != "cuda":
        raise Unavailable(f"{who} runs on CUDA only")


def _add_norm(norm: Callable) -> Fn:
    def f(x, w, b, r):
        h = x + r
        return norm(h, w, b, None)[0], h
    return f


def torch_eager(op: str, device: str) -> Fn:
    """torch.nn.functional, with add-norm as (x + r) then the norm."""
    def ln(x, w, b, r):
        return (F.layer_norm(x, x.shape[-1:], w, b, EPS),)

    def rms(x, w, b, r):
        return (F.rms_norm(x, x.shape[-1:], w, RMS_EPS),)

    def gn(x, w, b, r):
        return (F.group_norm(x, GROUPS, w, b, EPS),)

    def gn_silu(x, w, b, r):
        return (F.silu(F.group_norm(x, GROUPS, w, b, EPS)),)

    def bn(x, w, b, r):
        return (F.batch_norm(x, None, None, w, b, True, 0.1, EPS),)

    table = {"layer_norm": ln, "rms_norm": rms, "add_layer_norm": _add_norm(ln),
             "add_rms_norm": _add_norm(rms), "group_norm": gn, "group_norm_nhwc": gn,
             "group_norm_silu": gn_silu, "group_norm_silu_nhwc": gn_silu,
             "batch_norm": bn, "batch_norm_nhwc": bn}
    return table[op]


def torch_compile(op: str, device: str) -> Fn:
    """torch.compile of the eager code; one fresh compilation per case (static shapes)."""
    torch._dynamo.reset()  # else each new shape is a recompile, and dynamo stops at its limit
    return torch.compile(torch_eager(op, device))


def fusednorm_auto(op: str, device: str) -> Fn:
    """Our public functions on backend "auto" (the caller sets it around the whole run)."""
    import fusednorm

    name = op.removeprefix("add_").removesuffix("_nhwc")
    silu = name == "group_norm_silu"
    fn = getattr(fusednorm, name.removesuffix("_silu"), None)
    if fn is None:
        raise Unavailable(f"fusednorm.{name} does not exist yet")
    if name == "group_norm":
        return lambda x, w, b, r: (fn(x, GROUPS, w, b, EPS),)
    if silu:
        return lambda x, w, b, r: (fn(x, GROUPS, w, b, EPS, activation="silu"),)
    if name == "batch_norm":
        return lambda x, w, b, r: (fn(x, None, None, w, b, True, 0.1, EPS),)
    if name == "rms_norm":
        def call(x, w, b, r, **kw):
            return fn(x, x.shape[-1:], w, RMS_EPS, **kw)
    else:
        def call(x, w, b, r, **kw):
            return fn(x, x.shape[-1:], w, b, EPS, **kw)
    if op.startswith("add_"):
        return lambda x, w, b, r: tuple(call(x, w, b, r, residual=r))
    return lambda x, w, b, r: (call(x, w, b, r),)


def fusednorm_compile(op: str, device: str) -> Fn:
    """torch.compile of our public functions on backend "auto": where Inductor decomposes our
    row norms (fusednorm/_inductor.py), its fused code; elsewhere our kernels."""
    torch._dynamo.reset()
    return torch.compile(fusednorm_auto(op, device))


def fusednorm_compile_kernels(op: str, device: str) -> Fn:
    """torch.compile of our public functions with our kernels chosen by hand (never
    decomposed): the compiled path that keeps batch invariance."""
    import fusednorm

    torch._dynamo.reset()
    compiled = torch.compile(fusednorm_auto(op, device))
    backend = "cpu" if device == "cpu" else "triton"

    def f(*args):
        with fusednorm.use_backend(backend):
            return compiled(*args)
    return f


def liger(op: str, device: str) -> Fn:
    """Liger-Kernel; RMSNorm in its "gemma" casting mode (all fp32, as torch), not in place."""
    _cuda_only(device, "Liger-Kernel")
    try:
        from liger_kernel.transformers import functional as lf
    except ImportError as e:
        raise Unavailable(f"liger_kernel not importable ({e})") from None

    def add_rms(x, w, b, r):
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

        return tuple(LigerFusedAddRMSNormFunction.apply(x, r, w, RMS_EPS, 0.0, "gemma", False))

    return _needs(op, {
        "layer_norm": lambda x, w, b, r: (lf.liger_layer_norm(x, w, b, EPS),),
        "rms_norm": lambda x, w, b, r: (lf.liger_rms_norm(x, w, RMS_EPS, 0.0, "gemma", False),),
        "add_rms_norm": add_rms,
        "group_norm": lambda x, w, b, r: (lf.liger_group_norm(x, w, b, x.shape[1], GROUPS, EPS),),
    }, "Liger-Kernel")


def quack(op: str, device: str) -> Fn:
    """quack (CuTe DSL, Hopper and newer): RMSNorm, with the residual fused (prenorm=True)."""
    _cuda_only(device, "quack")
    try:
        from quack.rmsnorm import rmsnorm
    except ImportError as e:
        raise Unavailable(f"quack not importable ({e})") from None
    return _needs(op, {
        "rms_norm": lambda x, w, b, r: (rmsnorm(x, w, eps=RMS_EPS),),
        "add_rms_norm": lambda x, w, b, r: tuple(
            rmsnorm(x, w, residual=r, eps=RMS_EPS, prenorm=True)),
    }, "quack")


def apex(op: str, device: str) -> Fn:
    """apex's FusedLayerNorm / FusedRMSNorm (CUDA extension)."""
    _cuda_only(device, "apex")
    try:
        from apex.normalization.fused_layer_norm import (
            fused_layer_norm_affine,
            fused_rms_norm_affine,
        )
    except ImportError as e:
        raise Unavailable(f"apex fused norms not importable ({e})") from None
    return _needs(op, {
        "layer_norm": lambda x, w, b, r: (fused_layer_norm_affine(x, w, b, x.shape[-1:], EPS),),
        "rms_norm": lambda x, w, b, r: (fused_rms_norm_affine(x, w, x.shape[-1:], RMS_EPS),),
    }, "apex")


# Table order is this order. "copy" (and "launch" on CUDA) are references the runner adds.
PROVIDERS: dict[str, Callable[[str, str], Fn]] = {
    "fusednorm": fusednorm_auto,
    "torch": torch_eager,
    "compile": torch_compile,
    "fusednorm-compile": fusednorm_compile,
    "fusednorm-compile-kernels": fusednorm_compile_kernels,
    "liger": liger,
    "quack": quack,
    "apex": apex,
}
