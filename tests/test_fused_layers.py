"""patch(model, fuse_residual=True): Hugging Face decoder layers with the residual add fused into
the norm; the model's logits, loss and gradients are the unpatched model's, by the tolerance rule
against the model in float64. Tiny configs (2 layers, width 32): the layer code is the same at
any size."""

import copy
import importlib

import pytest
import torch
from helpers import assert_close_to_ref
from torch import nn

from fusednorm.patch import HFNorm, patch, unpatch

patch_module = importlib.import_module("fusednorm.patch")  # (fusednorm.patch is the function)

transformers = pytest.importorskip("transformers")
V = 64  # vocabulary
DECODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": V,
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
# family -> (model class, config class, extra config, the layer's norms whose add is fused)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}, ["post_attention_layernorm"]),
    "mistral": ("MistralForCausalLM", "MistralConfig", {}, ["post_attention_layernorm"]),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}, ["post_attention_layernorm"]),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {"head_dim": 16}, ["post_attention_layernorm"]),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {"head_dim": 16}, ["post_attention_layernorm"]),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {"head_dim": 16},
               ["pre_feedforward_layernorm"]),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {}, ["post_attention_layernorm"]),
}


def tiny(family, dtype=torch.float32, **config):
    model_cls, config_cls, extra, _ = FAMILIES[family]
    cfg = getattr(transformers, config_cls)(**{**DECODER, **extra, **config})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).to(dtype).eval()
    with torch.no_grad():  # norm weights away from their initial 1 (or 0): catches a swap
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model


def run(model, ids):
    """Logits, loss and every parameter's gradient of the loss."""
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return ([out.logits.detach(), out.loss.detach()]
            + [p.grad for p in model.parameters()])


def assert_matches_unpatched(ours, theirs, exact, ids, what):
    names = ["logits", "loss"] + [n for n, _ in theirs.named_parameters()]
    for name, a, b, r in zip(names, run(ours, ids), run(theirs, ids), run(exact, ids)):
        # a whole model: no single rounding to bound element by element
        assert_close_to_ref(a, b, r, dtype=b.dtype, what=f"{what} {name}", ulps=None)


class FusedCalls:
    """Counts the norm calls that take a residual (the fused add), wherever they run."""

    def __init__(self, monkeypatch):
        self.count = 0
        real = patch_module.rms_norm

        def counting(*args, **kwargs):
            self.count += kwargs.get("residual") is not None
            return real(*args, **kwargs)

        monkeypatch.setattr(patch_module, "rms_norm", counting)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_model_matches_unpatched(family, dtype, monkeypatch):
    theirs = tiny(family, dtype)
    exact = copy.deepcopy(theirs).double()
    ours = copy.deepcopy(theirs)
    params = [id(p) for p in ours.parameters()]
    layers = dict(ours.named_modules())
    report = patch(ours, fuse_residual=True)
    norms = FAMILIES[family][3]
    assert report.fused_residual == {f"model.layers.{i}": theirs.model.layers[i].__class__.__name__
                                     for i in range(2)}
    assert "fused the residual add in" in str(report)
    assert [id(p) for p in ours.parameters()] == params
    assert all(ours.model.layers[i] is layers[f"model.layers.{i}"] for i in range(2))
    calls = FusedCalls(monkeypatch)
    ids = torch.randint(0, V, (2, 8))
    assert_matches_unpatched(ours, theirs, exact, ids, family)
    assert calls.count == 2 * len(norms)  # the fused path ran, once per layer and norm

    restored = unpatch(ours)
    assert all(type(layer) is type(theirs.model.layers[0]) for layer in ours.model.layers)
    assert {f"model.layers.{i}" for i in range(2)} <= set(restored)
    calls.count = 0
    torch.testing.assert_close(run(ours, ids)[0], run(theirs, ids)[0], rtol=0, atol=0)
    assert calls.count == 0


# One compiled check per layer code the families share (Llama's covers Mistral, Qwen2, Qwen3
# and Gemma; Gemma2's norms add 1 + w as Gemma's), in both dtypes between them, on one layer
# (compiling costs per layer). The backend applies Inductor's decompositions (ours included)
# without compiling C++: the numerics of the default compiled path at a fraction of the compile
# time (tests/test_compile.py runs Inductor itself).
@pytest.mark.parametrize("family,dtype", [("llama", torch.float32), ("gemma2", torch.bfloat16),
                                          ("phi3", torch.float32)], ids=str)
