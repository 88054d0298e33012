"""The Triton row-norm kernels (fusednorm/triton/layer_norm.py) called directly, against the
float64 reference and torch's own ops (the tolerance rule of helpers.py).

In CI the kernels run in Triton's interpreter on CPU tensors, which is slow, so the shapes are
small and awkward instead of large: N = 1, 7 and 100 (not powers of two), M = 5 or 37 (not a
multiple of the rows a program packs). The paths for wide rows are forced on these shapes by
lowering the block-size constants (the `path` fixture); the real sizes, 1M-element rows and
tensors over 2^31 elements run with FUSEDNORM_GPU=1 only (scripts/gpu_check.sh).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    GPU,
    assert_close_to_ref,
    device_for,
    gpu_only_determinism,
    randn,
    reference_keep_mask,
    ulps_for,
)

from fusednorm.reference import add_norm_ref, layer_norm_ref, rms_norm_ref

T = pytest.importorskip("fusednorm.triton.layer_norm")

DEV = device_for("triton")
ULPS = ulps_for("triton")  # the interpreter truncates to bfloat16
HALF = (torch.float16, torch.bfloat16)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
PARAMS = ["none", "w", "wb", "b"]  # which of weight and bias are present


def _use_path(name, monkeypatch):
    if name != "fused":
        for const in ("FWD_FUSED_MAX", "FWD_CHUNK", "BWD_FUSED_MAX", "BWD_CHUNK"):
            monkeypatch.setattr(T, const, 16)
    if name == "split_sync":
        monkeypatch.setattr(T, "sync_flags", lambda device, k: (True, True))
    return name


@pytest.fixture(params=["fused", "split"])
def path(request, monkeypatch):
    """Run the test on the in-register path and on the split path (rows in chunks of 16; the
    interpreter runs its leader variant, which needs no waiting: programs run in order)."""
    return _use_path(request.param, monkeypatch)


@pytest.fixture(params=["fused", "split", "split_sync"])
def any_path(request, monkeypatch):
    """`path`, and split_sync: the leader variant with what a GPU adds to it, tickets taken in
    start order, release/acquire counters and waits (a GPU runs them on either split path)."""
    return _use_path(request.param, monkeypatch)


def _torch_add_norm(x, r, keep, p, is_rms, w, b, eps, zero_centered, h_dtype):
    """torch's own ops at their best (float32 compute, or float64), differentiable: the error
    budget of the tolerance rule. Returns (y, h) with h rounded to h_dtype, as the kernels do."""
    ct = torch.promote_types(x.dtype, torch.float32)
    xin = x.to(ct)
    if p > 0:
        xin = xin * keep.to(ct) / (1 - p)
    h = xin if r is None else r.to(ct) + xin
    h = h.to(h_dtype)
    w_eff = None if w is None else (w.to(ct) + 1 if zero_centered else w.to(ct))
    n = x.shape[-1]
    if is_rms:
        y = F.rms_norm(h.to(ct), (n,), w_eff, eps)
    else:
        y = F.layer_norm(h.to(ct), (n,), w_eff, None if b is None else b.to(ct), eps)
    return y, h


def _ref_add_norm(x, r, keep, p, is_rms, w, b, eps, zero_centered, stored_h=None):
    """float64 (y, h): h exact; y the norm of h as the kernel stored it (`stored_h`, rounded to
    its dtype and itself checked against h), the rounding passing gradients through."""
    def norm(h):
        if stored_h is not None:
            h = h + (stored_h.double() - h).detach()
        if is_rms:  # the reference RMSNorm has no bias; none of our RMS cases pass one
            return rms_norm_ref(h, (h.shape[-1],), w, eps, zero_centered)
        return layer_norm_ref(h, (h.shape[-1],), w, b, eps, zero_centered)
    return add_norm_ref(x, r, keep, p, norm)


def check(M=5, N=100, dtype=torch.float32, is_rms=False, params="wb", param_dtype=None,
          residual=False, residual_dtype=None, p=0.0, zero_centered=False, out_dtype=None,
          from_output=False, dh_out=False, need_weight_grad=True, x_rows=None, seed=1234,
          eps=1e-5, backward=True):
    """One forward and backward of our kernels against torch and the reference; returns ours."""
    param_dtype = param_dtype or dtype
    out_dtype = out_dtype or dtype
    x = randn(M, N, dtype=dtype, device=DEV) if x_rows is None else x_rows
    r = randn(M, N, dtype=residual_dtype or dtype, device=DEV) if residual else None
    h_dtype = residual_dtype or (r.dtype if residual else dtype)
    # weights away from 0: from_output divides by them
    w = (randn(N, dtype=param_dtype, device=DEV, std=0.3) + 1) if "w" in params else None
    b = randn(N, dtype=param_dtype, device=DEV) if "b" in params else None
    keep = reference_keep_mask(seed, M, N, p).to(DEV) if p > 0 else None

    y, h, mean, rstd = T.norm_fwd(x, w, b, r, eps, is_rms, zero_centered, p, seed, out_dtype,
                                  residual_dtype if (residual or p > 0) else None)
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.dtype == out_dtype and y.shape == (M, N) and y.is_contiguous()
    assert rstd.dtype == stats and rstd.shape == (M,)
    assert mean.shape == ((0,) if is_rms else (M,))
    with_h = residual or p > 0
    assert h.shape == ((M, N) if with_h else (0,))

    # h against the reference's residual + dropout(x), with the same keep mask; y and the
    # statistics are the norm of the h we return, rounded to its dtype (the contract): the
    # reference and torch both start from that h
    leaves64 = [None if t is None else t.detach().double().requires_grad_() for t in (x, r, w, b)]
    y64, h64 = _ref_add_norm(*leaves64[:2], keep, p, is_rms, *leaves64[2:], eps, zero_centered,
                             stored_h=h if with_h else None)
    leaves_t = [None if t is None else t.detach().clone().requires_grad_() for t in (x, r, w, b)]
    yt, ht = _torch_add_norm(leaves_t[0], leaves_t[1], keep, p, is_rms, *leaves_t[2:], eps,
                             zero_centered, h_dtype)
    if with_h:
        assert h.dtype == h_dtype
        assert_close_to_ref(h, ht, h64, what="h", ulps=ULPS)
    xin = h if with_h else x
    torch_in = _torch_add_norm(xin, None, None, 0.0, is_rms, w, b, eps, zero_centered,
                               xin.dtype)[0]
    assert_close_to_ref(y, torch_in.to(out_dtype), y64.detach(), what="y", ulps=ULPS)
    x64, xct = xin.double(), xin.to(stats)
    if is_rms:
        ms64, mst = x64.pow(2).mean(1), xct.pow(2).mean(1)
    else:
        (ms64, mu64), (mst, mut) = torch.var_mean(x64, 1, correction=0), torch.var_mean(
            xct, 1, correction=0)
        assert_close_to_ref(mean, mut, mu64, what="mean")
    assert_close_to_ref(rstd, (mst + eps).rsqrt(), (ms64 + eps).rsqrt(), what="rstd")
    if not backward:
        return y, h, mean, rstd

    dy = randn(M, N, dtype=out_dtype, device=DEV)
    dho = randn(M, N, dtype=h_dtype, device=DEV) if dh_out else None
    saved = y if from_output else (h if with_h else x)
    dx, dres, dw, db = T.norm_bwd(dy, saved, w, b, mean, rstd, dho, eps, is_rms, zero_centered,
                                  p, seed, residual, dtype, residual_dtype if with_h else None,
                                  need_weight_grad, from_output)
    for yy, hh in ((y64, h64), (yt, ht)):
        loss = (yy * dy.to(yy.dtype)).sum()
        if dh_out:
            loss = loss + (hh * dho.to(hh.dtype)).sum()
        loss.backward()
    # from the output, x̂ is recomputed from y rounded to its dtype: the gradients of a half y
    # carry that rounding, which no float64 reference of the maths has
    grad_ulps = None if from_output and out_dtype in HALF else ULPS
    assert dx.dtype == dtype and dx.shape == (M, N)
    assert_close_to_ref(dx, leaves_t[0].grad.to(dtype), leaves64[0].grad, what="dx",
                        ulps=grad_ulps)
    if residual:
        assert dres.dtype == h_dtype
        assert_close_to_ref(dres, leaves_t[1].grad.to(h_dtype), leaves64[1].grad, what="dres",
                            ulps=grad_ulps)
    else:
        assert dres.numel() == 0
    for name, ours, i in (("dw", dw, 2), ("db", db, 3)):
        if leaves64[i] is None or not need_weight_grad:
            assert ours is None, name
        else:
            assert ours.dtype == param_dtype and ours.shape == (N,)
            assert_close_to_ref(ours, leaves_t[i].grad.to(param_dtype), leaves64[i].grad,
                                what=name, ulps=grad_ulps)
    return dx, dres, dw, db


# --- values and gradients --------------------------------------------------------------------


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("is_rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_and_params(dtype, is_rms, params):
    if is_rms and "b" in params:
        pytest.skip("RMSNorm has no bias")
    check(M=37, N=100, dtype=dtype, is_rms=is_rms, params=params)


@pytest.mark.parametrize("is_rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_float32_params_with_half_input(dtype, is_rms):
    check(dtype=dtype, is_rms=is_rms, params="w" if is_rms else "wb", param_dtype=torch.float32)


@pytest.mark.parametrize("N", [1, 7, 100, 256], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("is_rms", [False, True], ids=["ln", "rms"])
def test_shapes_on_both_paths(any_path, is_rms, N):
    # split: N = 100 is 7 chunks of 16 (the last one of 4); 256 is exactly 16 full chunks
    check(M=5, N=N, dtype=torch.float32, is_rms=is_rms, params="w" if is_rms else "wb")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("is_rms", [False, True], ids=["ln", "rms"])
def test_residual_dropout_dh_out(any_path, is_rms, dtype):
    # float64 checks that eps and 1/(1 - p) reach the kernel in full precision
    check(M=5, N=100, dtype=dtype, is_rms=is_rms, params="w" if is_rms else "wb",
          residual=True, p=0.3, dh_out=True)


@pytest.mark.parametrize("residual_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_residual_in_its_own_dtype(residual_dtype):
    # prenorm residual stream kept in float32 beside bfloat16 activations, and the plain case
    check(dtype=torch.bfloat16, residual=True, residual_dtype=residual_dtype,
          param_dtype=torch.float32)


@pytest.mark.parametrize("with_residual", [False, True], ids=["dropout", "residual+dropout"])
def test_dropout_alone(path, with_residual):
    check(M=5, N=100, residual=with_residual, p=0.5)


@pytest.mark.parametrize("is_rms", [False, True], ids=["ln", "rms"])
def test_zero_centered_weight(path, is_rms):
    check(M=5, N=100, dtype=torch.bfloat16, is_rms=is_rms, params="w" if is_rms else "wb",
          param_dtype=torch.float32, zero_centered=True)


# x̂ from the output: y itself, or (y - b) / w; every parameter set in float32, and a bfloat16 y
# (rounded before x̂ is recovered from it) with all of a norm's parameters
FROM_OUTPUT = [(False, "none", torch.float32), (False, "w", torch.float32),
               (False, "wb", torch.float32), (True, "none", torch.float32),
               (True, "w", torch.float32), (False, "wb", torch.bfloat16),
               (True, "w", torch.bfloat16)]


@pytest.mark.parametrize("is_rms,params,dtype", FROM_OUTPUT,
                         ids=lambda v: {False: "ln", True: "rms"}.get(v, str(v)))
def test_from_output(path, is_rms, params, dtype):
    check(M=5, N=100, dtype=dtype, is_rms=is_rms, params=params, from_output=True)


def test_from_output_zero_centered_with_residual_and_dropout():
    check(residual=True, zero_centered=True, from_output=True, dh_out=True, p=0.3)


def test_no_weight_grad():
    check(need_weight_grad=False)


def test_out_dtype_differs_from_input():
    check(dtype=torch.bfloat16, out_dtype=torch.float32, param_dtype=torch.float32)


def test_xhat_rounded_before_weight():
    """Llama's cast order: x̂ rounded to bfloat16, then times the float32 weight in float32."""
    M, N = 5, 100
    x = randn(M, N, dtype=torch.bfloat16, device=DEV)
    ones = torch.ones(N, device=DEV)
    y = T.norm_fwd(x, ones, None, None, 1e-6, True, False, 0.0, 0, torch.float32, None,
                   xhat_dtype=torch.bfloat16)[0]
    # with a unit weight the float32 output holds exactly bfloat16 values ...
    assert torch.equal(y, y.to(torch.bfloat16).float())
    # ... which are x̂ rounded; with a random weight, the float32 product of those
    w = randn(N, device=DEV)
    yw = T.norm_fwd(x, w, None, None, 1e-6, True, False, 0.0, 0, torch.float32, None,
                    xhat_dtype=torch.bfloat16)[0]
    assert torch.equal(yw, y * w)
    # one bfloat16 ulp (2^-7 relative): Triton's interpreter truncates float32 to bfloat16
    ref = rms_norm_ref(x, (N,), None, 1e-6).cpu()
    assert (y.double().cpu() - ref).abs().max() <= 2**-7 * ref.abs().max()


