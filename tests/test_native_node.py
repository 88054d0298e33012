"""GroupNorm's C++ autograd node (cpu/_native.py, csrc/group_norm_node.cpp): a module's kept
plan runs on it from its second backward on, where the extension is built (`python -m fusednorm
warmup`); it must give the Python node's bits and behave as an autograd node of torch's does."""

import pytest
import torch
from helpers import randn

import fusednorm
from fusednorm import group_norms
from fusednorm.cpu import _native

built = pytest.mark.skipif(_native.module() is None, reason="the C++ extension is not built here")

LAYOUTS = {"first": torch.contiguous_format, "last": torch.channels_last}


def _module(c=16, groups=4, dtype=torch.float32, activation=None):
    m = fusednorm.GroupNorm(groups, c, dtype=dtype, activation=activation)
    with torch.no_grad():
        m.weight.copy_(randn(c, mean=1.0).to(dtype))
        m.bias.copy_(randn(c).to(dtype))
    return m


def _input(shape, layout, dtype=torch.float32):
    return randn(*shape).to(dtype).contiguous(memory_format=LAYOUTS[layout]).requires_grad_()


def _step(m, x, dy):
    """y and the three gradients of one forward and backward, and the node that ran."""
    y = m(x)
    node = type(y.grad_fn).__name__
    y.backward(dy)
    out = (y.detach(), x.grad, m.weight.grad, m.bias.grad)
    x.grad = m.weight.grad = m.bias.grad = None
    return out, node


@built
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_the_second_backward_on_runs_the_cpp_node_with_the_python_nodes_bits(
        layout, dtype, activation):
    m = _module(dtype=dtype, activation=activation)
    x = _input((3, 16, 9, 7), layout, dtype)
    dy = randn(3, 16, 9, 7).to(dtype).contiguous(memory_format=LAYOUTS[layout])
    first, node_first = _step(m, x, dy)
    second, node_second = _step(m, x, dy)
    assert node_first == "_GroupNormFastBackward" and node_second == "CppFunction"
    for a, b in zip(first, second):
        assert a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a, b)


def _on_native(m, x):
    """Two forwards and backwards: the module's kept plan is on the C++ node after them."""
    for _ in range(2):
        m(x).sum().backward()
    x.grad = m.weight.grad = m.bias.grad = None
    assert type(m(x).grad_fn).__name__ == "CppFunction"


@built
def test_only_the_gradients_asked_for():
    m = _module()
    x = _input((2, 16, 5, 5), "first")
    _on_native(m, x)
    m.bias.requires_grad_(False)  # (another signature: a plan of its own, on the Python node)
    _on_native(m, x)
    m(x).sum().backward()
    assert x.grad is not None and m.weight.grad is not None and m.bias.grad is None


@built
def test_double_backward_gives_torchs_second_derivatives():
    m = _module()
    theirs = torch.nn.GroupNorm(4, 16)
    theirs.load_state_dict(m.state_dict())
    x = _input((2, 16, 5, 5), "last")
    _on_native(m, x)
    for mod in (m, theirs):
        y = mod(x)
        (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
        gx.square().sum().backward()
    # both sides accumulated into x.grad: compare the two halves
    x2 = x.detach().clone().requires_grad_()
    y = theirs(x2)
    (gx,) = torch.autograd.grad((y * y).sum(), x2, create_graph=True)
    gx.square().sum().backward()
    torch.testing.assert_close(x.grad, 2 * x2.grad, rtol=1e-4, atol=1e-5)


@built
def test_saved_tensor_hooks_see_the_saved_tensors():
    m = _module()
    x = _input((2, 16, 5, 5), "first")
    _on_native(m, x)
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    assert type(y.grad_fn).__name__ == "CppFunction" and torch.Size([2, 16, 5, 5]) in packed
    y.sum().backward()


@built
def test_a_second_backward_through_a_freed_graph_raises_torchs_error():
    m = _module()
    x = _input((2, 16, 5, 5), "first")
    _on_native(m, x)
    y = m(x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="Trying to backward through the graph a second time"):
        y.backward()


@built
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_thread_count_may_change_between_calls_and_passes(layout):
    m = _module(c=64, groups=8)
    x = _input((8, 64, 16, 16), layout)  # (big enough for two threads)
    dy = randn(8, 64, 16, 16).contiguous(memory_format=LAYOUTS[layout])
    want, _ = _step(m, x, dy)
    _step(m, x, dy)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            y = m(x)
            assert type(y.grad_fn).__name__ == "CppFunction"
            torch.set_num_threads(4 - count)  # (another count for the backward)
            y.backward(dy)
            got = (y.detach(), x.grad, m.weight.grad, m.bias.grad)
            x.grad = m.weight.grad = m.bias.grad = None
            for a, b in zip(want, got):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)


@built
def test_a_gradient_in_another_layout_and_dtype():
    m = _module()
    x = _input((2, 16, 6, 6), "first")
    _on_native(m, x)
    dy = randn(2, 16, 6, 6)
    want = torch.autograd.grad(group_norms.group_norm(x, 4, m.weight, m.bias), x, dy)[0]
    got = torch.autograd.grad(m(x), x, dy.to(torch.float64).contiguous(
        memory_format=torch.channels_last))[0]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_without_the_extension_the_python_node_serves(monkeypatch):
    from fusednorm._plan_cache import PlanCache

    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(group_norms, "_PLANS", PlanCache())  # (no plan on the C++ node)
    m = _module()
    x = _input((2, 16, 5, 5), "first")
    for _ in range(3):
        y = m(x)
        assert type(y.grad_fn).__name__ == "_GroupNormFastBackward"
        y.sum().backward()


def test_fusednorm_native_0_turns_it_off(monkeypatch):
    monkeypatch.setenv("FUSEDNORM_NATIVE", "0")
    monkeypatch.setattr(_native, "_module", _native._UNLOADED)
    assert _native.module() is None


@built
def test_the_function_runs_on_it_too_and_under_vmap_on_torchs_rules():
    x = _input((2, 16, 5, 5), "first")
    w, b = randn(16, mean=1.0).requires_grad_(), randn(16).requires_grad_()
    for _ in range(2):
        fusednorm.group_norm(x, 4, w, b).sum().backward()
    y = fusednorm.group_norm(x, 4, w, b)
    assert type(y.grad_fn).__name__ == "CppFunction"
    want = torch.func.vmap(lambda t: torch.nn.functional.group_norm(t, 4, w, b))(x.unsqueeze(1))
    got = torch.func.vmap(lambda t: fusednorm.group_norm(t, 4, w, b))(x.unsqueeze(1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
