"""What every test uses: the tolerance rule, the backends to run, random inputs, the dropout
mask the contract specifies, what reaches the kernels, and the CPU kernels' thread counts."""

from __future__ import annotations

import contextlib
import importlib
import os

import numpy as np
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


# Bitwise determinism of the Triton kernels can only fail on a GPU: the interpreter runs the
# programs one after another, so every run sums in the same order whatever the kernel does.
gpu_only_determinism = pytest.mark.skipif(
    not GPU, reason="the interpreter runs programs one after another: cannot fail without a GPU")


def determinism_backends():
    return [pytest.param(b, id=b, marks=() if b == "cpu" else gpu_only_determinism)
            for b in BACKENDS]


# One tolerance table (flash-attn's rule): |ours - ref| <= 2 |torch - ref| + atol, with the
# maxima taken over the tensor and atol scaled by the reference's magnitude.
ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


# Per element, a float16/bfloat16 result is a float32 computation rounded once to its dtype: at
# most half a unit in the last place (ulp, of that dtype at the value) from the reference, plus
# the float32 computation's own error (ATOL[float32], scaled as above). The aggregate rule alone
# lets half-only bugs through: x̂ rounded to bfloat16 before the affine passes it, and fails this.
# Triton's interpreter truncates float32 to bfloat16 instead of rounding it (up to one ulp; its
# float16 rounds): ulps_for("triton") allows that under the interpreter, and nowhere else.
ROUNDED_ULPS = {torch.float16: 0.5, torch.bfloat16: 0.5}
INTERPRETER_ULPS = {torch.float16: 0.5, torch.bfloat16: 1.0}
_MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7}


def ulps_for(backend: str) -> dict:
    return INTERPRETER_ULPS if backend == "triton" and not GPU else ROUNDED_ULPS


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at |values| (float64; subnormals have the smallest normal's)."""
    tiny = torch.finfo(dtype).tiny
    exponent = torch.floor(torch.log2(values.double().abs().clamp(min=tiny)))
    return torch.exp2(exponent - _MANTISSA_BITS[dtype])


def assert_close_to_ref(ours, theirs, ref, dtype=None, atol=None, what="", ulps=ROUNDED_ULPS):
    """ours and theirs (torch) are compared with the float64 reference ref; a float16/bfloat16
    `ours` also element by element, within `ulps[its dtype]` (None: not at all, where ref is not
    the exact value that ours rounds; say why at the call)."""
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
    if ulps is not None and ours.dtype in _MANTISSA_BITS:
        assert_within_ulps(ours64[finite], ref[finite], ours.dtype, ulps[ours.dtype], scale, what)


def assert_within_ulps(ours64, ref, dtype, ulps, scale, what=""):
    """|ours - ref| <= ulps · ulp(dtype) + ATOL[float32] · scale, element by element."""
    err = (ours64 - ref).abs()
    spacing = ulp(torch.maximum(ours64.abs(), ref.abs()), dtype)
    bound = ulps * spacing + ATOL[torch.float32] * scale
    worst = int((err - bound).argmax())
    assert err[worst] <= bound[worst], (
        f"{what}: element {worst}: |ours - ref| = {err[worst].item():.3g} is "
        f"{(err[worst] / spacing[worst]).item():.2f} ulps of {dtype} at {ref[worst].item():.4g} "
        f"(allowed {ulps} ulps + {ATOL[torch.float32] * scale:.2g})"
    )


# Found by the NaN/inf tests of BatchNorm and InstanceNorm: the channel kernels' merged moments
# computed inf - inf, so a channel with an inf got running_mean NaN, torch's inf. Fixed on the
# CPU (the merges special-case non-finite means) and in Triton's GroupNorm/InstanceNorm; Triton's
# BatchNorm still has it.
def inf_running_mean_differs(backend: str):
    return pytest.param(backend, marks=pytest.mark.xfail(
        strict=True, reason="an inf makes our running_mean NaN where torch's is inf")
    ) if backend == "triton" else backend


def assert_same_specials(ours, theirs):
    """NaN and inf exactly where torch has them, the finite values close to torch's."""
    assert torch.equal(ours.isnan(), theirs.isnan()), "NaN pattern differs from torch"
    assert torch.equal(ours.isinf(), theirs.isinf()), "inf pattern differs from torch"
    finite = theirs.isfinite()
    torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-5, atol=1e-5)


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