# --- layouts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["padded_rows", "row_stride_0"])
def test_strided_rows_read_in_place(path, layout):
    M, N = 5, 100
    if layout == "padded_rows":
        base = randn(M, N + 28, device=DEV)
        x = base[:, 3 : N + 3]  # row stride 128
    else:
        x = randn(1, N, device=DEV).expand(M, N)  # row stride 0
    assert x.stride() != (N, 1)
    check(M=M, N=N, x_rows=x, residual=True, dh_out=True)


def test_strided_gradients():
    M, N = 5, 100
    x, r, w = randn(M, N, device=DEV), randn(M, N, device=DEV), randn(N, device=DEV)
    _, h, mean, rstd = T.norm_fwd(x, w, None, r, 1e-5, True, False, 0.0, 0, torch.float32,
                                  torch.float32)
    dy, dho = randn(M, 2 * N, device=DEV), randn(M, 3 * N, device=DEV)
    dense = T.norm_bwd(dy[:, :N].contiguous(), h, w, None, mean, rstd,
                       dho[:, N : 2 * N].contiguous(), 1e-5, True, False, 0.0, 0, True,
                       torch.float32, torch.float32, True)
    strided = T.norm_bwd(dy[:, :N], h, w, None, mean, rstd, dho[:, N : 2 * N], 1e-5, True,
                         False, 0.0, 0, True, torch.float32, torch.float32, True)
    for a, b in zip(dense, strided):
        assert (a is None and b is None) or torch.equal(a, b)


