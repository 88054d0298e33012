"""DTensor tensor and sequence parallelism (gloo, CPU): torchtitan's Llama plan, SequenceParallel
on the norms and Colwise/Rowwise on the linears, over a model built with fusednorm's modules,
the same model with torch's norms patched by `fusednorm.patch`, and the fused-residual model;
2 processes, and a 2-D mesh (FSDP2 × TP) on 4. Each is compared with the same model on
torch's norms under the same plan: outputs, every gradient, and the placements of the norm
weights' gradients (Partial: DTensor all-reduces them as it does torch's)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_distributed import run_workers
from torch import nn

import fusednorm

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")
DIM, HEADS, LAYERS, VOCAB = 32, 4, 2, 64


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(DIM, DIM, bias=False) for _ in range(4))

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (w(x).view(b, s, -1, DIM // HEADS).transpose(1, 2)
                   for w in (self.wq, self.wk, self.wv))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w3 = nn.Linear(DIM, 2 * DIM, bias=False), nn.Linear(DIM, 2 * DIM,
                                                                           bias=False)
        self.w2 = nn.Linear(2 * DIM, DIM, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, norm, fused):
        super().__init__()
        self.attention_norm, self.ffn_norm = norm(DIM, eps=1e-6), norm(DIM, eps=1e-6)
        self.attention, self.feed_forward = Attention(), FeedForward()
        self.fused = fused

    def forward(self, x, residual=None):
        if not self.fused:
            h = x + self.attention(self.attention_norm(x))
            return h + self.feed_forward(self.ffn_norm(h))
        normed, residual = self.attention_norm(x, residual=residual)  # residual + x, one pass
        normed, residual = self.ffn_norm(self.attention(normed), residual=residual)
        return self.feed_forward(normed), residual


class Llama(nn.Module):
    def __init__(self, norm=nn.RMSNorm, fused=False):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block(norm, fused) for _ in range(LAYERS))
        self.norm = norm(DIM, eps=1e-6)
        self.output = nn.Linear(DIM, VOCAB, bias=False)
        self.fused = fused

    def forward(self, ids):
        x = self.tok_embeddings(ids)
        if not self.fused:
            for layer in self.layers:
                x = layer(x)
            return self.output(self.norm(x))
        residual = torch.zeros_like(x)
        for layer in self.layers:
            x, residual = layer(x, residual)
        return self.output(self.norm(x, residual=residual)[0])


def _torchtitan_plan(model, mesh):
    """torchtitan's tensor and sequence parallel plan for its Llama."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    parallelize_module(model, mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    })
    for layer in model.layers:
        parallelize_module(layer, mesh, {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1),),
                                            desired_input_layouts=(Replicate(),)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),),
                                               desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward.w3": ColwiseParallel(),
        })


def _build(variant):
    """The same weights for every variant (torch.manual_seed before each)."""
    torch.manual_seed(0)
    if variant == "torch":
        model = Llama()
    elif variant == "modules":
        model = Llama(fusednorm.RMSNorm)
    elif variant == "patched":
        model = Llama()
        fusednorm.patch(model)
    else:
        model = Llama(fusednorm.RMSNorm, fused=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _step(model, mesh_for_tp, dp_mesh=None):
    _torchtitan_plan(model, mesh_for_tp)
    if dp_mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (4, 8))
    target = torch.randn(4, 8, VOCAB)
    out = model(ids)
    F.mse_loss(out, target).backward()
    norm_grads = {n: tuple(map(repr, p.grad.placements)) for n, p in model.named_parameters()
                  if "norm" in n and dp_mesh is None}
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    return out.detach(), grads, norm_grads


def _tensor_parallel(rank, variants, world):
    from torch.distributed.device_mesh import init_device_mesh

    if world == 2:
        mesh, dp = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)), None
    else:
        mesh2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        mesh, dp = mesh2d["tp"], mesh2d["dp"]
    return {v: _step(_build(v), mesh, dp) for v in ("torch", *variants)}


