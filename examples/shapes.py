"""Inputs of any rank: (batch, seq, features) and channels-last images (batch, h, w, channels)."""

import torch

import fusednorm

torch.manual_seed(0)
for shape in [(2, 10, 64), (2, 8, 8, 128)]:
    x = torch.randn(shape)
    ln = fusednorm.LayerNorm(shape[-1])
    with torch.no_grad():  # non-trivial parameters, so that the comparison means something
        ln.weight.normal_()
        ln.bias.normal_()
    expected = torch.nn.LayerNorm(shape[-1])
    expected.load_state_dict(ln.state_dict())
    y = ln(x)
    torch.testing.assert_close(y, expected(x))
    print(f"LayerNorm({shape[-1]}) on {tuple(shape)} -> {tuple(y.shape)}: matches torch.nn.LayerNorm")
