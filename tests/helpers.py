"""What every test uses: the tolerance rule, the backends to run, and random inputs."""

from __future__ import annotations

import os

import pytest
import torch

from fusednorm._backend import triton_available

GPU = os.environ.get("FUSEDNORM_GPU") == "1"

# Our backends, each with the device its tensors live on in this run. Triton runs interpreted on
# CPU tensors in CI (small shapes only: the interpreter is slow) and compiled with FUSEDNORM_GPU=1.
BACKENDS = ["cpu"] + (["triton"] if triton_available() else [])
TRITON_DEVICE = "cuda" if GPU else "cpu"


def device_for(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else "cpu"


def backend_params():
    return [pytest.param(b, id=b) for b in BACKENDS]


# One tolerance table (flash-attn's rule): |ours - ref| <= 2 |torch - ref| + atol, with the
# maxima taken over the tensor and atol scaled by the reference's magnitude.
ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def assert_close_to_ref(ours, theirs, ref, dtype=None, atol=None, what=""):
    """ours and theirs (torch) are compared with the float64 reference ref."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    if ours.numel() == 0:
        return
    dtype = dtype or ours.dtype
    ref = ref.double().cpu()
    ours64, theirs64 = ours.double().cpu(), theirs.double().cpu()
    # NaN/inf must appear exactly where torch has them.
    assert torch.equal(ours64.isnan(), theirs64.isnan()), f"{what}: NaN pattern differs from torch"
    finite = ref.isfinite() & theirs64.isfinite()
    if not finite.any():
        return
    scale = max(1.0, ref[finite].abs().max().item())
    atol = (ATOL[dtype] if atol is None else atol) * scale
    err_ours = (ours64 - ref)[finite].abs().max().item()
    err_torch = (theirs64 - ref)[finite].abs().max().item()
    assert err_ours <= 2 * err_torch + atol, (
        f"{what}: max |ours - ref| = {err_ours:.3g} > 2 * {err_torch:.3g} (torch) + {atol:.3g}"
    )


def randn(*shape, dtype=torch.float32, device="cpu", mean=0.0, std=1.0, requires_grad=False):
    t = (torch.randn(*shape, dtype=torch.float64) * std + mean).to(dtype=dtype, device=device)
    return t.requires_grad_(requires_grad)


def run_three(inputs, ours, theirs, ref, dy=None):
    """[(y, grads, extra)] of ours, torch's and the float64 reference on the same inputs.

    Each function gets fresh leaves of `inputs` (None stays None): detached views with the
    inputs' own strides (a row-strided or expanded input reaches ours as it is), the
    reference's converted to float64. It returns y or (y, *extra); grads are those of y with the
    same dy (random, in x's dtype and memory format, unless given), None where the input is
    None."""
    x = inputs[0]
    if dy is None:
        dy = torch.randn(x.shape, dtype=torch.float64).to(device=x.device, dtype=x.dtype)
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            dy = dy.contiguous(memory_format=torch.channels_last)
    results = []
    for fn in (ours, theirs, ref):
        leaves = [None if t is None else
                  (t.detach().double() if fn is ref else t.detach()).requires_grad_()
                  for t in inputs]
        out = fn(*leaves)
        y, extra = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
        present = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(y, present, dy.to(y.dtype)))
        results.append((y.detach(), [None if t is None else next(grads) for t in leaves], extra))
    return results


def assert_three(results, dtype, names=("dx", "dweight", "dbias")):
    """`run_three`'s y and gradients: ours within the tolerance rule of torch's error, with
    torch's dtypes; an absent input has no gradient."""
    (y, g, _), (yt, gt, _), (yr, gr, _) = results
    assert y.dtype == yt.dtype and y.shape == yt.shape
    assert_close_to_ref(y, yt, yr, dtype, what="y")
    for name, a, b, r in zip(names, g, gt, gr):
        if r is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype, name
        assert_close_to_ref(a, b, r, what=name)
