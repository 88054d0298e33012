"""The channel norms answer in torch's layout: y (and dx) have the strides of torch's own output
for every arrangement of the input's strides, and y is no view (it can be modified in place).

torch's CPU rules differ by norm (group_norm: the input's suggested memory format; batch_norm:
channels last for channels-last input that is not contiguous; instance_norm: contiguous), and
an output in another layout than torch's fails a view torch's allows and makes the layers after
it run in that layout (a VAE's decoder ran channels last after an attention block's reshape).
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import randn

import fusednorm

NORMS = {
    "group": (lambda x: F.group_norm(x, 2 if x.shape[1] % 2 == 0 else 1),
              lambda x: fusednorm.group_norm(x, 2 if x.shape[1] % 2 == 0 else 1)),
    "batch": (lambda x: F.batch_norm(x, None, None, training=True),
              lambda x: fusednorm.batch_norm(x, None, None, training=True)),
    "instance": (F.instance_norm, fusednorm.instance_norm),
}


def arrangements(shape):
    """x of `shape` in every order of its dims in memory, and with odd strides for its size-1
    dims (a slice x[i:i + 1], an attention block's reshape)."""
    for perm in itertools.permutations(range(len(shape))):
        t = randn(*[shape[p] for p in perm]).permute(*[perm.index(i) for i in range(len(shape))])
        yield t
        if 1 in shape:
            odd = [7 if size == 1 else st for size, st in zip(t.shape, t.stride())]
            yield t.as_strided(t.shape, odd)


SHAPES = [(2, 8, 3, 4), (1, 8, 3, 4), (2, 1, 3, 4), (2, 6, 1, 5), (2, 4, 2, 3, 2), (3, 6, 5)]


def strides_of_sizes(t):
    return [st for st, size in zip(t.stride(), t.shape) if size > 1]


def reference(fn, x, dy):
    """y and dx of torch's op in float64 on a contiguous copy of x (torch 2.13's own batch_norm
    backward is wrong for a (1, C, H, W) channels-last input whose batch stride is not H·W·C)."""
    x64 = x.detach().contiguous().double().requires_grad_()
    y = fn(x64)
    return y, torch.autograd.grad(y, x64, dy.double())[0]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_output_and_gradient_have_torch_strides(norm, shape):
    theirs, ours = NORMS[norm]
    for x in arrangements(shape):
        x = x.detach().requires_grad_()
        dy = randn(*shape)
        want, got = theirs(x), ours(x)
        assert got.stride() == want.stride(), (x.stride(), got.stride(), want.stride())
        (dx_want,) = torch.autograd.grad(want, x, dy)
        (dx_got,) = torch.autograd.grad(got, x, dy)
        # (the gradient's memory order; torch's backward kernels give size-1 dims strides of
        # their own choosing)
        assert strides_of_sizes(dx_got) == strides_of_sizes(dx_want), (x.stride(),
                                                                       dx_got.stride())
        y_ref, dx_ref = reference(theirs, x, dy)
        torch.testing.assert_close(got.double(), y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx_got.double(), dx_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm", NORMS)
def test_output_can_be_modified_in_place(norm):
    # ResNet's BatchNorm -> ReLU(inplace=True), on a layout the kernels do not read in place
    theirs, ours = NORMS[norm]
    x = randn(2, 8, 3, 4).transpose(2, 3).requires_grad_()
    dy = randn(2, 8, 4, 3)
    grads = []
    for fn in (theirs, ours):
        y = fn(x)
        y.relu_()
        grads.append(torch.autograd.grad(y, x, dy)[0])
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("norm", ["group", "batch", "instance"])
def test_compiled_modules_keep_torch_layout(norm):
    # torch.compile(fullgraph=True) traces the layout decisions too (no data-pointer tests)
    module = {"group": fusednorm.GroupNorm(2, 8), "batch": fusednorm.BatchNorm2d(8),
              "instance": fusednorm.InstanceNorm2d(8, affine=True)}[norm]
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    for x in (randn(2, 8, 4, 5).contiguous(memory_format=torch.channels_last),
              randn(2, 8, 5, 4).transpose(2, 3)):
        x = x.requires_grad_()
        dy = randn(2, 8, 4, 5)
        want = module(x)
        got = compiled(x)
        assert got.stride() == want.stride()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got, x, dy)[0],
                                   torch.autograd.grad(want, x, dy)[0])
