"""fusednorm under torch.compile(fullgraph=True) and torch.library.opcheck."""

import contextlib
import re

import pytest
import torch
from helpers import BACKENDS, assert_close_to_ref, device_for, randn
from torch import nn

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
    ops = [(row_norm._fwd_op, row_norm._bwd_op)]
    twins = [(row_norm._fwd_op_fusable, row_norm._bwd_op_fusable)]  # same implementation, fake
    for args, pairs in ((fwd_args(x, w, b, None, backend=backend), ops + twins),
                        (fwd_args(x, w, None, r, 0.3, True, backend=backend), ops),
                        (fwd_args(x[:, :32], None, None, None, backend=backend), ops)):
        for fwd_op, bwd_op in pairs:
            torch.library.opcheck(fwd_op, args)
            y, h, mean, rstd = fwd_op(*args)
            has_res = args[3] is not None
            saved = h if h.numel() else args[0]
            bwd = (randn(*y.shape, device=dev), saved, args[1], args[2], mean, rstd,
                   randn(*y.shape, device=dev) if has_res else None, 1e-5, args[5], False,
                   args[7], args[8], has_res, torch.float32, args[10], True, False, backend)
            torch.library.opcheck(bwd_op, bwd)


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
        for fn in (model, compiled, compiled):
            for t in [x, r, *model.parameters()]:
                t.grad = None
            torch.manual_seed(5)
            with kernel_calls() as calls:
                y = fn(x, r)
                y.square().sum().backward()
            outs.append([y.detach()] + [t.grad.clone() for t in [x, r, *model.parameters()]])
    assert 0 < (outs[0][1] == 0).float().mean() < 0.6  # dropout did drop (x's gradient is 0)
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(outs[1], outs[2]):  # run to run, on either path: the same bits
        assert torch.equal(a, b)
    # Inductor decomposes the plain RMSNorm; the LayerNorm with dropout keeps our kernels
    expected = 1 if compiler == "inductor" else 2
    assert calls == {"fwd": expected, "bwd": expected}


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


# --- what Inductor sees: the decomposed path and the kernel path --------------------------------
# Under use_backend("auto") Inductor replaces the row norms by a decomposition it fuses (on the
# CPU); under a backend chosen by hand our kernels stay in the graph. The backend
# "aot_eager_decomp_partition" applies Inductor's decompositions, ours included, without
# compiling C++: each path at the cost of a small trace.
DECOMPOSING = "aot_eager_decomp_partition"


@contextlib.contextmanager
def kernel_calls():
    """Counts the CPU kernels' contract calls (what the registered ops run), per direction."""
    from fusednorm.cpu import layer_norm as cpu

    calls = {"fwd": 0, "bwd": 0}
    real = cpu.norm_fwd, cpu.norm_bwd

    def fwd(*args, **kwargs):
        calls["fwd"] += 1
        return real[0](*args, **kwargs)

    def bwd(*args, **kwargs):
        calls["bwd"] += 1
        return real[1](*args, **kwargs)

    cpu.norm_fwd, cpu.norm_bwd = fwd, bwd
    try:
        yield calls
    finally:
        cpu.norm_fwd, cpu.norm_bwd = real


def several_norms(x, r, w, b, w32):
    """One of each branch of the decompositions: residual, bias, no weight, 1 + w, x̂ rounded
    before a float32 weight (Hugging Face's Llama cast order), a gradient into h."""
    y1, h = fusednorm.layer_norm(x, (x.shape[-1],), w, b, residual=r)
    y2 = fusednorm.rms_norm(h, (x.shape[-1],), w, 1e-6, zero_centered_weight=True)
    y3 = fusednorm.rms_norm(x, (x.shape[-1],), w32, 1e-6, xhat_dtype=x.dtype)
    y4 = fusednorm.layer_norm(h, (x.shape[-1],))
    return y1, h, y2, y3, y4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decomposed_norms_match_the_reference(dtype):
    """Values and every gradient of the decomposed path, within the tolerance rule of torch's
    own ops (the composite on torch's kernels) against float64; no kernel runs."""
    inputs = [randn(5, 3, 40, dtype=dtype), randn(5, 3, 40, dtype=dtype),
              randn(40, dtype=dtype, mean=1.0), randn(40, dtype=dtype), randn(40, mean=1.0)]
    dys = None
    results = []
    torch._dynamo.reset()
    compiled = torch.compile(several_norms, backend=DECOMPOSING)
    for fn, setting, cast in ((compiled, "auto", None), (several_norms, "torch", None),
                              (several_norms, "torch", torch.float64)):
        leaves = [(t.to(cast) if cast else t).detach().requires_grad_() for t in inputs]
        with fusednorm.use_backend(setting), kernel_calls() as calls:
            outs = fn(*leaves)
            dys = dys or [randn(*o.shape, dtype=o.dtype) for o in outs]
            grads = torch.autograd.grad(outs, leaves, [d.to(o.dtype) for d, o in zip(dys, outs)])
        assert calls == {"fwd": 0, "bwd": 0}
        results.append([o.detach() for o in outs] + list(grads))
    names = ["y1", "h", "y2", "y3", "y4", "dx", "dr", "dw", "db", "dw32"]
    for name, ours, theirs, ref in zip(names, *results):
        assert ours.dtype == theirs.dtype, name
        # several norms in a row: ref is not the exact value each output rounds
        assert_close_to_ref(ours, theirs, ref, what=name, ulps=None)


def test_backend_chosen_by_hand_keeps_the_kernels_and_batch_invariance():
    """use_backend("cpu") under Inductor's decompositions: our kernels run, and a row's output
    is bitwise the same alone or in a batch (at N = 65536 Inductor's own decomposition is not:
    its reductions split a long row across threads by the number of rows)."""
    torch._dynamo.reset()
    norm = nn.Sequential(fusednorm.RMSNorm(65536, eps=1e-6))
    compiled = torch.compile(norm, backend=DECOMPOSING)
    x = randn(6, 65536)
    with fusednorm.use_backend("cpu"), kernel_calls() as calls:
        batch = compiled(x)
        rows = [compiled(x[i:i + 1]) for i in (0, 3, 5)]
    assert calls["fwd"] == 4
    for i, row in zip((0, 3, 5), rows):
        assert torch.equal(row[0], batch[i])


@pytest.mark.parametrize("setting", ["auto", "cpu"])
def test_bad_input_under_compile_raises_what_torch_raises(setting):
    """The checks run while the graph is traced, whichever path follows: torch's own error for
    what torch checks (under compile dynamo wraps it, for torch's op as for ours), fusednorm's
    own for its options (fullgraph=False: as in eager mode)."""
    x, w = randn(4, 8), randn(7)

    def error_of(fn, *args):
        torch._dynamo.reset()
        with pytest.raises(Exception) as info, fusednorm.use_backend(setting):
            torch.compile(fn, backend="aot_eager")(*args)
        # dynamo's wrapper names the error torch's check raised on fake tensors
        return type(info.value), re.search(r"got (\w+\(.*\))", str(info.value)).group(1)

    ours = error_of(lambda x, w: fusednorm.layer_norm(x, (8,), w), x, w)
    theirs = error_of(lambda x, w: torch.nn.functional.layer_norm(x, (8,), w), x, w)
    assert ours == theirs and "Expected weight to be of same shape" in ours[1]
    with (pytest.raises(RuntimeError, match=r"residual must be .* got torch.float32 \[4, 7\]"),
          fusednorm.use_backend(setting)):
        torch.compile(lambda x, r: fusednorm.rms_norm(x, (8,), residual=r),
                      backend="aot_eager")(x, randn(4, 7))
