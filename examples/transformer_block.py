"""A Transformer block (d_model 512, 8 heads) on (4, 100, 512), Post-LN and Pre-LN, trained a
few steps with fusednorm.LayerNorm and, from the same initial weights, with torch.nn.LayerNorm."""

import copy

import torch
from torch import nn

import fusednorm


class Block(nn.Module):
    def __init__(self, norm, d_model=512, heads=8, pre_ln=False):
        super().__init__()
        self.pre_ln = pre_ln
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                nn.Linear(4 * d_model, d_model))
        self.norm1, self.norm2 = norm(d_model), norm(d_model)

    def forward(self, x):
        if self.pre_ln:  # x + sublayer(norm(x))
            h = self.norm1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.ff(self.norm2(x))
        # Post-LN, the original Transformer: norm(x + sublayer(x))
        x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
        return self.norm2(x + self.ff(x))


def train(block, steps=3):
    torch.manual_seed(1)
    opt = torch.optim.SGD(block.parameters(), lr=0.01)
    for _ in range(steps):
        x = torch.randn(4, 100, 512)
        loss = block(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def with_torch_norms(block):
    twin = copy.deepcopy(block)
    for name in ("norm1", "norm2"):
        theirs = nn.LayerNorm(512)
        theirs.load_state_dict(getattr(block, name).state_dict())
        setattr(twin, name, theirs)
    return twin


def main():
    for pre_ln in (False, True):
        torch.manual_seed(0)
        ours = Block(fusednorm.LayerNorm, pre_ln=pre_ln)
        theirs = with_torch_norms(ours)
        loss_ours, loss_theirs = train(ours), train(theirs)
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
        kind = "Pre-LN " if pre_ln else "Post-LN"
        print(f"{kind} block, 3 SGD steps: loss {loss_ours:.6f} (torch.nn.LayerNorm "
              f"{loss_theirs:.6f}); all weights match")


if __name__ == "__main__":
    main()
