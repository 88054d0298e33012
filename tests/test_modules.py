"""fusednorm.LayerNorm and RMSNorm are drop-ins: everything but the kernels is torch's."""

import copy
import io
import pickle

import pytest
import torch

import fusednorm

PAIRS = [(fusednorm.LayerNorm, torch.nn.LayerNorm), (fusednorm.RMSNorm, torch.nn.RMSNorm)]
IDS = ["LayerNorm", "RMSNorm"]


def constructions(theirs):
    kwargs = [{}, {"eps": 1e-3}, {"elementwise_affine": False},
              {"dtype": torch.float64}]
    if theirs is torch.nn.LayerNorm:
        kwargs.append({"bias": False})
    return [(shape, kw) for shape in (8, [2, 4], (2, 4), torch.Size([3])) for kw in kwargs]


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=IDS)
def test_attributes_repr_and_state_dict_match_torch(ours, theirs):
    for shape, kw in constructions(theirs):
        a, b = ours(shape, **kw), theirs(shape, **kw)
        assert isinstance(a, theirs)
        assert a.normalized_shape == b.normalized_shape and type(a.normalized_shape) is tuple
        assert a.eps == b.eps and a.elementwise_affine == b.elementwise_affine
        assert repr(a) == repr(b)
        for name in ("weight", "bias"):
            assert hasattr(a, name) == hasattr(b, name)
            pa, pb = getattr(a, name, None), getattr(b, name, None)
            assert (pa is None) == (pb is None)
            if pa is not None:
                assert isinstance(pa, torch.nn.Parameter)
                assert torch.equal(pa, pb) and pa.dtype == pb.dtype
        assert list(a.state_dict()) == list(b.state_dict())


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=IDS)
def test_state_dict_loads_both_ways(ours, theirs):
    a, b = ours(16), theirs(16)
    with torch.no_grad():
        for p in b.parameters():
            p.normal_()
    a.load_state_dict(b.state_dict())
    x = torch.randn(5, 16)
    torch.testing.assert_close(a(x), b(x))
    c = theirs(16)
    c.load_state_dict(a.state_dict())
    torch.testing.assert_close(c(x), a(x))


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=IDS)
def test_pickle_deepcopy_and_torch_save(ours, theirs):
    a = ours(12)
    with torch.no_grad():
        a.weight.normal_()
    x = torch.randn(3, 12)
    for b in (pickle.loads(pickle.dumps(a)), copy.deepcopy(a)):
        assert type(b) is ours
        torch.testing.assert_close(b(x), a(x))
    buf = io.BytesIO()
    torch.save(a, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x), a(x))


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=IDS)
def test_meta_device_then_materialize(ours, theirs):
    a = ours((4, 8), device="meta")
    assert a.weight.device.type == "meta"
    a = a.to_empty(device="cpu")
    a.reset_parameters()
    torch.testing.assert_close(a.weight, torch.ones(4, 8))
    x = torch.randn(2, 4, 8)
    torch.testing.assert_close(a(x), theirs((4, 8))(x))


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=IDS)
def test_forward_does_not_read_training(ours, theirs):
    a = ours(8)
    y = a(torch.randn(2, 8))
    object.__delattr__(a, "training")  # reading self.training would now raise
    torch.testing.assert_close(a(torch.ones(2, 8)), theirs(8)(torch.ones(2, 8)))
    assert y.shape == (2, 8)


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=IDS)
def test_reset_parameters(ours, theirs):
    a = ours(6)
    with torch.no_grad():
        for p in a.parameters():
            p.normal_()
    a.reset_parameters()
    b = theirs(6)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_zero_centered_weight_starts_at_identity():
    a = fusednorm.RMSNorm(8, zero_centered_weight=True)
    assert torch.equal(a.weight, torch.zeros(8))
    x = torch.randn(3, 8)
    torch.testing.assert_close(a(x), torch.nn.RMSNorm(8)(x))
    assert "zero_centered_weight=True" in repr(a)
