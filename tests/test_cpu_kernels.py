"""The numba row-norm kernels called directly (cpu/layer_norm.py's norm_fwd, norm_bwd and
dropout_keep_mask), and the half-precision conversions they rely on (cpu/kernels/_dtypes.py).

Every value is checked against the float64 reference (forward) or torch's autograd through it
(gradients), with the tolerance rule of helpers.py: torch's own error on the same inputs, in the
same dtypes, sets the bar. Kernel-level tests reach what the Python layer hides: statistics,
h, from_output, dh_out, strided rows, dtype mixes and bitwise properties.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    ROUNDED_ULPS,
    THREAD_COUNTS,
    assert_close_to_ref,
    kernel_threads,
    philox4x32_10,
    randn,
    reference_keep_mask,
)

from fusednorm.cpu import _launch
from fusednorm.cpu import layer_norm as ln
from fusednorm.cpu.kernels import _dtypes
from fusednorm.cpu.layer_norm import dropout_keep_mask, norm_bwd, norm_fwd
from fusednorm.reference import add_norm_ref, layer_norm_ref, rms_norm_ref

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HALF = [torch.float16, torch.bfloat16]
EPS = 1e-5
# torch warns when it mixes half inputs with float32 parameters; that is the case under test
pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")

# --- conversions: bit-exact with torch's casts ----------------------------------------------------


# Half storage as the kernels see it: bfloat16 bits in uint16 arrays, float16 bits in int16.
STORAGE = {torch.bfloat16: np.uint16, torch.float16: np.int16}


@numba.njit
def _to_float(bits, out):
    for i in range(bits.size):
        out[i] = _dtypes.load(bits, i)


@numba.njit
def _to_bits(values, out):
    for i in range(values.size):
        _dtypes.store(out, i, values[i])


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_to_float_every_bit_pattern(dtype):
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    expected = bits.view(dtype).float()
    out = np.empty(bits.numel(), np.float32)
    _to_float(bits.numpy().view(STORAGE[dtype]), out)
    got = torch.from_numpy(out)
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan)
    # bitwise: subnormals, signed zeros and infinities included
    assert torch.equal(got.view(torch.int32)[~nan], expected.view(torch.int32)[~nan])


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_float_to_half_rounds_like_torch(dtype):
    g = torch.Generator().manual_seed(1)
    random_bits = torch.randint(-(1 << 31), 1 << 31, (1 << 20,), generator=g, dtype=torch.int64)
    values = [random_bits.to(torch.int32).view(torch.float32)]
    # every half value, and the midpoints between neighbours (ties to even) and just around them
    halves = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    halves = halves[halves.isfinite()].float().unique()
    mids = (halves[:-1].double() + halves[1:].double()) / 2
    for m in (mids, torch.nextafter(mids, mids - 1), torch.nextafter(mids, mids + 1)):
        values.append(m.float())
    edges = [0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e-8, 2.98e-8, 5.97e-8, 3.4e38]
    edges += [float("inf"), -float("inf"), float("nan"), 1e-45, -1e-45]
    values.append(torch.tensor(edges))
    x = torch.cat(values)
    out = np.empty(x.numel(), STORAGE[dtype])
    _to_bits(x.numpy(), out)
    got = torch.from_numpy(out.view(np.int16)).view(dtype)
    expected = x.to(dtype)
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got.view(torch.int16)[~nan], expected.view(torch.int16)[~nan])


# --- the three computations compared: ours, torch's, and the float64 reference ------------------


def ours(x, w, b, *, rms, residual=None, p=0.0, seed=0, zc=False, out_dtype=None,
         residual_dtype=None, xhat=None, dy=None, dh_out=None, from_output=False):  # fmt: skip
    y, h, mean, rstd = norm_fwd(
        x, w, b, residual, EPS, rms, zc, p, seed, out_dtype or x.dtype, residual_dtype, xhat
    )
    out = {"y": y, "h": h, "mean": mean, "rstd": rstd}
    if dy is not None:
        saved = y if from_output else (h if h.numel() else x)
        dx, dr, dw, db = norm_bwd(
            dy, saved, w, b, mean, rstd, dh_out, EPS, rms, zc, p, seed, residual is not None,
            x.dtype, residual_dtype, True, from_output,
        )  # fmt: skip
        out.update(dx=dx, dr=dr if residual is not None else None, dw=dw, db=db)
    return out


def _leaves(tensors, double=False):
    out = []
    for t in tensors:
        if t is not None:
            t = t.detach().clone()
            t = (t.double() if double else t).requires_grad_()
        out.append(t)
    return out


def _grads(y, h, leaves, dy, dh_out):
    if dy is None:
        return {}
    loss = (y * dy.to(y.dtype)).sum()
    if dh_out is not None:
        loss = loss + (h * dh_out.to(h.dtype)).sum()
    live = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(loss, live))
    g = [next(grads) if t is not None else None for t in leaves]
    return {"dx": g[0], "dr": g[1], "dw": g[2], "db": g[3]}


def reference(x, w, b, *, rms, residual=None, mask=None, p=0.0, zc=False, dy=None, dh_out=None,
              stored_h=None):  # fmt: skip
    """float64 values and gradients through reference.py. h is exact; the norm is taken of h as
    the kernel stored it (`stored_h`, rounded to its dtype, and itself checked against the exact
    h), as the contract says, the rounding passing gradients through."""
    n = x.shape[-1]
    leaves = _leaves([x, residual, w, b], double=True)
    xl, rl, wl, bl = leaves
    _, h = add_norm_ref(xl, rl, mask, p, lambda h: h)
    hn = h if stored_h is None else h + (stored_h.double() - h).detach()
    if rms:
        y = rms_norm_ref(hn, (n,), wl, EPS, zero_centered=zc)
        mean = None
        rstd = 1 / torch.sqrt((hn * hn).mean(-1) + EPS)
    else:
        y = layer_norm_ref(hn, (n,), wl, bl, EPS, zero_centered=zc)
        mean = hn.mean(-1)
        rstd = 1 / torch.sqrt(((hn - mean[:, None]) ** 2).mean(-1) + EPS)
    out = {"y": y, "h": h, "mean": mean, "rstd": rstd}
    out.update(_grads(y, h, leaves, dy, dh_out))
    return {k: v.detach() if v is not None else None for k, v in out.items()}


def theirs(x, w, b, *, rms, residual=None, mask=None, p=0.0, zc=False, out_dtype=None,
           residual_dtype=None, dy=None, dh_out=None):  # fmt: skip
    """What a torch user computes for the same thing, in the same storage dtypes: h in the
    residual's dtype; y in h's dtype, or in float32 where ours computes a wider output or Gemma's
    (1 + w) (a comparator in bfloat16 would let a kernel that rounds to bfloat16 pass)."""
    n = x.shape[-1]
    leaves = _leaves([x, residual, w, b])
    xl, rl, wl, bl = leaves
    out_dtype = out_dtype or x.dtype
    h = xl
    if p > 0 or rl is not None:
        h = h.to(residual_dtype or x.dtype)
    if p > 0:
        h = h * mask.to(h.dtype) / (1 - p)
    if rl is not None:
        h = rl.to(h.dtype) + h
    wide = zc or torch.promote_types(h.dtype, out_dtype) != h.dtype
    hc = h.float() if wide and h.dtype in HALF else h
    wc, bc = ((t.to(hc.dtype) if t is not None and wide else t) for t in (wl, bl))
    if zc:  # Gemma: the norm without weight, times (1 + w) in float32
        base = F.rms_norm(hc, (n,), None, EPS) if rms else F.layer_norm(hc, (n,), None, None, EPS)
        y = base * (1 + wc)
        y = y + bc if bc is not None else y
    elif rms:
        y = F.rms_norm(hc, (n,), wc, EPS)
    else:
        y = F.layer_norm(hc, (n,), wc, bc, EPS)
    y = y.to(out_dtype)
    hs = h.detach().float() if h.dtype != torch.float64 else h.detach()
    if rms:
        mean, rstd = None, torch.rsqrt((hs * hs).mean(-1) + EPS)
    else:
        _, mean, rstd = torch.native_layer_norm(hs, (n,), None, None, EPS)
        mean, rstd = mean.squeeze(-1), rstd.squeeze(-1)
    out = {"y": y.detach(), "h": h.detach(), "mean": mean, "rstd": rstd}
    out.update(_grads(y, h, leaves, dy, dh_out))
    return out


GRADS = ("dx", "dr", "dw", "db")


def compare(got, torch_out, ref, keys=("y", "h", "mean", "rstd") + GRADS, grad_ulps=ROUNDED_ULPS):
    for k in keys:
        if ref.get(k) is None or k not in got or (k == "h" and got[k].numel() == 0):
            continue
        assert got[k] is not None, k
        assert_close_to_ref(got[k], torch_out[k], ref[k], what=k,
                            ulps=grad_ulps if k in GRADS else ROUNDED_ULPS)


def check(x, w=None, b=None, *, rms, grads=True, **kw):
    """Run the three on the same inputs and compare, forward and backward."""
    dy = randn(*x.shape, dtype=kw.get("out_dtype") or x.dtype) if grads else None
    mask = kw.pop("mask", None)
    got = ours(x, w, b, rms=rms, dy=dy, **kw)
    ref_kw = {k: kw[k] for k in ("residual", "p", "zc", "dh_out") if k in kw}
    ref = reference(x, w, b, rms=rms, mask=mask, dy=dy, **ref_kw,
                    stored_h=got["h"] if got["h"].numel() else None)
    torch_kw = {k: kw[k] for k in ("out_dtype", "residual_dtype") if k in kw}
    torch_out = theirs(x, w, b, rms=rms, mask=mask, dy=dy, **ref_kw, **torch_kw)
    # From the output, x̂ is recomputed from y rounded to its dtype: the gradients of a half y
    # carry that rounding, which no float64 reference of the maths has.
    half_from_output = kw.get("from_output") and got["y"].dtype in HALF
    compare(got, torch_out, ref, grad_ulps=None if half_from_output else ROUNDED_ULPS)
    return got, torch_out, ref


# --- values and gradients on the grid --------------------------------------------------------------

# N: one element, odd sizes (vector remainders), a typical hidden size, and rows bigger than any
# cache-sized chunk; M: no rows, one row, and an odd number of rows.
GRID = [(m, n) for m in (0, 1, 37) for n in (1, 7, 123, 1000, 4096)] + [(3, 65536), (2, 100003)]


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n", GRID)
def test_grid(m, n, dtype, rms):
    x = randn(m, n, dtype=dtype)
    w, b = randn(n, dtype=dtype), None if rms else randn(n, dtype=dtype)
    got, _, _ = check(x, w, b, rms=rms)
    assert got["y"].dtype == dtype and got["dx"].dtype == dtype and got["dw"].dtype == dtype
    assert got["h"].numel() == 0  # no residual, no dropout: the norm's input is x
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    assert got["rstd"].dtype == stats and got["rstd"].shape == (m,)
    assert got["mean"].shape == ((0,) if rms else (m,))


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("params", ["none", "w", "b", "wb", "float32 wb"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parameters_present_absent_and_float32(dtype, params, rms):
    if (rms and "b" in params) or ("float32" in params and dtype not in HALF):
        pytest.skip("RMSNorm has no bias; float32 parameters go with half inputs")
    pdtype = torch.float32 if "float32" in params else dtype
    x = randn(37, 123, dtype=dtype)
    w = randn(123, dtype=pdtype) if "w" in params else None
    b = randn(123, dtype=pdtype) if "b" in params else None
    got, _, _ = check(x, w, b, rms=rms)
    for k, p in (("dw", w), ("db", b)):
        assert (got[k] is None) == (p is None) and (p is None or got[k].dtype == p.dtype)


def test_float32_output_from_bfloat16_input():
    x, w = randn(37, 1000, dtype=torch.bfloat16), randn(1000)
    got, _, _ = check(x, w, randn(1000), rms=False, out_dtype=torch.float32)
    assert got["y"].dtype == torch.float32 and got["dx"].dtype == torch.bfloat16


def test_no_weight_grad_requested():
    x, w, b = randn(37, 123), randn(123), randn(123)
    _, _, mean, rstd = norm_fwd(x, w, b, None, EPS, False, False, 0.0, 0, x.dtype, None)
    dy = randn(37, 123)
    full = norm_bwd(dy, x, w, b, mean, rstd, None, EPS, False, False, 0.0, 0, False, x.dtype,
                    None, True)  # fmt: skip
    dx, dr, dw, db = norm_bwd(dy, x, w, b, mean, rstd, None, EPS, False, False, 0.0, 0, False,
                              x.dtype, None, False)  # fmt: skip
    assert dw is None and db is None and dr.numel() == 0
    assert torch.equal(dx, full[0])


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("m", [3, 300])  # one block of rows; several blocks summed
def test_half_weight_grads_are_the_float32_sums_rounded_like_torch(dtype, m):
    """Half parameters get their gradients written in their dtype by the kernel: the same bits
    as the float32 parameters' (same values) rounded by torch's cast; dx the same bits too."""
    n = 1000
    x, dy = randn(m, n, dtype=dtype), randn(m, n, dtype=dtype)
    w, b = randn(n, dtype=dtype), randn(n, dtype=dtype)
    grads = {}
    for params in (dtype, torch.float32):
        wp, bp = w.to(params), b.to(params)
        _, _, mean, rstd = norm_fwd(x, wp, bp, None, EPS, False, False, 0.0, 0, dtype, None)
        grads[params] = norm_bwd(dy, x, wp, bp, mean, rstd, None, EPS, False, False, 0.0, 0,
                                 False, dtype, None, True)  # fmt: skip
    (dx, _, dw, db), (dx32, _, dw32, db32) = grads[dtype], grads[torch.float32]
    assert dw.dtype == db.dtype == dtype and dw32.dtype == torch.float32
    assert torch.equal(dx, dx32)
    assert torch.equal(dw, dw32.to(dtype)) and torch.equal(db, db32.to(dtype))


# --- layouts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["wide rows", "expanded"])
def test_strided_rows_read_in_place(dtype, layout):
    n = 123
    if layout == "wide rows":  # row stride n + 9
        x = randn(37, n + 9, dtype=dtype)[:, 5 : 5 + n]
        r = randn(37, n + 4, dtype=dtype)[:, :n]
    else:  # row stride 0: one row seen 37 times
        x = randn(1, n, dtype=dtype).expand(37, n)
        r = randn(1, n, dtype=dtype).expand(37, n)
    assert x.stride(0) != n and x.stride(1) == 1
    w, b = randn(n, dtype=dtype), randn(n, dtype=dtype)
    check(x, w, b, rms=False)
    check(x, w, None, rms=True)
    check(x, w, b, rms=False, residual=r)
    if layout == "expanded":  # every row of the output is the same row
        got = ours(x, w, b, rms=False)
        assert torch.equal(got["y"], got["y"][:1].expand_as(got["y"]))


# --- fused residual and dropout --------------------------------------------------------------------


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_residual_and_dropout(dtype, p, rms):
    m, n = 37, 1000
    x, r = randn(m, n, dtype=dtype), randn(m, n, dtype=dtype)
    w, b = randn(n, dtype=dtype), None if rms else randn(n, dtype=dtype)
    mask = reference_keep_mask(7, m, n, p) if p > 0 else None
    dh_out = randn(m, n, dtype=dtype)
    got, _, _ = check(x, w, b, rms=rms, residual=r, p=p, seed=7, mask=mask, dh_out=dh_out)
    assert got["h"].dtype == dtype and got["dr"].dtype == dtype


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_dropout_without_residual(rms):
    m, n, p = 37, 1000, 0.5
    x, w = randn(m, n), randn(n)
    mask = reference_keep_mask(3, m, n, p)
    got, _, _ = check(x, w, None, rms=rms, p=p, seed=3, mask=mask)
    # h is x scaled by 1/(1 - p) where kept and exactly 0 where dropped
    assert torch.equal(got["h"] == 0, ~mask)
    torch.testing.assert_close(got["h"][mask], (x / (1 - p))[mask], rtol=2e-7, atol=0)
    assert got["dr"] is None and torch.equal(got["dx"] == 0, ~mask)


def test_residual_kept_in_float32_for_bfloat16_input():
    m, n = 37, 1000
    x, r = randn(m, n, dtype=torch.bfloat16), randn(m, n)
    w = randn(n, dtype=torch.bfloat16)
    got, _, _ = check(x, w, None, rms=True, residual=r, residual_dtype=torch.float32,
                        dh_out=randn(m, n))  # fmt: skip
    assert got["h"].dtype == torch.float32 and got["dr"].dtype == torch.float32
    # h in float32 is r + x exactly as float32 adds it
    assert torch.equal(got["h"], r + x.float())


def test_h_is_rounded_before_the_norm():
    # The norm must see exactly the h it returns: normalizing the returned h on its own gives
    # the same output bit for bit.
    m, n = 37, 1000
    x, r, w = randn(m, n, dtype=torch.bfloat16), randn(m, n, dtype=torch.bfloat16), randn(n)
    fused = norm_fwd(x, w, None, r, EPS, True, False, 0.0, 0, torch.bfloat16, None)
    alone = norm_fwd(fused[1], w, None, None, EPS, True, False, 0.0, 0, torch.bfloat16, None)
    assert torch.equal(fused[0], alone[0]) and torch.equal(fused[3], alone[3])


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_rate_and_reproducibility(p):
    m, n = 64, 1000
    mask = dropout_keep_mask(11, m, n, p)
    assert mask.dtype == torch.bool and mask.shape == (m, n)
    assert torch.equal(mask, reference_keep_mask(11, m, n, p))  # the contract's mask
    # 64000 draws: the kept fraction's standard deviation is below 0.002
    assert abs(mask.float().mean().item() - (1 - p)) < 0.01
    assert torch.equal(mask, dropout_keep_mask(11, m, n, p))
    assert not torch.equal(mask, dropout_keep_mask(12, m, n, p))
    # element (i, j) depends on (seed, i*N + j) only, not on M
    assert torch.equal(mask[:5], dropout_keep_mask(11, 5, n, p))
    # no visible pattern: rows and columns differ
    assert not torch.equal(mask[0], mask[1]) and not torch.equal(mask[:, 0], mask[:, 1])


def test_dropout_mask_is_tritons_tl_rand():
    # the CPU kernels draw Triton's tl.rand(seed, i*N + j), so both backends can share masks
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def draw(out, seed, n_elements, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out + offs, tl.rand(seed, offs), mask=offs < n_elements)

    seed, m, n = (1 << 40) + 12345, 16, 100
    u = torch.empty(m * n)
    draw[(triton.cdiv(m * n, 512),)](u, seed, m * n, BLOCK=512)
    for p in (0.1, 0.5):
        assert torch.equal(dropout_keep_mask(seed, m, n, p), (u >= p).view(m, n))
        assert torch.equal(reference_keep_mask(seed, m, n, p), (u >= p).view(m, n))


def test_reference_philox_known_answers():
    # Random123's known-answer vectors for Philox-4x32-10 (counter, key -> four words): the
    # reference mask of the tests (helpers.py) is Philox as published, not a copy of ours
    vectors = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in vectors:
        assert tuple(int(w) for w in philox4x32_10(counter, key)) == expected


# --- variants: zero-centred weight, x̂ dtype, backward from the output -----------------------------


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_zero_centered_weight(dtype, rms):
    x = randn(37, 1000, dtype=dtype)
    w = randn(1000, dtype=dtype, std=0.1)
    check(x, w, None if rms else randn(1000, dtype=dtype), rms=rms, zc=True)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_xhat_dtype_llama_cast_order(dtype):
    m, n = 37, 1000
    x, w = randn(m, n, dtype=dtype), randn(n, dtype=dtype)
    y = norm_fwd(x, w, None, None, EPS, True, False, 0.0, 0, dtype, None, dtype)[0]
    # Hugging Face's LlamaRMSNorm, in torch
    hf = x.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)
    y_hf = w * hf.to(dtype)
    # the spec rounds x̂ to dtype, then y: where the float32 x̂ and the float64 one round apart
    # (a tie between them), y moves by one ulp of x̂ times w, up to two ulps of y
    ref = rms_norm_ref(x, (n,), None, EPS).to(dtype).double() * w.double()
    assert_close_to_ref(y, y_hf, ref, ulps={dtype: 2.5})
    # With a float32 output the product x̂·w is exact, so y / w must be x̂ rounded to dtype.
    y32 = norm_fwd(x, w, None, None, EPS, True, False, 0.0, 0, torch.float32, None, dtype)[0]
    q = y32.double() / w.double()
    assert torch.equal(q.to(dtype).double(), q)
    # and not so without xhat_dtype (the test can tell the two apart)
    y32_plain = norm_fwd(x, w, None, None, EPS, True, False, 0.0, 0, torch.float32, None)[0]
    q = y32_plain.double() / w.double()
    assert not torch.equal(q.to(dtype).double(), q)


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_backward_from_output(dtype, rms):
    m, n = 37, 1000
    x = randn(m, n, dtype=dtype)
    w = (randn(n).abs() + 0.5).to(dtype)  # from_output needs a weight without zeros
    w = torch.where(torch.rand(n) < 0.5, w, -w)
    b = None if rms else randn(n, dtype=dtype)
    check(x, w, b, rms=rms, from_output=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_from_output_zero_centered_with_residual_and_dropout(dtype):
    # the memory-saving mode with every option that changes what backward sees: h saved as y,
    # dropout regenerated from the seed, a gradient into h, and the weight (1 + w)
    m, n, p = 37, 1000, 0.25
    x, r, w = randn(m, n, dtype=dtype), randn(m, n, dtype=dtype), randn(n, std=0.1)
    check(x, w, randn(n), rms=False, zc=True, from_output=True, residual=r, p=p, seed=9,
          mask=reference_keep_mask(9, m, n, p), dh_out=randn(m, n, dtype=dtype))


# --- numerics --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1000, 4096])
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_rows_far_from_zero(n, rms):
    # mean 1e4, unit spread: E[x²] - E[x]² would lose every digit of the variance in float32
    x = randn(37, n, mean=1e4)
    got, _, ref = check(x, randn(n), None if rms else randn(n), rms=rms)
    if not rms:
        err = (got["rstd"].double() - ref["rstd"]).abs().max() / ref["rstd"].abs().max()
        assert err < 1e-3


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_and_inf_rows_like_torch(dtype, rms):
    m, n = 8, 123
    x = randn(m, n).to(dtype)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    x[2, 7] = -float("inf")
    x[3] = float("inf")
    x[4, 1] = 3e38  # finite, but its square overflows
    w, b = randn(n, dtype=dtype), None if rms else randn(n, dtype=dtype)
    dy = randn(m, n, dtype=dtype)
    got = ours(x, w, b, rms=rms, dy=dy)
    torch_out = theirs(x, w, b, rms=rms, dy=dy)
    ref = reference(x, w, b, rms=rms, dy=dy)
    for k in ("y", "dx"):
        # the overflowing row's gradient is left out: torch's own NaN pattern there changes
        # with the dtype
        rows = slice(None) if k == "y" else [0, 1, 2, 3, 5, 6, 7]
        assert torch.equal(got[k][rows].isnan(), torch_out[k][rows].isnan()), k
        assert_close_to_ref(got[k][5:], torch_out[k][5:], ref[k][5:], what=k)  # finite rows
    assert got["y"][4].isfinite().all()


# --- bitwise properties ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1000, 4096])
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_is_batch_invariant(dtype, rms, n):
    # A row's output, mean and rstd do not depend on the batch size or the row's position.
    x = randn(37, n, dtype=dtype)
    w, b = randn(n, dtype=dtype), None if rms else randn(n, dtype=dtype)
    whole = norm_fwd(x, w, b, None, EPS, rms, False, 0.0, 0, dtype, None)
    other = randn(300, n, dtype=dtype)
    other[200:237] = x  # same rows, other positions, in a bigger batch
    bigger = norm_fwd(other, w, b, None, EPS, rms, False, 0.0, 0, dtype, None)
    for i in (0, 17, 36):
        alone = norm_fwd(x[i : i + 1], w, b, None, EPS, rms, False, 0.0, 0, dtype, None)
        for k in (0, 2, 3):
            if whole[k].numel():
                assert torch.equal(whole[k][i], alone[k][0]), (i, k)
                assert torch.equal(whole[k][i], bigger[k][200 + i]), (i, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_is_deterministic_and_thread_count_independent(dtype):
    m, n = 300, 1000  # more rows than blocks: every block sums several rows
    x, r = randn(m, n, dtype=dtype), randn(m, n, dtype=dtype)
    w, b = randn(n, dtype=dtype), randn(n, dtype=dtype)
    dy = randn(m, n, dtype=dtype)
    runs = []
    for threads in THREAD_COUNTS + THREAD_COUNTS[-1:]:  # the last count twice: repeatable
        with kernel_threads(threads):
            runs.append(ours(x, w, b, rms=False, residual=r, p=0.1, seed=5, dy=dy))
    for threads, run in zip(THREAD_COUNTS[1:] + THREAD_COUNTS[-1:], runs[1:]):
        for k in ("y", "h", "mean", "rstd", "dx", "dr", "dw", "db"):
            assert torch.equal(runs[0][k], run[k]), (threads, k)


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_plain_backward_rows_do_not_depend_on_the_batch(dtype, rms):
    # The plain backward (dy and x read in place) goes a group of rows at a time, by column
    # chunks: a row's dx must not depend on its group, its position or the batch, and the
    # weight gradients not on the thread count. N = 1100: chunks of 512, 512 and 76 columns.
    n = 1100
    x, dy = randn(300, n, dtype=dtype), randn(300, n, dtype=dtype)
    w, b = randn(n, dtype=dtype), None if rms else randn(n, dtype=dtype)
    runs = []
    for threads in THREAD_COUNTS:
        with kernel_threads(threads):
            runs.append(ours(x, w, b, rms=rms, dy=dy))
    for run in runs[1:]:
        for k in ("dx", "dw") + (() if rms else ("db",)):
            assert torch.equal(runs[0][k], run[k]), k
    for rows in (slice(0, 1), slice(13, 14), slice(7, 44), slice(299, 300)):
        alone = ours(x[rows].clone(), w, b, rms=rms, dy=dy[rows].clone())
        assert torch.equal(alone["dx"], runs[0]["dx"][rows]), rows


def test_small_calls_run_serially_with_the_same_bits(monkeypatch):
    """Calls under the grain run on the calling thread; the same kernel body on torch's threads
    gives the same bits (the grain changes only where the work runs)."""
    m, n = 40, 300
    x, r, w, b, dy = (randn(m, n), randn(m, n), randn(n), randn(n), randn(m, n))
    serial = ours(x, w, b, rms=False, residual=r, p=0.1, seed=3, dy=dy)
    monkeypatch.setattr(_launch, "PARALLEL_GRAIN", 0)
    monkeypatch.setattr(ln, "_PLANS", {})
    threads = []  # (the launchers call `on_threads` themselves)
    for launch in (*ln._FWD._compiled.values(), *ln._BWD._compiled.values()):
        monkeypatch.setattr(launch, "on_threads", lambda block, t, flags, real=launch.on_threads:
                            threads.append(t) or real(block, t, flags))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        parallel = ours(x, w, b, rms=False, residual=r, p=0.1, seed=3, dy=dy)
    finally:
        torch.set_num_threads(before)
    assert threads and min(threads) == 2
    for k in ("y", "h", "mean", "rstd", "dx", "dr", "dw", "db"):
        assert torch.equal(serial[k], parallel[k]), k


# --- empty inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("m,n", [(0, 123), (5, 0), (0, 0)])
def test_zero_elements(m, n, rms):
    x, r, w, b = randn(m, n), randn(m, n), randn(n), randn(n)
    got = ours(x, w, b, rms=rms, residual=r, dy=randn(m, n), dh_out=randn(m, n))
    assert got["y"].shape == (m, n) and got["h"].shape == (m, n)
    assert got["dx"].shape == (m, n) and got["dr"].shape == (m, n)
    assert torch.equal(got["dw"], torch.zeros(n)) and torch.equal(got["db"], torch.zeros(n))
    if n == 0 and not rms:  # torch's statistics of an empty row
        _, mean, rstd = torch.native_layer_norm(x, (0,), None, None, EPS)
        assert torch.equal(got["mean"], mean.view(-1))
        assert torch.equal(got["rstd"].isnan(), rstd.view(-1).isnan())