def _assert_as_torchs(results, variant, world):
    out, grads, placements = results[variant]
    ref_out, ref_grads, ref_placements = results["torch"]
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5, msg=variant)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6,
                                   msg=f"{variant} {name}")
    assert placements == ref_placements  # Partial(sum), reduced by DTensor as torch's are
    if world == 2:
        assert set(ref_placements.values()) == {("Partial(sum)",)}, ref_placements


def _two_processes(rank, variants, patches):
    """Everything compared on one pair of processes (starting them is most of the time)."""
    return (_tensor_parallel(rank, variants, 2),
            _hugging_face_tensor_parallel(rank, patches) if patches else None)


def test_tensor_and_sequence_parallel_match_torchs_norms(request, tmp_path):
    """fusednorm's modules, torch's norms patched, the fused residual; Hugging Face's Llama
    patched by fusednorm.patch, its norms alone and with fuse_residual."""
    variants = ("modules", "patched", "fused")
    patches = ("norms", "fuse_residual") if _has_transformers() else ()
    results, hugging_face = run_workers(_two_processes, request, tmp_path, variants, patches)
    for variant in variants:
        _assert_as_torchs(results, variant, 2)
    if hugging_face is not None:
        _assert_hugging_face_as_unpatched(hugging_face, patches)


def test_fsdp2_by_tensor_parallel_on_a_2d_mesh(request, tmp_path):
    results = run_workers(_tensor_parallel, request, tmp_path, ("fused",), 4, world=4)
    _assert_as_torchs(results, "fused", 4)


def _hugging_face_llama(patch):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=DIM, intermediate_size=2 * DIM,
                            num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    model = tf.LlamaForCausalLM(config)
    if patch is not None:
        fusednorm.patch(model, fuse_residual=patch == "fuse_residual")
    return model


def _hugging_face_plan(model, mesh):
    """torchtitan's plan on Hugging Face's module names; the attention takes its input as a
    keyword."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    plan = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate(),
                                                  output_layouts=Shard(1)),
            "model.norm": SequenceParallel(),
            "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())}
    for i in range(LAYERS):
        layer = f"model.layers.{i}."
        plan |= {
            layer + "input_layernorm": SequenceParallel(),
            layer + "self_attn": PrepareModuleInput(
                input_kwarg_layouts={"hidden_states": Shard(1)},
                desired_input_kwarg_layouts={"hidden_states": Replicate()}),
            **{layer + f"self_attn.{p}_proj": ColwiseParallel() for p in "qkv"},
            layer + "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            layer + "post_attention_layernorm": SequenceParallel(),
            layer + "mlp": PrepareModuleInput(input_layouts=(Shard(1),),
                                              desired_input_layouts=(Replicate(),)),
            layer + "mlp.gate_proj": ColwiseParallel(),
            layer + "mlp.up_proj": ColwiseParallel(),
            layer + "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        }
    parallelize_module(model, mesh, plan)


def _hugging_face_tensor_parallel(rank, patches):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 8))
    positions = torch.arange(8)  # the sequence's own: each rank holds half of it
    results = {}
    for variant in (None, *patches):
        model = _hugging_face_llama(variant)
        _hugging_face_plan(model, mesh)
        logits = model(input_ids=ids, position_ids=positions[None], cache_position=positions,
                       use_cache=False).logits
        logits.square().mean().backward()
        results[variant] = (logits.detach(), {n: p.grad.full_tensor()
                                              for n, p in model.named_parameters()})
    return results


def _has_transformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


def _assert_hugging_face_as_unpatched(results, patches):
    ref_logits, ref_grads = results[None]
    for patch in patches:
        logits, grads = results[patch]
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5, msg=patch)
        assert grads.keys() == ref_grads.keys()
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6,
                                       msg=f"{patch} {name}")
