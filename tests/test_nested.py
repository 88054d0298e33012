"""Jagged nested tensors: the row norms normalize each row of the values buffer on the kernels,
with autograd, the fused residual and dropout, and answer with a jagged tensor of the input's
structure; everything else about nested tensors is torch's op (tests/odd_inputs.py runs the
crash-prone cases in a child process)."""

import pytest
import torch
from helpers import assert_close_to_ref, row_kernel_inputs

import fusednorm
from fusednorm import reference as R

D = 16


def _jagged(*lengths, dtype=torch.float32, requires_grad=False):
    values = [torch.randn(n, D, dtype=dtype) for n in lengths]
    return torch.nested.nested_tensor(values, layout=torch.jagged, requires_grad=requires_grad)


NORMS = {
    "LayerNorm": (lambda: fusednorm.LayerNorm(D), lambda: torch.nn.LayerNorm(D),
                  lambda v, m: R.layer_norm_ref(v, (D,), m.weight, m.bias)),
    "RMSNorm": (lambda: fusednorm.RMSNorm(D, eps=1e-6), lambda: torch.nn.RMSNorm(D, eps=1e-6),
                lambda v, m: R.rms_norm_ref(v, (D,), m.weight, 1e-6)),
}


def _pair(name):
    make_ours, make_torch, ref = NORMS[name]
    ours, theirs = make_ours(), make_torch()
    with torch.no_grad():
        for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
            p.uniform_(0.5, 1.5)
            q.copy_(p)
    return ours, theirs, ref


@pytest.mark.parametrize("name", list(NORMS))
def test_jagged_norm_and_gradients_match_torch(name):
    ours, theirs, ref = _pair(name)
    x = _jagged(3, 5, 1, requires_grad=True)
    x_torch = x.detach().clone().requires_grad_()
    with row_kernel_inputs("cpu") as seen:
        y = ours(x)
    assert [shape for shape, _, _ in seen] == [(9, D)]  # the values, in one launch
    assert y.is_nested and y.layout == torch.jagged and y.shape == x.shape
    assert y.offsets() is x.offsets()  # the same structure: the same ragged size
    expected = theirs(x_torch)
    assert_close_to_ref(y.values(), expected.values(), ref(x.values().detach(), theirs))
    dy = torch.randn_like(y.values())
    torch.autograd.backward(y.values(), dy)
    torch.autograd.backward(expected.values(), dy)
    torch.testing.assert_close(x.grad.values(), x_torch.grad.values())
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_jagged_residual_and_dropout(dropout_p):
    norm = fusednorm.LayerNorm(D, dropout_p=dropout_p)
    x, r = _jagged(4, 2, requires_grad=True), _jagged(4, 2, requires_grad=True)
    r = torch.nested.nested_tensor_from_jagged(r.values().detach(), offsets=x.offsets())
    r.requires_grad_()
    y, h = norm(x, residual=r)
    assert h.is_nested and h.offsets() is x.offsets() and y.offsets() is x.offsets()
    dropped = h.values() - r.values()
    keep = dropped != 0
    torch.testing.assert_close(dropped, x.values() * keep / (1 - dropout_p))
    if dropout_p == 0:
        assert keep.all()
    torch.testing.assert_close(y.values(), R.layer_norm_ref(
        h.values().detach(), (D,), norm.weight, norm.bias).float())
    (y.values().sin().sum() + h.values().square().sum()).backward()
    hv = h.values().detach().requires_grad_()
    dh, = torch.autograd.grad(torch.nn.functional.layer_norm(
        hv, (D,), norm.weight, norm.bias).sin().sum() + hv.square().sum(), hv)
    torch.testing.assert_close(r.grad.values(), dh)
    torch.testing.assert_close(x.grad.values(), dh * keep / (1 - dropout_p))


def test_jagged_residual_of_another_structure_is_refused():
    x, r = _jagged(4, 2), _jagged(3, 3)
    with pytest.raises(RuntimeError, match="residual must be a jagged tensor"):
        fusednorm.layer_norm(x, (D,), residual=r)


def _outcome(call):
    try:
        return "value", call().values()
    except Exception as e:  # noqa: BLE001 - compared with torch's, whatever it is
        return "raised", (type(e), str(e))


def test_normalizing_over_the_ragged_dim_is_torchs():
    """torch's answer: layer_norm normalizes over the ragged dim, rms_norm refuses."""
    x = _jagged(4, 2)
    for ours, theirs in ((fusednorm.layer_norm, torch.nn.functional.layer_norm),
                         (fusednorm.rms_norm, torch.nn.functional.rms_norm)):
        got = _outcome(lambda ours=ours: ours(x, (x.shape[1], D)))
        expected = _outcome(lambda theirs=theirs: theirs(x, (x.shape[1], D)))
        assert got[0] == expected[0]
        if got[0] == "value":
            torch.testing.assert_close(got[1], expected[1])
        else:
            assert got[1] == expected[1]
