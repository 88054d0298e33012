"""Property tests: random shapes, normalized ranks, dtypes, strides and options, each checked
against torch and the float64 reference (values and gradients).

The layouts are made in the final dtype and handed to ours as they are (a `.to(dtype)` or a
`.clone()` of a slice would make it contiguous), and the test checks what the kernel receives:
a slice of wider rows must reach it in place, with its row stride."""

import torch
import torch.nn.functional as F
from helpers import assert_three, row_kernel_inputs, run_three
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fusednorm
from fusednorm.reference import layer_norm_ref, rms_norm_ref

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
PAD = 5  # extra elements per row of a "sliced" input


@st.composite
def cases(draw):
    rank = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(1, 9), min_size=rank, max_size=rank))
    shape[-1] = draw(st.integers(1, 300))
    dtype = draw(st.sampled_from(DTYPES))
    # a layout: contiguous, a permutation of the leading dims, or a slice of a wider tensor
    layout = draw(st.sampled_from(["contiguous", "permuted", "sliced", "stepped"]))
    # rows of a slice are read in place only when normalized over the last dim: half the time
    one_dim = layout in ("sliced", "stepped") and draw(st.booleans())
    k = 1 if one_dim else draw(st.integers(1, rank))
    return {"shape": shape, "k": k, "dtype": dtype, "layout": layout,
            "norm": draw(st.sampled_from(["layer", "rms"])),
            "weight": draw(st.booleans()), "bias": draw(st.booleans()),
            "seed": draw(st.integers(0, 2**16))}


def make_input(shape, dtype, layout, gen):
    """x of `shape` in `dtype` with the layout; converted to dtype before it is sliced."""
    shape = list(shape)

    def rand(*s):
        return torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)

    if layout == "permuted" and len(shape) >= 2:
        x = rand(*(shape[::-1][1:] + shape[-1:]))
        dims = list(range(x.dim() - 1))[::-1] + [x.dim() - 1]
        return x.permute(dims)  # leading dims reversed in memory
    if layout == "sliced":
        return rand(*(shape[:-1] + [shape[-1] + PAD]))[..., 2 : 2 + shape[-1]]
    if layout == "stepped":
        return rand(*(shape[:-1] + [shape[-1] * 2]))[..., ::2]
    return rand(*shape)


def reaches_kernel_in_place(x, k):
    """Whether the rows of x can be read in place: a slice of wider rows normalized over its
    last dim only (more normalized dims are not contiguous among themselves)."""
    return k == 1 and x.dim() > 1 and x.numel() // x.shape[-1] > 1 and x.stride(-1) == 1 and \
        not x.is_contiguous() and x.stride(-2) == x.shape[-1] + PAD


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(cases())
@example({"shape": [3, 4, 123], "k": 1, "dtype": torch.bfloat16, "layout": "sliced",
          "norm": "layer", "weight": True, "bias": True, "seed": 1})  # read in place, every run
def test_random_cases_match_reference(case):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, ns = case["dtype"], tuple(case["shape"][-case["k"]:])
    x = make_input(case["shape"], dtype, case["layout"], gen)
    w = torch.randn(ns, generator=gen, dtype=torch.float64).to(dtype) if case["weight"] else None
    b = torch.randn(ns, generator=gen, dtype=torch.float64).to(dtype) if case["bias"] else None
    if case["norm"] == "rms":
        b = None
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)
    if case["norm"] == "layer":
        fns = (fusednorm.layer_norm, F.layer_norm, layer_norm_ref)
        calls = [lambda x, w, b, f=f: f(x, ns, w, b, 1e-5) for f in fns]
    else:
        fns = (fusednorm.rms_norm, F.rms_norm, rms_norm_ref)
        calls = [lambda x, w, b, f=f: f(x, ns, w, 1e-5) for f in fns]
    with row_kernel_inputs("cpu") as seen:
        results = run_three((x, w, b), *calls, dy=dy)
    assert len(seen) == 1, "one kernel call, no composite fallback"
    shape, strides, ptr = seen[0]
    assert strides[1] == 1 or shape[1] <= 1  # the contract: unit inner stride
    if reaches_kernel_in_place(x, case["k"]):
        assert (strides[0], ptr) == (x.stride(-2), x.data_ptr()), "copied instead of read in place"
    assert_three(results, dtype)
