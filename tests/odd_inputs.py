"""Odd inputs for every public function, run in a child process by test_odd_inputs.py.

`python tests/odd_inputs.py [FAMILY ...]` (default: all) calls fusednorm's function and torch's
on each case and prints one line per case: "start FAMILY: NAME" before it (so that a crash
names its case), then "same FAMILY: NAME" or "differs FAMILY: NAME: why". Same means: both raised the same exception type with the same
message, or both returned the same type of tensor with the same values.
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.nn.functional as F

import fusednorm

warnings.filterwarnings("ignore")  # nested tensors and quantization print prototype warnings


class Plain(torch.Tensor):
    """A subclass with torch's default __torch_function__: torch's ops keep its type."""


def _two_tensor(t):
    from torch.testing._internal.two_tensor import TwoTensor  # a __torch_dispatch__ wrapper

    return TwoTensor(t, t.clone())


def _dead_wrapper(t):
    """A functorch wrapper kept after its transform ended (no storage of its own)."""
    kept = []
    torch.func.grad(lambda x: kept.append(x) or x.sum())(t)
    return kept[0]


def _fake(t):
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode().from_tensor(t)


def _inputs(shape):
    """name -> x of `shape`, for the cases that do not depend on the family."""
    x = torch.randn(*shape)
    cases = {
        "zero batch": torch.randn(0, *shape[1:]),
        "zero-dim weightless": torch.randn(*shape[:1], *([0] * (len(shape) - 1))),
        "overlapping as_strided": torch.randn(x.numel()).as_strided(
            shape, [1] * len(shape)),
        "expanded batch": x[:1].expand(shape),
        "expanded inner": x[..., :1].expand(shape),
        "transposed": x.transpose(0, -1).contiguous().transpose(0, -1),
        "negative view": torch._neg_view(x),
        "complex": torch.randn(*shape, dtype=torch.complex64),
        "conj view": torch.randn(*shape, dtype=torch.complex64).conj(),
        "imag of a conj view (negative bit)": torch.randn(*shape, dtype=torch.complex64)
        .conj().imag,
        "float64": x.double(),
        "int64": torch.randint(0, 5, shape),
        "bool": x > 0,
        "quantized": torch.quantize_per_tensor(x, 0.1, 10, torch.quint8),
        "mkldnn": x.to_mkldnn(),
        "sparse coo": x.to_sparse(),
        "meta": torch.empty(shape, device="meta"),
        "plain subclass": x.as_subclass(Plain),
        "parameter": torch.nn.Parameter(x.clone()),
        "dispatch subclass": _two_tensor(x),
        "dead functorch wrapper": _dead_wrapper(x),
        "fake": _fake(x),
        "requires grad": x.clone().requires_grad_(),
        "strided nested": torch.nested.nested_tensor([x[0], x[0][:1]]),
    }
    if len(shape) == 2:
        cases["sparse csr"] = x.to_sparse_csr()
    return cases


def _jagged(shape):
    return torch.nested.nested_tensor([torch.randn(3, *shape[1:]), torch.randn(5, *shape[1:])],
                                      layout=torch.jagged)


# family -> (x's shape, ours(x, w, b), torch's(x, w, b))
W8 = torch.randn(8)
FAMILIES = {
    "layer_norm": ((4, 8), lambda x, w=W8, b=W8: fusednorm.layer_norm(x, (8,), w, b),
                   lambda x, w=W8, b=W8: F.layer_norm(x, (8,), w, b)),
    "rms_norm": ((4, 8), lambda x, w=W8, b=None: fusednorm.rms_norm(x, (8,), w),
                 lambda x, w=W8, b=None: F.rms_norm(x, (8,), w)),
    "group_norm": ((2, 8, 3), lambda x, w=W8, b=W8: fusednorm.group_norm(x, 4, w, b),
                   lambda x, w=W8, b=W8: F.group_norm(x, 4, w, b)),
    "instance_norm": ((2, 8, 3), lambda x, w=W8, b=W8: fusednorm.instance_norm(
        x, weight=w, bias=b), lambda x, w=W8, b=W8: F.instance_norm(x, weight=w, bias=b)),
    "batch_norm": ((4, 8, 3), lambda x, w=W8, b=W8: fusednorm.batch_norm(
        x, None, None, w, b, True), lambda x, w=W8, b=W8: F.batch_norm(x, None, None, w, b,
                                                                      True)),
}


def _params_cases():
    """Cases of the weight (with a plain x)."""
    return {
        "weight float16": W8.half(),
        "weight negative view": torch._neg_view(W8),
        "weight strided": torch.randn(16)[::2],
        "weight complex": W8.to(torch.complex64),
        "weight int": torch.arange(8),
        "weight plain subclass": W8.as_subclass(Plain),
        "weight meta": torch.empty(8, device="meta"),
        "weight sparse": W8.to_sparse(),
        # (after calls that filed a plan for this signature: its guard check is not for these)
        "weight strided nested": torch.nested.nested_tensor([W8]),
    }


def _outcome(call):
    try:
        return "value", call()
    except Exception as e:  # noqa: BLE001 - the point is to compare whatever is raised
        return "raised", (type(e), str(e))


def _differences(ours, theirs) -> str | None:
    if ours[0] != theirs[0]:
        return f"ours {ours[0]} {ours[1]!r:.300}, torch's {theirs[0]} {theirs[1]!r:.300}"
    if ours[0] == "raised":
        return None if ours[1] == theirs[1] else f"ours {ours[1]!r:.300} != {theirs[1]!r:.300}"
    a, b = ours[1], theirs[1]
    if type(a) is not type(b):
        return f"type {type(a).__name__} != torch's {type(b).__name__}"
    if a.is_nested:
        a, b = a.values(), b.values()
    if a.device.type == "meta":
        return None if (a.shape, a.dtype) == (b.shape, b.dtype) else "meta shapes differ"
    if type(a).__name__ == "FakeTensor":
        return None if (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride()) \
            else f"fake {a.shape} {a.stride()} != {b.shape} {b.stride()}"
    if type(a).__name__ == "TwoTensor":
        a, b = a.a, b.a
    a, b = torch.Tensor(a) if isinstance(a, Plain) else a, torch.Tensor(b) if isinstance(
        b, Plain) else b
    if (a.shape, a.dtype) != (b.shape, b.dtype):
        return f"{a.shape} {a.dtype} != torch's {b.shape} {b.dtype}"
    tol = 1e-4 if a.dtype in (torch.float32, torch.complex64) else 1e-9
    if not torch.allclose(a.detach(), b.detach(), rtol=tol, atol=tol, equal_nan=True):
        return f"values differ by {(a.detach() - b.detach()).abs().max().item():.3g}"
    return None


def _in_meta_context(fn, x, w, b):
    """A TorchFunctionMode that moves factory calls (torch.empty without a device) to meta."""
    with torch.device("meta"):
        return fn(x, w, b)


def main(family: str) -> None:
    shape, ours, theirs = FAMILIES[family]
    cases = {name: (x, W8, W8) for name, x in _inputs(shape).items()}
    cases["jagged"] = (_jagged(shape), W8, W8)
    cases.update({name: (torch.randn(shape), w, W8) for name, w in _params_cases().items()})
    contexts = {name: lambda fn, x, w, b: fn(x, w, b) for name in cases}
    cases["under torch.device('meta')"] = (torch.randn(shape, requires_grad=True), W8, W8)
    contexts["under torch.device('meta')"] = _in_meta_context
    for case, (x, w, b) in cases.items():
        name = f"{family}: {case}"
        run = contexts[case]
        print("start", name, flush=True)
        diff = _differences(_outcome(lambda x=x, w=w, b=b, run=run: run(ours, x, w, b)),
                            _outcome(lambda x=x, w=w, b=b, run=run: run(theirs, x, w, b)))
        print("same" if diff is None else "differs", name + ("" if diff is None else f": {diff}"),
              flush=True)


if __name__ == "__main__":
    for family in sys.argv[1:] or FAMILIES:
        main(family)
