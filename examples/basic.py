"""The simplest use: LayerNorm over the features of a (4, 10) batch."""

import torch

import fusednorm

torch.manual_seed(0)
x = torch.randn(4, 10)
ln = fusednorm.LayerNorm(10)
y = ln(x)

# the same module in torch, given the same parameters, is the definition
expected = torch.nn.LayerNorm(10)
expected.load_state_dict(ln.state_dict())
torch.testing.assert_close(y, expected(x))
print("LayerNorm(10) on (4, 10): per-row mean", y.mean(-1).abs().max().item(),
      "and variance", y.var(-1, unbiased=False).mean().item())
