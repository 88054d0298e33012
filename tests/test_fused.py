"""Fused residual-add + dropout + norm, zero-centred weight and the memory-saving mode, against
the unfused composition (add, dropout with the same mask, norm) and the float64 reference."""

import pytest
import torch
import torch.nn.functional as F
from helpers import BACKENDS, assert_close_to_ref, device_for, randn

import fusednorm
from fusednorm._backend import kernels
from fusednorm.reference import add_norm_ref, layer_norm_ref, rms_norm_ref
from fusednorm.row_norm import draw_seed

NORMS = {"layer": (fusednorm.layer_norm, layer_norm_ref), "rms": (fusednorm.rms_norm, rms_norm_ref)}


def keep_mask(backend, seed_from, m, n, p, device):
    """The mask a call made right after torch.manual_seed(seed_from) uses."""
    torch.manual_seed(seed_from)
    seed = draw_seed()
    return kernels(backend, "row_norm").dropout_keep_mask(seed, m, n, p, device)


def unfused_torch(x, r, w, b, mask, p, norm, residual_dtype):
    """The composition the fused op replaces, in torch, in x's dtype."""
    kept = x * mask.to(x.dtype) / (1 - p) if p > 0 else x
    h = (kept + r).to(residual_dtype)
    n = x.shape[-1]
    if residual_dtype != x.dtype:  # torch refuses an h of float32 with bfloat16 parameters
        w, b = (t.to(residual_dtype) if t is not None else None for t in (w, b))
    y = (F.layer_norm(h, (n,), w, b) if norm == "layer" else F.rms_norm(h, (n,), w)).to(x.dtype)
    return y, h


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("residual_in_fp32", [False, True])
def test_add_dropout_norm_all_gradients(backend, norm, dtype, p, residual_in_fp32):
    dev = device_for(backend)
    m, n = 37, 200
    x, r = randn(m, n, dtype=dtype, device=dev), randn(m, n, dtype=dtype, device=dev)
    w, b = randn(n, dtype=dtype, device=dev), randn(n, dtype=dtype, device=dev)
    if norm == "rms":
        b = None
    dy, dh = randn(m, n, dtype=dtype, device=dev), randn(m, n, dtype=dtype, device=dev)
    mask = keep_mask(backend, 3, m, n, p, dev) if p > 0 else None
    residual_dtype = torch.float32 if residual_in_fp32 else dtype
    fused, ref = NORMS[norm]
    eps = 1e-5

    results = []
    for who in ("ours", "torch", "ref"):
        leaves = [t.detach().clone() for t in (x, r, w, b) if t is not None]
        if who == "ref":
            leaves = [t.double() for t in leaves]
        for t in leaves:
            t.requires_grad_()
        xl, rl, wl, bl = leaves + [None] * (4 - len(leaves))
        if who == "ours":
            torch.manual_seed(3)
            with fusednorm.use_backend(backend):
                kw = {"residual": rl, "dropout_p": p, "residual_in_fp32": residual_in_fp32}
                y, h = (fused(xl, (n,), wl, bl, eps, **kw) if norm == "layer"
                        else fused(xl, (n,), wl, eps, **kw))
            assert h.dtype == residual_dtype and y.dtype == dtype
        elif who == "torch":
            y, h = unfused_torch(xl, rl, wl, bl, mask, p, norm, residual_dtype)
        else:
            kwargs = {"normalized_shape": (n,), "weight": wl, "eps": eps}
            if norm == "layer":
                kwargs["bias"] = bl
            y, h = add_norm_ref(xl, rl, mask, p, ref, **kwargs)
        torch.autograd.backward([y, h], [dy.to(y.dtype), dh.to(h.dtype)])
        results.append([y.detach(), h.detach()] + [t.grad for t in leaves])
    names = ["y", "h", "dx", "dresidual", "dweight", "dbias"]
    for name, a, t, rf in zip(names, *results):
        assert_close_to_ref(a, t, rf, dtype=dtype, what=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_fraction_and_scale(backend):
    dev = device_for(backend)
    m, n, p = (256, 512, 0.3) if backend == "cpu" else (32, 256, 0.3)
    x = torch.ones(m, n, device=dev)
    with fusednorm.use_backend(backend):
        _, h = fusednorm.layer_norm(x, (n,), residual=torch.zeros_like(x), dropout_p=p)
    kept = h != 0
    # binomial: the kept fraction is within 5 standard deviations of 1 - p
    sd = (p * (1 - p) / (m * n)) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sd
    torch.testing.assert_close(h[kept], torch.full_like(h[kept], 1 / (1 - p)))
    # the mask is what dropout_keep_mask says, and it differs between rows
    assert kept.float().std(1).min() > 0
    assert not torch.equal(kept[0], kept[1])


def test_manual_seed_reproduces_and_changes_masks():
    x, r = torch.randn(16, 64), torch.randn(16, 64)
    torch.manual_seed(11)
    a = fusednorm.layer_norm(x, (64,), residual=r, dropout_p=0.5)[1]
    torch.manual_seed(11)
    b = fusednorm.layer_norm(x, (64,), residual=r, dropout_p=0.5)[1]
    c = fusednorm.layer_norm(x, (64,), residual=r, dropout_p=0.5)[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_zero_centered_weight(backend, norm):
    dev = device_for(backend)
    x, w = randn(20, 96, dtype=torch.bfloat16, device=dev), randn(96, device=dev) * 0.1
    fused, ref = NORMS[norm]
    with fusednorm.use_backend(backend):
        ours = fused(x, (96,), w, zero_centered_weight=True)
    theirs = (F.layer_norm(x.float(), (96,)) if norm == "layer" else
              F.rms_norm(x.float(), (96,))) * (1 + w)
    assert_close_to_ref(ours, theirs.to(x.dtype), ref(x, (96,), w, zero_centered=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_memory_efficient_gradients(backend, norm):
    dev = device_for(backend)
    x, w, dy = randn(33, 80, device=dev), randn(80, device=dev), randn(33, 80, device=dev)
    fused, _ = NORMS[norm]
    grads = []
    for memory_efficient in (False, True):
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        with fusednorm.use_backend(backend):
            y = fused(xl, (80,), wl, memory_efficient=memory_efficient)
        y.backward(dy)
        grads.append((xl.grad, wl.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def saved_bytes(fn):
    """Bytes of distinct storages autograd keeps for backward while fn() builds the graph."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def test_memory_efficient_saves_memory_in_a_block():
    # norm followed by a Linear: the Linear saves the norm's output anyway, so keeping the output
    # (not the input h) for the norm's backward saves one (M, N) tensor
    lin = torch.nn.Linear(256, 256)
    x, r = torch.randn(64, 256, requires_grad=True), torch.randn(64, 256, requires_grad=True)
    w = torch.randn(256, requires_grad=True)
    sizes = []
    for memory_efficient in (False, True):
        def block(memory_efficient=memory_efficient):
            y, _h = fusednorm.layer_norm(x, (256,), w, residual=r,
                                         memory_efficient=memory_efficient)
            return lin(y)
        sizes.append(saved_bytes(block)[0])
    assert sizes[0] - sizes[1] >= 64 * 256 * 4


class PreLNBlock(torch.nn.Module):
    """x + ff(norm(x)), with the residual add done inside the next norm when fused."""

    def __init__(self, d=64, fused=True):
        super().__init__()
        self.fused = fused
        self.norm1, self.norm2 = fusednorm.LayerNorm(d), fusednorm.LayerNorm(d)
        self.ff1, self.ff2 = torch.nn.Linear(d, d), torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, 1)

    def forward(self, x):
        if self.fused:
            y, h = self.norm1(x, residual=torch.zeros_like(x))
            y, h = self.norm2(self.ff1(y), residual=h)
            return self.head(self.ff2(y) + h)
        h = x
        h = h + self.ff1(self.norm1(h))
        return self.head(h + self.ff2(self.norm2(h)))


def test_pre_ln_block_trains_like_unfused():
    torch.manual_seed(0)
    fused = PreLNBlock(fused=True)
    unfused = PreLNBlock(fused=False)
    unfused.load_state_dict(fused.state_dict())
    for model in (fused, unfused):
        torch.manual_seed(1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(5):
            x, target = torch.randn(32, 64), torch.randn(32, 1)
            loss = F.mse_loss(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (name, p), q in zip(fused.named_parameters(), unfused.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_leaf_gradients_of_x_and_residual_do_not_share_memory():
    # without dropout dresidual equals dx; the backward hands one tensor to both only when
    # that cannot make two .grad attributes share memory
    x, r = randn(4, 32, requires_grad=True), randn(4, 32, requires_grad=True)
    y, _h = fusednorm.layer_norm(x, (32,), residual=r)
    (y * randn(4, 32)).sum().backward()
    assert torch.equal(x.grad, r.grad)
    assert x.grad.data_ptr() != r.grad.data_ptr()
    x.grad.zero_()
    assert r.grad.abs().sum() > 0
