"""fusednorm.patch on diffusers' UNet2DModel and AutoencoderKL (tiny configs, random weights, no
download): every GroupNorm replaced, and the output and every parameter's gradient those of the
unpatched model, by the tolerance rule against the model in float64; in both memory formats
(channels_last runs the channels-last kernels)."""

import copy

import pytest
import torch
from helpers import assert_close_to_ref

import fusednorm

diffusers = pytest.importorskip("diffusers")


def tiny(name):
    """(model, inputs): two levels of 32 and 64 channels (GroupNorm's 32 groups), attention in
    one of them."""
    if name == "unet":
        model = diffusers.UNet2DModel(
            sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"))
        return model, (torch.randn(2, 3, 8, 8), torch.tensor([10, 500]))
    model = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2)
    return model, (torch.randn(2, 3, 8, 8),)


def run(model, inputs):
    """The output and every parameter's gradient of a fixed random loss."""
    model.zero_grad(set_to_none=True)
    out = model(*inputs).sample
    torch.manual_seed(1)
    (out * torch.randn(out.shape)).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("fuse", [False, True], ids=["norms", "silu-fused"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("name", ["unet", "vae"])
def test_patched_model_matches_unpatched(name, channels_last, fuse):
    """(fuse: patch(fuse_activation=True), each ResNet block's two GroupNorms and the output
    head's computing the SiLU after them.)"""
    torch.manual_seed(0)
    model, inputs = tiny(name)
    with torch.no_grad():  # norm weights away from their initial 1 and 0: catches a swap
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        inputs = (inputs[0].contiguous(memory_format=torch.channels_last),) + inputs[1:]
    reference = copy.deepcopy(model)
    exact = copy.deepcopy(model).double()
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm)]

    report = fusednorm.patch(model, fuse_activation=fuse)
    assert sorted(report.replaced) == sorted(norms) and len(norms) > 5
    fused = sorted(n for n in norms if n.endswith(("norm1", "norm2", "conv_norm_out")))
    assert sorted(report.fused_activation) == (fused if fuse else [])
    assert not any(type(m) is torch.nn.GroupNorm for m in model.modules())
    out, grads = run(model, inputs)
    ref_out, ref_grads = run(reference, inputs)
    out64, grads64 = run(exact, tuple(t.double() if t.is_floating_point() else t for t in inputs))
    # (some gradients are zero but for rounding, a key's bias in attention for one: both
    # libraries' are noise there, which the rule's atol covers)
    assert_close_to_ref(out, ref_out, out64, what="output")
    assert grads.keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        assert_close_to_ref(grads[n], g, grads64[n], what=n)
