"""Property tests: random shapes, normalized ranks, dtypes, strides and options, each checked
against torch and the float64 reference (values and gradients)."""

import torch
from helpers import assert_close_to_ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusednorm
from fusednorm.reference import layer_norm_ref, rms_norm_ref

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def cases(draw):
    rank = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(1, 9), min_size=rank, max_size=rank))
    shape[-1] = draw(st.integers(1, 300))
    k = draw(st.integers(1, rank))
    dtype = draw(st.sampled_from(DTYPES))
    # a layout: contiguous, a permutation of the leading dims, or a slice of a wider tensor
    layout = draw(st.sampled_from(["contiguous", "permuted", "sliced", "stepped"]))
    return {"shape": shape, "k": k, "dtype": dtype, "layout": layout,
                "norm": draw(st.sampled_from(["layer", "rms"])),
                "weight": draw(st.booleans()), "bias": draw(st.booleans()),
                "seed": draw(st.integers(0, 2**16))}


def make_input(shape, dtype, layout, gen):
    shape = list(shape)
    if layout == "permuted" and len(shape) >= 2:
        x = torch.randn(shape[::-1][1:] + shape[-1:], generator=gen, dtype=torch.float64)
        dims = list(range(x.dim() - 1))[::-1] + [x.dim() - 1]
        return x.permute(dims).to(dtype)  # leading dims reversed in memory
    if layout == "sliced":
        wide = torch.randn(shape[:-1] + [shape[-1] + 5], generator=gen, dtype=torch.float64)
        return wide[..., 2 : 2 + shape[-1]].to(dtype)
    if layout == "stepped":
        wide = torch.randn(shape[:-1] + [shape[-1] * 2], generator=gen, dtype=torch.float64)
        return wide[..., ::2].to(dtype)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(cases())
def test_random_cases_match_reference(case):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, ns = case["dtype"], tuple(case["shape"][-case["k"]:])
    x = make_input(case["shape"], dtype, case["layout"], gen)
    w = torch.randn(ns, generator=gen, dtype=torch.float64).to(dtype) if case["weight"] else None
    b = torch.randn(ns, generator=gen, dtype=torch.float64).to(dtype) if case["bias"] else None
    if case["norm"] == "rms":
        b = None
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)
    outs = []
    for who in ("ours", "torch", "ref"):
        leaves = [t.detach().clone() if t is not None else None for t in (x, w, b)]
        if who == "ref":
            leaves = [t.double() if t is not None else None for t in leaves]
        for t in leaves:
            if t is not None:
                t.requires_grad_()
        xl, wl, bl = leaves
        if case["norm"] == "layer":
            fn = {"ours": fusednorm.layer_norm, "torch": torch.nn.functional.layer_norm,
                  "ref": layer_norm_ref}[who]
            y = fn(xl, ns, wl, bl, 1e-5)
        else:
            fn = {"ours": fusednorm.rms_norm, "torch": torch.nn.functional.rms_norm,
                  "ref": rms_norm_ref}[who]
            y = fn(xl, ns, wl, 1e-5)
        y.backward(dy.to(y.dtype))
        outs.append([y.detach()] + [t.grad for t in leaves if t is not None])
    for name, a, t, r in zip(["y", "dx", "dw", "db"], *outs):
        assert_close_to_ref(a, t, r, dtype=dtype, what=f"{name} {case}")
