"""elementwise_affine=False: no learnable parameters, weight and bias are None."""

import torch

import fusednorm

torch.manual_seed(0)
ln = fusednorm.LayerNorm(64, elementwise_affine=False)
assert ln.weight is None and ln.bias is None and not list(ln.parameters())
x = torch.randn(8, 64)
torch.testing.assert_close(ln(x), torch.nn.LayerNorm(64, elementwise_affine=False)(x))
print("LayerNorm(64, elementwise_affine=False): no parameters; state_dict", dict(ln.state_dict()))
