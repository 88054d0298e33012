"""One call signature, one return type: the row norms return ``(y, h)`` exactly when a
``residual`` is passed, and ``y`` alone otherwise, whatever the dropout, the module's mode
(training or eval), the grad mode and the backend."""

import pytest
import torch
from helpers import randn

import fusednorm

N = 32


def calls(norm, residual, p):
    """(what, call) for the functional and the module of one norm, as a user writes them."""
    functional = fusednorm.layer_norm if norm == "layer" else fusednorm.rms_norm
    module = (fusednorm.LayerNorm if norm == "layer" else fusednorm.RMSNorm)(N, dropout_p=p)
    kw = {} if residual is None else {"residual": residual}
    yield "functional", lambda x: functional(x, (N,), dropout_p=p, **kw)
    yield "module.train()", lambda x: module.train()(x, **kw)
    yield "module.eval()", lambda x: module.eval()(x, **kw)


# The return is decided in row_norm.py's shared call path, not by a backend: the CPU kernels and
# the "torch" backend's composite cover its branches (the Triton kernels share the CPU's).
@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["x", "x+residual"])
def test_tuple_exactly_when_a_residual_is_passed(backend, norm, p, with_residual):
    residual = randn(3, N) if with_residual else None
    for what, call in calls(norm, residual, p):
        # every path a call can take: the autograd Functions, the no-grad kernels, the plans
        # reused on a second call of the same signature
        for needs_grad, grad_mode in ((True, True), (False, True), (True, False)):
            x = randn(3, N, requires_grad=needs_grad)
            with fusednorm.use_backend(backend), torch.set_grad_enabled(grad_mode):
                for _ in range(2):
                    out = call(x)
                    where = f"{what}, requires_grad={needs_grad}, grad mode {grad_mode}"
                    if with_residual:
                        assert isinstance(out, tuple) and len(out) == 2, where
                        assert all(type(t) is torch.Tensor for t in out), where
                    else:
                        assert type(out) is torch.Tensor, where
