"""Under autocast fusednorm's functions behave as torch's: CPU leaves norms alone, CUDA runs
them in float32."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_ref, randn

import fusednorm
from fusednorm._autocast import _FLOAT32_OPS
from fusednorm.reference import layer_norm_ref, rms_norm_ref

N = 40
CASES = {  # ours, torch's, the float64 reference, with weight (and bias)
    "layer_norm": (lambda x, w, b: fusednorm.layer_norm(x, (N,), w, b),
                   lambda x, w, b: F.layer_norm(x, (N,), w, b),
                   lambda x, w, b: layer_norm_ref(x, (N,), w, b)),
    "rms_norm": (lambda x, w, b: fusednorm.rms_norm(x, (N,), w, 1e-6),
                 lambda x, w, b: F.rms_norm(x, (N,), w, 1e-6),
                 lambda x, w, b: rms_norm_ref(x, (N,), w, 1e-6)),
}
# (input dtype, parameter dtype)
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
          (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
          (torch.float64, torch.float64)]


def test_policy_table_matches_torch_registrations():
    """Our table lists a device for an op iff torch registers an autocast kernel for it there."""
    for op in ("layer_norm", "rms_norm", "group_norm"):
        dump = torch._C._dispatch_dump(f"aten::{op}")
        for device in ("cpu", "cuda"):
            registered = f"Autocast{device.upper()}:" in dump
            assert registered == (op in _FLOAT32_OPS.get(device, ())), (op, device)


def fp32_policy(fn):
    """fn with torch's float32 autocast policy applied by hand (to check ours on CPU)."""
    def cast(t):
        return t.float() if t.dtype != torch.float64 else t
    return lambda x, w, b: fn(cast(x), cast(w), cast(b))


def compare_under_autocast(device, autocast_dtype, op, x_dtype, p_dtype, compile=False,
                           emulate_fp32=False):
    ours, theirs, ref = CASES[op]
    if emulate_fp32:
        theirs = fp32_policy(theirs)
    x = randn(6, N, dtype=x_dtype, device=device, mean=1.0, requires_grad=True)
    w = randn(N, dtype=p_dtype, device=device, requires_grad=True)
    b = randn(N, dtype=p_dtype, device=device, requires_grad=True)
    if compile:
        torch._dynamo.reset()
        ours = torch.compile(ours, fullgraph=True, backend="aot_eager")
    dy = randn(6, N, device=device)
    results = []
    for fn in (ours, theirs):
        with torch.autocast(device, dtype=autocast_dtype):
            y = fn(x, w, b)
        grads = torch.autograd.grad(y, (x, w, b), dy.to(y.dtype), allow_unused=True)
        results.append((y, *grads))
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = ref(x64, w64, b64)
    # the dy ours received: rounded to y's dtype
    dy64 = dy.to(results[0][0].dtype).double()
    refs = (y64, *torch.autograd.grad(y64, (x64, w64, b64), dy64, allow_unused=True))
    for what, a, t, r in zip(("y", "dx", "dw", "db"), *results, refs):
        if t is None:
            assert a is None or not a.any(), what
            continue
        assert a.dtype == t.dtype, f"{what}: {a.dtype} != torch's {t.dtype}"
        assert_close_to_ref(a, t, r, what=f"{op} {what}")
    return results[0][0].dtype


@pytest.mark.parametrize("x_dtype,p_dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("op", list(CASES))
def test_cpu_autocast_like_torch(op, x_dtype, p_dtype):
    out = compare_under_autocast("cpu", torch.bfloat16, op, x_dtype, p_dtype)
    assert out == x_dtype  # CPU autocast leaves the norms alone


@pytest.mark.parametrize("op", list(CASES))
def test_cpu_autocast_compiled_without_graph_breaks(op):
    compare_under_autocast("cpu", torch.bfloat16, op, torch.bfloat16, torch.float32, compile=True)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("x_dtype,p_dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("op", list(CASES))
def test_float32_policy_on_cpu(monkeypatch, op, x_dtype, p_dtype, compile):
    """CUDA's policy, checked on CPU tensors by giving the CPU CUDA's table."""
    monkeypatch.setitem(_FLOAT32_OPS, "cpu", _FLOAT32_OPS["cuda"])
    out = compare_under_autocast("cpu", torch.bfloat16, op, x_dtype, p_dtype, compile=compile,
                                 emulate_fp32=True)
    assert out == (torch.float64 if x_dtype == torch.float64 else torch.float32)


def test_float32_policy_keeps_the_residual_stream_dtype(monkeypatch):
    """Only the norm's inputs are cast, as torch casts layer_norm's: h = residual + x keeps
    the residual's dtype, y is float32."""
    monkeypatch.setitem(_FLOAT32_OPS, "cpu", _FLOAT32_OPS["cuda"])
    x, r = randn(4, N, dtype=torch.bfloat16), randn(4, N, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = fusednorm.layer_norm(x, (N,), residual=r)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.float32
    torch.testing.assert_close(h, r + x)
    torch.testing.assert_close(y, F.layer_norm((r + x).float(), (N,)))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("x_dtype,p_dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("op", list(CASES))
def test_cuda_autocast_like_torch(op, x_dtype, p_dtype, autocast_dtype):
    out = compare_under_autocast("cuda", autocast_dtype, op, x_dtype, p_dtype)
    assert out == (torch.float64 if x_dtype == torch.float64 else torch.float32)


@cuda
@pytest.mark.parametrize("op", list(CASES))
def test_cuda_autocast_compiled(op):
    compare_under_autocast("cuda", torch.bfloat16, op, torch.bfloat16, torch.bfloat16,
                           compile=True)
