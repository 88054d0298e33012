"""Forward and backward captured in one CUDA graph replay what eager computes.

Capture forbids host syncs, allocations outside the graph's pool and autotuning; a replay reuses
the captured launch parameters on new data. (Dropout is left out: a captured seed would repeat
the same mask on every replay.)
"""

import pytest
import torch

import fusednorm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MODULES = {
    "LayerNorm": lambda: fusednorm.LayerNorm(1000),
    "RMSNorm": lambda: fusednorm.RMSNorm(1000, eps=1e-6),
    "LayerNorm+residual": lambda: fusednorm.LayerNorm(1000, residual_in_fp32=True),
}


def step(norm, x, r, dy):
    if r is None:
        y = norm(x)
        y.backward(dy)
        return y
    y, h = norm(x, residual=r)
    torch.autograd.backward([y, h], [dy, dy.to(h.dtype)])
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(MODULES))
def test_graph_replay_matches_eager(name, dtype):
    norm = MODULES[name]().cuda()
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
    with_residual = name.endswith("residual")

    def inputs():
        x = torch.randn(37, 1000, device="cuda", dtype=dtype, requires_grad=True)
        r = torch.randn_like(x, requires_grad=True) if with_residual else None
        return x, r, torch.randn_like(x)

    static = inputs()
    side = torch.cuda.Stream()  # warm up (compiles and tunes) outside the capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(norm, *static)
    torch.cuda.current_stream().wait_stream(side)
    for t in [*static[:2], *norm.parameters()]:
        if t is not None:
            t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = step(norm, *static)

    for _ in range(2):  # new data through the same graph
        fresh = inputs()
        with torch.no_grad():
            for s, f in zip(static, fresh):
                if s is not None:
                    s.copy_(f)
        graph.replay()
        reference = MODULES[name]().cuda()
        reference.load_state_dict(norm.state_dict())
        y = step(reference, *fresh)
        torch.testing.assert_close(static_y, y, rtol=0, atol=0)
        for a, b in [(static[0], fresh[0]), (static[1], fresh[1])]:
            if a is not None:
                torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
        for a, b in zip(norm.parameters(), reference.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