def test_compiled_fused_model_matches_unpatched(family, dtype, monkeypatch):
    theirs = tiny(family, dtype, num_hidden_layers=1)
    exact = copy.deepcopy(theirs).double()
    ours = copy.deepcopy(theirs)
    patch(ours, fuse_residual=True)
    calls = FusedCalls(monkeypatch)
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="aot_eager_decomp_partition")
    assert_matches_unpatched(compiled, theirs, exact, torch.randint(0, V, (2, 8)), family)
    assert calls.count == 1  # traced once: one layer, one fused norm


def layer_call(model):
    """A decoder layer of `model` and the arguments its model passes it."""
    layer = model.model.layers[0]
    h = torch.randn(2, 8, model.config.hidden_size)
    positions = torch.arange(8)[None]
    return layer, (h,), {"position_embeddings": model.model.rotary_emb(h, positions),
                         "position_ids": positions}


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_fused_layer_has_no_graph_break(family):
    model = tiny(family)
    layer, args, kwargs = layer_call(model)
    expected = layer(*args, **kwargs)
    torch._dynamo.reset()
    torch.compile(layer, fullgraph=True, backend="eager")(*args, **kwargs)  # none unpatched
    patch(model, fuse_residual=True)
    torch._dynamo.reset()
    got = torch.compile(layer, fullgraph=True, backend="eager")(*args, **kwargs)
    torch.testing.assert_close(got, expected)


def test_unknown_decoder_layer_is_refused_before_anything_changes():
    llama_layer = type(tiny("llama").model.layers[0])

    class ScaledLayer(llama_layer):  # a changed forward under another name
        def forward(self, hidden_states, **kwargs):
            return 2 * super().forward(hidden_states, **kwargs)

    model = tiny("llama")
    model.model.layers[1].__class__ = ScaledLayer
    before = dict(model.named_modules())
    with pytest.raises(NotImplementedError, match=r"model\.layers\.1 \(ScaledLayer\).*"
                       r"ScaledLayer\.forward\) is not a decoder layer fusednorm knows"):
        patch(model, fuse_residual=True)
    assert dict(model.named_modules()) == before
    assert type(model.model.layers[0]) is llama_layer
    assert type(model.model.layers[1]) is ScaledLayer

    class SameLayer(llama_layer):  # a subclass that keeps the forward is fused
        pass

    model.model.layers[1].__class__ = SameLayer
    report = patch(model, fuse_residual=True)
    assert report.fused_residual == {"model.layers.0": llama_layer.__name__,
                                     "model.layers.1": "SameLayer"}
    assert isinstance(model.model.layers[1], SameLayer)
    unpatch(model)
    assert type(model.model.layers[1]) is SameLayer


def test_what_cannot_be_fused_raises():
    with pytest.raises(NotImplementedError, match="found no Hugging Face decoder layer"):
        patch(nn.Sequential(nn.LayerNorm(8)), fuse_residual=True)
    model = tiny("llama")
    model.model.layers[0].post_attention_layernorm.register_forward_hook(lambda *a: None)
    with pytest.raises(NotImplementedError, match="post_attention_layernorm has hooks"):
        patch(model, fuse_residual=True)
    model = tiny("llama")
    model.model.layers[0].forward = model.model.layers[0].forward
    with pytest.raises(NotImplementedError, match="forward was replaced on the instance"):
        patch(model, fuse_residual=True)
    assert not any(isinstance(m, HFNorm) for m in model.modules())


def test_phi3_dropout_and_gradient_checkpointing_stay_torch_s():
    """In training: Phi3's residual dropout is torch's module (its mask from torch's generator)
    and runs before the fused add; gradient checkpointing re-runs the fused forward."""
    theirs = tiny("phi3", resid_pdrop=0.3).train()
    ours = copy.deepcopy(theirs)
    patch(ours, fuse_residual=True)
    ids = torch.randint(0, V, (2, 8))
    for model in (theirs, ours):
        model.gradient_checkpointing_enable()
    results = []
    for model in (theirs, ours):
        torch.manual_seed(3)
        results.append(run(model, ids))
    for name, a, b in zip(["logits", "loss"] + [n for n, _ in theirs.named_parameters()],
                          *results):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def test_mixed_dtypes_add_as_torch_does():
    """A residual of another dtype than the sublayer's output: torch's add promotes, so h is
    the promoted sum, not rounded to the residual's dtype."""
    norm = nn.Sequential(type(tiny("llama").model.norm)(16))
    patch(norm)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    r = torch.randn(3, 16, dtype=torch.float32)
    y, h = norm[0](x, residual=r)
    assert h.dtype == torch.float32 and torch.equal(h, r + x)
    torch.testing.assert_close(y, norm[0](r + x), rtol=0, atol=0)
