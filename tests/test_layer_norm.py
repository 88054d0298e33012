"""fusednorm.layer_norm against torch and the float64 reference: values, gradients, errors,
special values, bitwise batch invariance and determinism.

The grid follows the core issue: awkward sizes (1, 7, 1000, 300000 are not powers of two; 65536
and 300000 exceed any single block), one row and many rows, every dtype and weight/bias
combination, and layouts that are not contiguous.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    BACKENDS,
    assert_close_to_ref,
    assert_three,
    determinism_backends,
    device_for,
    randn,
    row_kernel_inputs,
    run_three,
    ulps_for,
)

import fusednorm
from fusednorm.reference import layer_norm_ref, rms_norm_ref

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
NS = [1, 7, 768, 1000, 4096, 65536, 300000]
MS = [1, 37, 2048]
# every (M, N) of the grid that stays under 4M elements (the float64 reference and
# torch's own run are part of each case)
GRID = [(m, n) for m in MS for n in NS if m * n <= 1 << 22]


def check(x, normalized_shape, weight=None, bias=None, eps=1e-5, backend="cpu"):
    def ours(x, w, b):
        with fusednorm.use_backend(backend):
            return fusednorm.layer_norm(x, normalized_shape, w, b, eps)

    assert_three(run_three(
        (x, weight, bias), ours,
        lambda x, w, b: F.layer_norm(x, normalized_shape, w, b, eps),
        lambda x, w, b: layer_norm_ref(x, normalized_shape, w, b, eps),
    ), x.dtype, ulps=ulps_for(backend))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n", GRID)
def test_grid_cpu(m, n, dtype):
    x = randn(m, n, dtype=dtype)
    check(x, (n,), randn(n, dtype=dtype), randn(n, dtype=dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", ["wb", "w", "b", "none"])
def test_affine_combinations(backend, dtype, affine):
    dev = device_for(backend)
    x = randn(37, 123, dtype=dtype, device=dev)
    w = randn(123, dtype=dtype, device=dev) if "w" in affine else None
    b = randn(123, dtype=dtype, device=dev) if "b" in affine else None
    check(x, (123,), w, b, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_input_float32_params(backend, dtype):
    dev = device_for(backend)
    x = randn(37, 1000, dtype=dtype, device=dev)
    w, b = randn(1000, device=dev), randn(1000, device=dev)
    check(x, (1000,), w, b, backend=backend)
    with fusednorm.use_backend(backend):
        assert fusednorm.layer_norm(x, (1000,), w, b).dtype == dtype


@pytest.mark.parametrize(
    "shape,normalized_shape",
    [((1, 1), (1,)), ((5, 123, 123), (123,)), ((5, 123, 123), (123, 123)),
     ((4, 2, 2, 5), (2, 2, 5)), ((2, 10, 64), (64,)), ((2, 8, 8, 128), (128,)), ((17,), (17,))],
)
def test_shapes_and_ranks(shape, normalized_shape):
    k = len(normalized_shape)
    x = randn(*shape)
    check(x, normalized_shape, randn(*shape[len(shape) - k:]), randn(*shape[len(shape) - k:]))


def _layouts(dtype=torch.float64, device="cpu"):
    """Views made in the final dtype and device (a later .to() would make them contiguous)."""
    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(dtype=dtype, device=device)

    base = rand(6, 9, 40)
    return {
        "row-strided": base[:, :, :32],  # rows read in place with row stride 40
        "every-other-row": base[::2],
        "transposed": base.transpose(0, 1),
        "inner-stride-2": base[..., ::2],  # copied once
        "expanded": rand(1, 40).expand(5, 40),  # row stride 0
        "channels-last": rand(2, 16, 4, 4).to(memory_format=torch.channels_last).permute(
            0, 2, 3, 1),  # (2, 4, 4, 16), C inner
        "channels-last-nchw": rand(2, 3, 4, 4).to(memory_format=torch.channels_last),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(_layouts()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous(backend, layout, dtype):
    x = _layouts(dtype, device_for(backend))[layout]
    assert layout == "channels-last" or not x.is_contiguous()  # the views reach ours
    k = 3 if layout == "channels-last-nchw" else 1
    ns = tuple(x.shape[-k:])
    w = randn(*ns, dtype=dtype, device=x.device)
    b = randn(*ns, dtype=dtype, device=x.device)
    check(x, ns, w, b, backend=backend)


def rows_past_2_31(m, n, dtype, device):
    """(m, n) rows 2^32 + 3n elements apart: offsets past 2^31 (and 2^32) without 8 GB of
    memory. The storage is reserved, not touched: only the m rows are written. An offset cut to
    32 bits lands 3n elements in, in the untouched zeros, so it gives a wrong row, not a crash."""
    stride = (1 << 32) + 3 * n
    try:
        storage = torch.empty((m - 1) * stride + n, dtype=dtype, device=device)
    except RuntimeError as e:  # e.g. with memory overcommit switched off
        size = ((m - 1) * stride + n) * torch.empty((), dtype=dtype).element_size()
        pytest.skip(f"cannot reserve {size >> 30} GiB of address space: {e}")
    x = storage.as_strided((m, n), (stride, 1))
    x.copy_(randn(m, n, dtype=dtype, device=device))
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_offsets_past_2_31_elements(backend, norm):
    """64-bit row offsets, forward and every gradient (weight ones included): row 1 of x lies
    2^32 + 3N elements into its storage, and the kernel reads it there."""
    dev, n = device_for(backend), 96
    x = rows_past_2_31(2, n, torch.bfloat16, dev)
    w, b = randn(n, device=dev), randn(n, device=dev)
    fns = (fusednorm.layer_norm, F.layer_norm, layer_norm_ref) if norm == "layer" else (
        fusednorm.rms_norm, F.rms_norm, rms_norm_ref)

    def call(fn):
        def run(x, w, b):
            with fusednorm.use_backend(backend):
                if norm == "layer":
                    return fn(x, (n,), w, b, 1e-5)
                return fn(x, (n,), w, 1e-5)
        return run

    inputs = (x, w, b if norm == "layer" else None)
    with row_kernel_inputs(backend) as seen:
        results = run_three(inputs, *(call(f) for f in fns))
    assert seen == [((2, n), x.stride(), x.data_ptr())], "x must reach the kernel as it is"
    assert_three(results, torch.bfloat16, ulps=ulps_for(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,ns", [((0, 8), (8,)), ((3, 0), (0,)), ((2, 0, 4), (4,))])
def test_zero_elements(backend, shape, ns):
    dev = device_for(backend)
    x = torch.randn(shape, device=dev, requires_grad=True)
    w = torch.randn(ns, device=dev, requires_grad=True)
    with fusednorm.use_backend(backend):
        y = fusednorm.layer_norm(x, ns, w, None)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("eps", [0.0, -1e-7, 1e-2])
def test_eps_not_validated_like_torch(eps):
    x = randn(4, 33)
    y = fusednorm.layer_norm(x, (33,), eps=eps)
    assert_close_to_ref(y, F.layer_norm(x, (33,), eps=eps), layer_norm_ref(x, (33,), eps=eps))
    # a constant row with eps 0 divides 0 by 0, as torch does
    const = torch.ones(2, 8)
    assert torch.equal(fusednorm.layer_norm(const, (8,), eps=0.0).isnan(),
                       F.layer_norm(const, (8,), eps=0.0).isnan())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_mean_is_stable(dtype):
    # E[x^2] - E[x]^2 would lose every digit here; the two-pass variance keeps them
    x = randn(64, 4096, dtype=dtype, mean=1e4, std=1.0)
    check(x, (4096,), randn(4096, dtype=dtype), randn(4096, dtype=dtype))


def test_nan_and_inf_rows_like_torch():
    x = torch.randn(6, 16)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    x[3, 5] = float("-inf")
    x[4] = float("inf")
    w, b = torch.randn(16), torch.randn(16)
    ours, theirs = fusednorm.layer_norm(x, (16,), w, b), F.layer_norm(x, (16,), w, b)
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert torch.equal(ours.isinf(), theirs.isinf())
    finite = theirs.isfinite()
    torch.testing.assert_close(ours[finite], theirs[finite])


# --- errors: same type and message as the installed torch -------------------------------------

def _error_of(call):
    with pytest.raises(Exception) as info:
        call()
    return type(info.value), str(info.value)


ERROR_CASES = {
    "empty normalized_shape": lambda f: f(torch.randn(2, 3), ()),
    "input shape mismatch": lambda f: f(torch.randn(2, 3, 4), (5,)),
    "input rank too small": lambda f: f(torch.randn(4), (2, 4)),
    "weight shape": lambda f: f(torch.randn(2, 4), (4,), torch.randn(3)),
    "bias shape": lambda f: f(torch.randn(2, 4), (4,), torch.randn(4), torch.randn(5)),
    "int normalized_shape": lambda f: f(torch.randn(2, 4), 4),
    "integer input": lambda f: f(torch.arange(8).view(2, 4), (4,)),
    "bool input": lambda f: f(torch.ones(2, 4, dtype=torch.bool), (4,)),
    "complex input": lambda f: f(torch.randn(2, 4, dtype=torch.complex64), (4,)),
    "double input float weight": lambda f: f(torch.randn(2, 4, dtype=torch.float64), (4,),
                                             torch.randn(4)),
    "float input double weight": lambda f: f(torch.randn(2, 4), (4,),
                                             torch.randn(4, dtype=torch.float64)),
    "float input bf16 weight": lambda f: f(torch.randn(2, 4), (4,),
                                           torch.randn(4, dtype=torch.bfloat16)),
    "weight and bias dtypes differ": lambda f: f(torch.randn(2, 4, dtype=torch.bfloat16), (4,),
                                                 torch.randn(4),
                                                 torch.randn(4, dtype=torch.bfloat16)),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_match_torch(case):
    expected = _error_of(lambda: ERROR_CASES[case](F.layer_norm))
    assert _error_of(lambda: ERROR_CASES[case](fusednorm.layer_norm)) == expected


# --- autograd --------------------------------------------------------------------------------

def test_gradcheck_and_gradgradcheck():
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return fusednorm.layer_norm(x, (2, 5), w, b)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_create_graph_matches_torch():
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, dtype=torch.float64, requires_grad=True)
    results = []
    for fn in (fusednorm.layer_norm, F.layer_norm):
        y = fn(x, (9,), w, None)
        (gx,) = torch.autograd.grad((y * y.detach().cos()).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), (x, w)))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs)


def test_backward_runs_our_kernel_not_torch_autograd():
    x = torch.randn(4, 8, requires_grad=True)
    y = fusednorm.layer_norm(x, (8,))
    assert "RowNorm" in type(y.grad_fn).__name__ or "RowNorm" in str(y.grad_fn.next_functions)


# --- bitwise guarantees ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batch_invariance_bitwise(backend, dtype):
    dev = device_for(backend)
    n = 1000
    big = randn(64, n, dtype=dtype, device=dev)
    w, b = randn(n, dtype=dtype, device=dev), randn(n, dtype=dtype, device=dev)
    with fusednorm.use_backend(backend):
        full = fusednorm.layer_norm(big, (n,), w, b)
        for rows in (slice(0, 1), slice(5, 6), slice(3, 40), slice(63, 64)):
            part = fusednorm.layer_norm(big[rows].clone(), (n,), w, b)
            assert torch.equal(part, full[rows])


@pytest.mark.parametrize("backend", determinism_backends())
def test_determinism_bitwise(backend):
    dev = device_for(backend)
    m, n = (256, 512) if backend == "cpu" else (64, 96)
    x = randn(m, n, device=dev)
    w, b, dy = randn(n, device=dev), randn(n, device=dev), randn(m, n, device=dev)
    runs = []
    for _ in range(3):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        with fusednorm.use_backend(backend):
            y = fusednorm.layer_norm(leaves[0], (n,), leaves[1], leaves[2])
        y.backward(dy)
        runs.append([y.detach()] + [t.grad for t in leaves])
    for other in runs[1:]:
        for a, b_ in zip(runs[0], other):
            assert torch.equal(a, b_)
