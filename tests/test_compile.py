"""fusednorm under torch.compile(fullgraph=True) and torch.library.opcheck."""

import pytest
import torch
from helpers import BACKENDS, device_for, randn

import fusednorm
from fusednorm import row_norm


def fwd_args(x, w, b, r, p=0.0, is_rms=False, backend="cpu"):
    return (x, w, b, r, 1e-5, is_rms, False, p, torch.tensor(5), torch.float32,
            torch.float32 if r is not None or p > 0 else None, None, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_row_norm_ops(backend):
    dev = device_for(backend)
    x, r = randn(6, 40, device=dev), randn(6, 40, device=dev)
    w, b = randn(40, device=dev), randn(40, device=dev)
    for args in (fwd_args(x, w, b, None, backend=backend),
                 fwd_args(x, w, None, r, 0.3, True, backend=backend),
                 fwd_args(x[:, :32], None, None, None, backend=backend)):
        torch.library.opcheck(row_norm._fwd_op, args)
        y, h, mean, rstd = row_norm._fwd_op(*args)
        has_res = args[3] is not None
        saved = h if h.numel() else args[0]
        bwd = (randn(*y.shape, device=dev), saved, args[1], args[2], mean, rstd,
               randn(*y.shape, device=dev) if has_res else None, 1e-5, args[5], False, args[7],
               args[8], has_res, torch.float32, args[10], True, False, backend)
        torch.library.opcheck(row_norm._bwd_op, bwd)


class Block(torch.nn.Module):
    """Every option that changes the backward: dropout (its mask regenerated from the seed),
    the memory-saving mode, the zero-centred weight, and a gradient flowing into h."""

    def __init__(self, d=32):
        super().__init__()
        self.ln = fusednorm.LayerNorm(d, dropout_p=0.3, zero_centered_weight=True,
                                      memory_efficient=True)
        self.rms = fusednorm.RMSNorm(d, eps=1e-6)
        self.lin = torch.nn.Linear(d, d)
        with torch.no_grad():
            self.ln.weight.normal_(0, 0.1)  # 1 + w: away from 0, as memory_efficient needs
            self.ln.bias.normal_()

    def forward(self, x, r):
        y, h = self.ln(x, residual=r)
        return self.rms(self.lin(y)) + h


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_block_matches_eager(compiler):
    torch._dynamo.reset()
    model = Block()
    x, r = randn(4, 8, 32, requires_grad=True), randn(4, 8, 32, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    outs = []
    # the dropout seed comes from torch's generator in both (inductor would draw it from its own)
    with torch._inductor.config.patch(fallback_random=True):
        for fn in (model, compiled):
            for t in [x, r, *model.parameters()]:
                t.grad = None
            torch.manual_seed(5)
            y = fn(x, r)
            y.square().sum().backward()
            outs.append([y.detach()] + [t.grad.clone() for t in [x, r, *model.parameters()]])
    assert 0 < (outs[0][1] == 0).float().mean() < 0.6  # dropout did drop (x's gradient is 0)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compiled_dropout_has_no_graph_break():
    torch._dynamo.reset()

    def f(x, r):
        # and without a residual y alone, as in eager mode
        return (fusednorm.layer_norm(x, (16,), residual=r, dropout_p=0.5),
                fusednorm.layer_norm(x, (16,), dropout_p=0.5))

    x, r = randn(8, 16), randn(8, 16)
    torch.manual_seed(2)
    (y, h), y_alone = torch.compile(f, fullgraph=True, backend="aot_eager")(x, r)
    kept = (h - r).abs() > 1e-6
    assert 0 < kept.float().mean() < 1
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(h, (16,)))
    assert type(y_alone) is torch.Tensor
    torch.manual_seed(2)
    torch.testing.assert_close(y_alone, f(x, r)[1])  # the same seeds drawn, the same masks