def assert_three(results, dtype, names=("dx", "dweight", "dbias"), ulps=ROUNDED_ULPS):
    """`run_three`'s y and gradients: ours within the tolerance rule of torch's error, with
    torch's dtypes; an absent input has no gradient."""
    (y, g, _), (yt, gt, _), (yr, gr, _) = results
    assert y.dtype == yt.dtype and y.shape == yt.shape
    assert_close_to_ref(y, yt, yr, dtype, what="y", ulps=ulps)
    for name, a, b, r in zip(names, g, gt, gr):
        if r is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype, name
        assert_close_to_ref(a, b, r, what=name, ulps=ulps)


# --- the dropout mask, written from its specification --------------------------------------------
# The kernels keep element (i, j) of an (M, N) input iff tl.rand(seed, i·N + j) >= p
# (docs/DESIGN.md): Philox-4x32-10 (Salmon et al., SC'11) with key (seed mod 2^32, seed >> 32)
# on counter (idx mod 2^32, idx >> 32, 0, 0); its first word read as an int32, negatives folded
# (x -> ~x), times 4.6566127342e-10 in float32. Written here from that text, so that the masks
# the tests use do not come from the code under test.
_U32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter, key):
    """Philox-4x32-10 on four uint32 counter words (arrays of one shape) and two key words."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(10):
        p0, p2 = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2  # exact: 32 x 32 bits
        c0, c1, c2, c3 = ((p2 >> np.uint64(32)) ^ c1 ^ k0, p2 & _U32,
                          (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _U32)
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & _U32, (k1 + np.uint64(0xBB67AE85)) & _U32
    return c0, c1, c2, c3


def reference_keep_mask(seed: int, m: int, n: int, p: float) -> torch.Tensor:
    """The (m, n) bool keep mask of the contract, on the CPU."""
    seed %= 1 << 64
    idx = np.arange(m * n, dtype=np.uint64)
    word = philox4x32_10((idx & _U32, idx >> np.uint64(32), 0 * idx, 0 * idx),
                         (seed & 0xFFFFFFFF, seed >> 32))[0]
    signed = word.astype(np.uint32).view(np.int32)
    folded = np.where(signed < 0, ~signed, signed)
    uniform = folded.astype(np.float32) * np.float32(4.6566127342e-10)
    return torch.from_numpy(uniform >= np.float32(p)).view(m, n)


# --- what reaches the kernels ---------------------------------------------------------------------


@contextlib.contextmanager
def row_kernel_inputs(backend: str):
    """Records the x that each forward launch of the row-norm kernels receives: (shape,
    strides, data_ptr) of its (M, N) rows per call. On the CPU that is a launch plan's call
    (`cpu/layer_norm.py`'s ForwardPlan: its row stride, and x's address); elsewhere the kernel
    contract's `norm_fwd` (docs/DESIGN.md)."""
    seen = []
    if backend == "cpu":
        from fusednorm.cpu.layer_norm import ForwardPlan

        original = ForwardPlan.__call__

        def launching(plan, x, *args, **kwargs):
            seen.append(((plan.m, plan.n), (plan.sx, 1), x.data_ptr()))
            return original(plan, x, *args, **kwargs)

        ForwardPlan.__call__ = launching
        try:
            yield seen
        finally:
            ForwardPlan.__call__ = original
        return
    module = importlib.import_module(f"fusednorm.{backend}.layer_norm")
    original = module.norm_fwd

    def recording(x, *args, **kwargs):
        seen.append((tuple(x.shape), x.stride(), x.data_ptr()))
        return original(x, *args, **kwargs)

    module.norm_fwd = recording
    try:
        yield seen
    finally:
        module.norm_fwd = original


# --- CPU thread counts ----------------------------------------------------------------------------

# Bitwise results must not depend on the thread count: odd counts split rows and blocks unevenly,
# 8 oversubscribes a 2-core machine.
THREAD_COUNTS = (1, 3, 5, 8)


@contextlib.contextmanager
def kernel_threads(k: int):
    """Run the CPU kernels on k threads: they follow torch's count (on torch's own OpenMP
    threads; more threads than cores is fine for a bitwise check)."""
    before = torch.get_num_threads()
    torch.set_num_threads(k)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pilot_outliers(samples, rows, channels, span_rows, value=1e3):
    """(samples, rows, channels) of mean 0 and unit spread, except `value` in the rows the
    channels-last statistics take their pilot values from: the first, middle and last rows of
    each span of span_rows rows of a sample."""
    x = randn(samples, rows, channels)
    for r0 in range(0, rows, span_rows):
        k = min(span_rows, rows - r0)
        x[:, [r0, r0 + k // 2, r0 + k - 1]] = value
    return x
