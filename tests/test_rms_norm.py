"""fusednorm.rms_norm against torch and the float64 reference, on the core issue's grid."""

import pytest
import torch
import torch.nn.functional as F
from helpers import BACKENDS, assert_close_to_ref, device_for, randn, ulps_for
from test_layer_norm import DTYPES, GRID

import fusednorm
from fusednorm.reference import rms_norm_ref


def check(x, normalized_shape, weight=None, eps=None, backend="cpu"):
    dy = randn(*x.shape, dtype=x.dtype, device=x.device)
    outs = []
    for who in ("ours", "torch", "ref"):
        xl = x.detach().clone().double() if who == "ref" else x.detach().clone()
        wl = None if weight is None else weight.detach().clone()
        if who == "ref" and wl is not None:
            wl = wl.double()
        leaves = [t.requires_grad_() for t in (xl, wl) if t is not None]
        if who == "ours":
            with fusednorm.use_backend(backend):
                y = fusednorm.rms_norm(xl, normalized_shape, wl, eps)
        elif who == "torch":
            y = F.rms_norm(xl, normalized_shape, wl, eps)
        else:
            y = rms_norm_ref(xl, normalized_shape, wl, eps if eps is not None else
                             fusednorm.reference.default_rms_eps(x.dtype))
        y.backward(dy.to(y.dtype))
        outs.append([y.detach()] + [t.grad for t in leaves])
    assert outs[0][0].dtype == outs[1][0].dtype
    for name, a, b, r in zip(("y", "dx", "dweight"), *outs):
        assert a.dtype == b.dtype, name
        assert_close_to_ref(a, b, r, dtype=x.dtype, what=name, ulps=ulps_for(backend))


# The grid's sizes in float32 and bfloat16: float16 and float64 take the same Python path, and
# the kernel grid of test_cpu_kernels.py runs RMSNorm in every dtype at these sizes.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,n", GRID)
def test_grid_cpu(m, n, dtype):
    check(randn(m, n, dtype=dtype), (n,), randn(n, dtype=dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight", [True, False])
@pytest.mark.parametrize("eps", [None, 1e-6])
def test_dtypes_weight_eps(backend, dtype, weight, eps):
    dev = device_for(backend)
    x = randn(37, 123, dtype=dtype, device=dev)
    check(x, (123,), randn(123, dtype=dtype, device=dev) if weight else None, eps, backend)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_of_another_dtype_like_torch(xdtype, wdtype):
    check(randn(9, 64, dtype=xdtype), (64,), randn(64, dtype=wdtype))


@pytest.mark.parametrize("shape,ns", [((4, 2, 2, 5), (2, 2, 5)), ((5, 123, 123), (123,))])
def test_ranks_and_strides(shape, ns):
    check(randn(*shape), ns, randn(*ns))
    check(randn(shape[1], shape[0], *shape[2:]).transpose(0, 1), ns, randn(*ns))


ERROR_CASES = {
    "empty normalized_shape": lambda f: f(torch.randn(2, 3), ()),
    "input shape mismatch": lambda f: f(torch.randn(2, 3), (4,)),
    "weight shape": lambda f: f(torch.randn(2, 3), (3,), torch.randn(2)),
    "int normalized_shape": lambda f: f(torch.randn(2, 3), 3),
    "integer input": lambda f: f(torch.arange(6).view(2, 3), (3,)),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_match_torch(case):
    def error(fn):
        with pytest.raises(Exception) as info:
            ERROR_CASES[case](fn)
        return type(info.value), str(info.value)

    assert error(fusednorm.rms_norm) == error(F.rms_norm)


def test_gradcheck_and_gradgradcheck():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)

    def f(x, w):
        return fusednorm.rms_norm(x, (7,), w, 1e-6)

    assert torch.autograd.gradcheck(f, (x, w))
    assert torch.autograd.gradgradcheck(f, (x, w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_invariance_bitwise(backend):
    dev = device_for(backend)
    big, w = randn(48, 777, device=dev), randn(777, device=dev)
    with fusednorm.use_backend(backend):
        full = fusednorm.rms_norm(big, (777,), w)
        for rows in (slice(0, 1), slice(7, 30)):
            assert torch.equal(fusednorm.rms_norm(big[rows].clone(), (777,), w), full[rows])