# --- edge cases --------------------------------------------------------------------------------


@pytest.mark.parametrize("is_rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("M, N", [(0, 8), (3, 0)])
def test_zero_size(M, N, is_rms):
    x, w, b = randn(M, N, device=DEV), randn(N, device=DEV), randn(N, device=DEV)
    y, h, mean, rstd = T.norm_fwd(x, w, b, x, 1e-5, is_rms, False, 0.0, 0, torch.float32,
                                  torch.float32)
    assert y.shape == (M, N) and h.shape == (M, N) and rstd.shape == (M,)
    # torch's statistics of empty rows: mean 0, rstd NaN
    _, tmean, trstd = torch.native_layer_norm(x.cpu(), [N], None, None, 1e-5)
    assert torch.equal(rstd.cpu().isnan(), trstd.view(-1).isnan())
    if not is_rms:
        assert torch.equal(mean.cpu(), tmean.view(-1))
    dx, dres, dw, db = T.norm_bwd(x, h, w, b, mean, rstd, None, 1e-5, is_rms, False, 0.0, 0,
                                  True, torch.float32, torch.float32, True)
    assert dx.shape == (M, N) and dres.shape == (M, N)
    # no rows: the weight gradients are sums over nothing
    assert torch.equal(dw.cpu(), torch.zeros(N)) and torch.equal(db.cpu(), torch.zeros(N))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, in the interpreter
def test_nan_and_inf_propagate_like_torch(path):
    M, N = 4, 100
    x = randn(M, N, device=DEV)
    x[1, 7], x[2, 50] = float("inf"), float("nan")
    for is_rms in (False, True):
        y = T.norm_fwd(x, None, None, None, 1e-5, is_rms, False, 0.0, 0, torch.float32, None)[0]
        yt = F.rms_norm(x, (N,), eps=1e-5) if is_rms else F.layer_norm(x, (N,), eps=1e-5)
        assert torch.equal(y.isnan(), yt.isnan()) and torch.isfinite(y[[0, 3]]).all()


def test_large_mean_rows_keep_precision(path):
    # a row mean of 1e4 with unit spread: E[x²] - E[x]² would lose every digit in float32
    check(M=5, N=100, params="none", x_rows=randn(5, 100, device=DEV, mean=1e4), backward=False)


def test_wide_rows_with_default_blocks():
    """N above FWD_FUSED_MAX with the real constants: the split paths as shipped (2 chunks
    forward, 11 backward)."""
    check(M=2, N=T.FWD_FUSED_MAX + 3000, dtype=torch.bfloat16, param_dtype=torch.float32)


# --- dropout mask ------------------------------------------------------------------------------


def test_keep_mask():
    M, N, p = 40, 100, 0.3
    keep = T.dropout_keep_mask(7, M, N, p, DEV)
    assert keep.dtype == torch.bool and keep.shape == (M, N)
    # binomial(4000, 0.7): the standard deviation is 29 elements, these bounds are 10 of them
    assert abs(keep.sum().item() - (1 - p) * M * N) < 290
    assert torch.equal(keep, T.dropout_keep_mask(7, M, N, p, DEV))
    assert not torch.equal(keep, T.dropout_keep_mask(8, M, N, p, DEV))
    # element (i, j) depends on i·N + j only: the same counters in a different shape
    assert torch.equal(keep.reshape(-1), T.dropout_keep_mask(7, 1, M * N, p, DEV).view(-1))


@pytest.mark.parametrize("seed", [0, 2**32 + 5, 2**64 - 1])
def test_keep_mask_matches_cpu_backend(seed):
    """Both backends draw Philox-4x32-10 on counter i·N + j, so masks agree across devices."""
    cpu = pytest.importorskip("fusednorm.cpu.layer_norm")
    ours = T.dropout_keep_mask(seed, 9, 70, 0.4, DEV).cpu()
    assert torch.equal(ours, cpu.dropout_keep_mask(seed, 9, 70, 0.4, "cpu"))


# --- batch invariance and determinism ------------------------------------------------------------


@pytest.mark.parametrize("is_rms", [False, True], ids=["ln", "rms"])
def test_forward_is_batch_invariant(path, is_rms):
    """A row's output does not depend on M or on where the row sits: bitwise."""
    M, N = 37, 40
    x, r = randn(M, N, device=DEV), randn(M, N, device=DEV)
    w, b = randn(N, device=DEV), randn(N, device=DEV)
    bias = None if is_rms else b

    def fwd(sl):
        return T.norm_fwd(x[sl], w, bias, r[sl], 1e-5, is_rms, False, 0.0, 0, torch.bfloat16,
                          torch.float32)

    full = fwd(slice(None))
    for sl in (slice(5, 6), slice(3, 20), slice(36, 37)):
        part = fwd(sl)
        for a, b_ in zip(full, part):
            assert a.numel() == 0 or torch.equal(a[sl], b_)


@gpu_only_determinism
@pytest.mark.parametrize("blocking", ["default", "one_block", "many_blocks"])
def test_backward_is_deterministic(any_path, monkeypatch, blocking):
    """Bitwise repeatable dx/dweight/dbias for each row blocking: one block of every row (which
    writes the gradients itself), and more partial rows (20) than the final sum reads at once
    (16)."""
    if blocking == "one_block":
        monkeypatch.setattr(T, "TARGET_PROGRAMS", 1)
    elif blocking == "many_blocks":
        monkeypatch.setattr(T, "PARTIAL_SHARE", 1e9)
        monkeypatch.setattr(importlib.import_module("fusednorm.triton._launch"), "SUM_ROWS", 16)
        monkeypatch.setattr(T, "BWD_TILE", 1)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(check(M=20, N=40, residual=True, dh_out=True))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_bwd_grid_depends_on_m_n_and_dtypes_only():
    cfg = T._bwd_config(256)
    g, per = T._bwd_grid(4096, cfg, 54)
    assert g * per >= 4096 and (g - 1) * per < 4096 and per % cfg.rows == 0
    assert per >= 54  # blocks long enough for the partial rows to stay small ...
    assert T._bwd_grid(64, cfg, 54) == (1, 64)  # ... so few rows make one block
    wide = T._bwd_config(1 << 18)
    assert wide.k == T.MAX_CHUNKS and T._bwd_grid(64, wide, 54)[0] == 1
    # bfloat16 dy, x and dx with float32 dweight and dbias partial rows: 54 rows per block
    assert T._min_rows(16, 6) == 54 and T._min_rows(0, 6) == 1


# --- GPU only: sizes the interpreter cannot run ---------------------------------------------------

gpu_only = pytest.mark.skipif(not GPU, reason="needs FUSEDNORM_GPU=1 and a CUDA device")


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N", [256, 4096, 8192, 16384, 65536, 1 << 20], ids=lambda n: f"N{n}")
def test_gpu_real_sizes(N, dtype):
    check(M=max(2, (1 << 21) // N), N=N, dtype=dtype, param_dtype=torch.float32,
          residual=True, p=0.1)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("N", [3000, 16384, 65536, 1 << 20], ids=lambda n: f"N{n}")
def test_gpu_cooperative_equals_leader(monkeypatch, N, dtype):
    """A GPU's split rows (chunks that publish their sums and wait for each other) give the same
    bits as the leader path, which is what the interpreter runs in CI; forward and backward,
    with the residual, dropout, h's gradient and several row blocks."""
    launch = importlib.import_module("fusednorm.triton._launch")
    M = min(256, max(2, (1 << 22) // N))
    x, r, dy, dho = (randn(M, N, dtype=dtype, device=DEV) for _ in range(4))
    w, b = randn(N, device=DEV), randn(N, device=DEV)

    def run():
        y, h, mean, rstd = T.norm_fwd(x, w, b, r, 1e-5, False, False, 0.1, 3, dtype, dtype)
        return (y, h, mean, rstd) + T.norm_bwd(dy, h, w, b, mean, rstd, dho, 1e-5, False, False,
                                              0.1, 3, True, dtype, dtype, True)

    assert T._bwd_config(N).split and launch.sync_flags(x.device, T._bwd_config(N).k)[1]
    cooperative = run()
    monkeypatch.setattr(launch, "COOPERATE", False)
    leader = run()
    for a, b_ in zip(cooperative, leader):
        assert torch.equal(a, b_)


@gpu_only
@pytest.mark.parametrize("N", [16384, 65536], ids=["fused", "split"])
def test_gpu_over_2_31_elements(N):
    """64-bit offsets: the last rows of a tensor just over 2^31 elements are right."""
    M = (1 << 31) // N + 1
    if torch.cuda.get_device_properties(0).total_memory < 40 << 30:
        pytest.skip("needs 40 GiB of GPU memory")
    x = torch.randn(M, N, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(N, device="cuda")
    y, _, mean, rstd = T.norm_fwd(x, w, None, None, 1e-5, False, False, 0.0, 0, torch.bfloat16,
                                  None)
    tail = slice(M - 2, M)
    yt = F.layer_norm(x[tail].float(), (N,), w, None, 1e-5)
    assert_close_to_ref(y[tail], yt.to(torch.bfloat16), layer_norm_ref(x[tail], (N,), w))
    dy = torch.randn_like(x)
    dx = T.norm_bwd(dy, x, w, None, mean, rstd, None, 1e-5, False, False, 0.0, 0, False,
                    torch.bfloat16, None, False)[0]
    xt = x[tail].float().requires_grad_()
    F.layer_norm(xt, (N,), w, None, 1e-5).backward(dy[tail].float())
    x64 = x[tail].double().requires_grad_()
    layer_norm_ref(x64, (N,), w).backward(dy[tail].double())
    assert_close_to_ref(dx[tail], xt.grad.to(torch.bfloat16), x64.grad)


@gpu_only
@pytest.mark.skipif(GPU and torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_launches_on_the_input_device():
    x = torch.randn(64, 4096, device="cuda:1")
    y = T.norm_fwd(x, None, None, None, 1e-5, False, False, 0.0, 0, torch.float32, None)[0]
    assert y.device == x.device
    torch.testing.assert_close(y, F.layer_norm(x, (4096,), eps=1e-5))


@gpu_only
@pytest.mark.parametrize("N", [1000, 20000], ids=["fused", "split"])
def test_gpu_cuda_graph_capture(N):
    """No host sync, allocation outside the pool or autotuning in the launch path: a captured
    forward + backward replays what eager computes, on new data."""
    M = 8
    x, r, w, b, dy = (randn(*s, device=DEV) for s in ((M, N), (M, N), (N,), (N,), (M, N)))

    def step():
        y, h, mean, rstd = T.norm_fwd(x, w, b, r, 1e-5, False, False, 0.0, 0, torch.float32,
                                      torch.float32)
        return (y, h) + T.norm_bwd(dy, h, w, b, mean, rstd, None, 1e-5, False, False, 0.0, 0,
                                   True, torch.float32, torch.float32, True)

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for t in (x, r, dy):
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    for a, b_ in zip(captured, step()):
        assert torch.equal(a, b_)
