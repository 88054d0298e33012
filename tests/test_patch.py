"""fusednorm.patch on built models: the same Parameters and state_dict, the model's numerics."""

import copy

import pytest
import torch
from helpers import assert_close_to_ref, randn
from torch import nn

import fusednorm
from fusednorm.patch import HFNorm, patch, unpatch
from fusednorm.reference import layer_norm_ref, rms_norm_ref

transformers = pytest.importorskip("transformers")
V = 100  # vocabulary


def tiny(name):
    """(model, forward kwargs) from a tiny config: random weights, no download."""
    t = transformers
    ids = torch.randint(0, V, (2, 12))
    decoder = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": V}
    model = {
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(n_layer=2, n_embd=64, n_head=4,
                                                       vocab_size=V, n_positions=32)),
        "bert": lambda: t.BertForMaskedLM(t.BertConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            vocab_size=V, max_position_embeddings=32)),
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**decoder)),
        "qwen3": lambda: t.Qwen3ForCausalLM(t.Qwen3Config(**decoder, head_dim=16)),  # q/k norms
        "gemma": lambda: t.GemmaForCausalLM(t.GemmaConfig(**decoder, head_dim=16)),
        "t5": lambda: t.T5ForConditionalGeneration(t.T5Config(
            d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, vocab_size=V)),
    }[name]().eval()
    with torch.no_grad():  # norm weights away from their initial 1 (or 0): catches a swap
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    kwargs = {"input_ids": ids}
    if name == "t5":
        kwargs["decoder_input_ids"] = ids[:, :7]
    return model, kwargs


def run(model, kwargs):
    """Logits and every parameter's gradient of a fixed random loss."""
    model.zero_grad(set_to_none=True)
    logits = model(**kwargs).logits
    torch.manual_seed(1)
    (logits.float() * torch.randn(logits.shape)).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


EXPECTED = {"gpt2": "LayerNorm", "bert": "LayerNorm", "llama": "LlamaRMSNorm",
            "qwen3": "Qwen3RMSNorm", "gemma": "GemmaRMSNorm", "t5": "T5LayerNorm"}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_patched_model_matches_unpatched(name):
    model, kwargs = tiny(name)
    reference = copy.deepcopy(model)
    norms = {n: m for n, m in model.named_modules() if type(m).__name__ == EXPECTED[name]}
    params = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())

    report = patch(model)
    assert report.replaced == {n: EXPECTED[name] for n in norms} and report.left_alone == {}
    assert all(type(m) is not type(norms[n]) for n, m in model.named_modules() if n in norms)
    assert [id(p) for p in model.parameters()] == params
    assert list(model.state_dict()) == keys
    logits, grads = run(model, kwargs)
    ref_logits, ref_grads = run(reference, kwargs)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-5, msg=n)

    assert unpatch(model) == report.replaced
    assert all(dict(model.named_modules())[n] is m for n, m in norms.items())
    assert [id(p) for p in model.parameters()] == params and list(model.state_dict()) == keys
    assert torch.equal(run(model, kwargs)[0], ref_logits)


def test_bfloat16_llama_keeps_its_cast_order():
    model, kwargs = tiny("llama")
    f64 = run(copy.deepcopy(model).double(), kwargs)[0]
    theirs = copy.deepcopy(model).bfloat16()
    ours = copy.deepcopy(theirs)
    patch(ours)
    with torch.no_grad():
        a, b = ours(**kwargs).logits, theirs(**kwargs).logits
    assert a.dtype == b.dtype == torch.bfloat16
    # a whole model in bfloat16 against float64: no single rounding to check element by element
    assert_close_to_ref(a, b, f64, what="bf16 logits", ulps=None)  # bitwise passes too


# One of each Hugging Face cast order, and each (input, weight) dtype pair that models use.
HF_NORMS = {
    "llama": ("llama", "LlamaRMSNorm", {}),
    "llama4": ("llama4", "Llama4TextRMSNorm", {}),
    "l2": ("llama4", "Llama4TextL2Norm", {}),
    "gemma": ("gemma", "GemmaRMSNorm", {"zero_centered": True}),
    "t5": ("t5", "T5LayerNorm", {}),
    "gpt_oss": ("gpt_oss", "GptOssRMSNorm", {}),
    "helium": ("helium", "HeliumRMSNorm", {}),
    "cohere": ("cohere", "CohereLayerNorm", {"layer": True}),
}
DTYPES = [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
          (torch.float16, torch.float32), (torch.float32, torch.bfloat16),
          (torch.float32, torch.float32), (torch.float64, torch.float64)]


def hf_class(key):
    module, cls, _ = HF_NORMS[key]
    return getattr(getattr(transformers.models, module), f"modeling_{module}").__dict__[cls]


@pytest.mark.parametrize("x_dtype,w_dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("key", list(HF_NORMS))
def test_hf_norm_output_dtype_values_and_grads(key, x_dtype, w_dtype):
    cls, opts = hf_class(key), HF_NORMS[key][2]
    n = 48
    theirs = cls(n) if key != "l2" else cls()
    if key != "l2":
        with torch.no_grad():
            theirs.weight.copy_(1 + 0.3 * torch.randn(n))
        theirs.to(w_dtype)
    ours = nn.Sequential(copy.deepcopy(theirs))
    patch(ours)
    assert isinstance(ours[0], HFNorm)
    x = randn(3, 5, n, dtype=x_dtype, mean=0.5, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    w64 = None if key == "l2" else theirs.weight.detach().double().requires_grad_()
    eps = getattr(theirs, "variance_epsilon", getattr(theirs, "eps", None))
    if opts.get("layer"):
        ref = layer_norm_ref(x64, (n,), w64, None, eps)
    else:
        ref = rms_norm_ref(x64, (n,), w64, eps, zero_centered=opts.get("zero_centered", False))
    dy = randn(*x.shape)
    results = []
    for module in (ours[0], theirs):
        y = module(x)
        x.grad = None
        y.backward(dy.to(y.dtype))
        results.append([y, x.grad] + ([] if key == "l2" else [module.weight.grad]))
        if key != "l2":
            module.weight.grad = None
    ref_grads = torch.autograd.grad(ref, [x64] + ([] if w64 is None else [w64]), dy.double())
    y, y_theirs = results[0][0], results[1][0]
    assert y.dtype == y_theirs.dtype, "output dtype"
    if y.dtype in (torch.float16, torch.bfloat16):
        # the same roundings: bitwise equal but where the statistics differ in the last bit
        # (another cast order differs in ~25% of the elements)
        assert (y != y_theirs).float().mean() < 0.05, "cast order"
    for what, a, b, r in zip(("y", "dx", "dw"), *results, [ref, *ref_grads]):
        assert a.dtype == b.dtype, what
        # ref is the plain norm; each class rounds where its cast order says (checked against
        # the class itself above), so no element-by-element bound against ref
        assert_close_to_ref(a, b, r, what=f"{key} {what}", ulps=None)


def test_hf_norm_compiles_without_graph_breaks():
    norm = nn.Sequential(hf_class("llama")(32))
    patch(norm)
    x = randn(4, 32, dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(norm, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), norm(x))


def test_recognised_by_code_not_name_and_unknown_norms_reported():
    class LlamaCopy(nn.Module):  # Llama's code under another name, with other comments
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))
            self.variance_epsilon = 1e-6

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            """A docstring of our own."""
            input_dtype = hidden_states.dtype
            hidden_states = hidden_states.to(torch.float32)  # upcast
            variance = hidden_states.pow(2).mean(-1, keepdim=True)
            hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
            return self.weight * hidden_states.to(input_dtype)

    class LlamaRMSNorm(LlamaCopy):  # a known name, changed code: not patched
        def forward(self, hidden_states):
            h = hidden_states.float()
            return self.weight * (h / (h.pow(2).mean(-1, keepdim=True).sqrt() + 1e-6))

    class ChannelsFirstLayerNorm(nn.LayerNorm):  # a subclass of a torch norm
        def forward(self, x):
            return super().forward(x.transpose(1, -1)).transpose(1, -1)

    model = nn.ModuleDict({"copy": LlamaCopy(8), "named": LlamaRMSNorm(8),
                           "cf": ChannelsFirstLayerNorm(8), "lrn": nn.LocalResponseNorm(2),
                           "block": nn.Sequential(nn.Linear(8, 8))})
    before = dict(model.named_modules())
    report = patch(model)
    assert report.replaced == {"copy": "LlamaCopy"}
    assert report.left_alone == {"named": "LlamaRMSNorm", "cf": "ChannelsFirstLayerNorm",
                                 "lrn": "LocalResponseNorm"}
    assert all(model[k] is before[k] for k in report.left_alone)
    assert "left alone LlamaRMSNorm x1" in str(report)
    assert patch(model).replaced == {}  # a second patch finds nothing new


def test_torch_norms_of_every_kind_in_training():
    """Each torch norm fusednorm exports a drop-in for is replaced (the others are reported);
    outputs, gradients and running statistics stay torch's."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GroupNorm(2, 8),
        nn.InstanceNorm2d(8, affine=True, track_running_stats=True), nn.Flatten(2),
        nn.LayerNorm(36), nn.RMSNorm(36), nn.Flatten(1), nn.BatchNorm1d(288))
    reference = copy.deepcopy(net)
    exact = copy.deepcopy(net).double()  # six norms in a row amplify rounding: judge by float64
    report = patch(net)
    kinds = {str(i): type(m).__name__ for i, m in enumerate(reference) if "Norm" in
             type(m).__name__}
    assert report.replaced == {k: n for k, n in kinds.items() if hasattr(fusednorm, n)}
    assert report.left_alone == {k: n for k, n in kinds.items() if k not in report.replaced}
    for _ in range(2):  # the second step sees updated running statistics
        x = randn(4, 3, 8, 8)
        ours, theirs, ref = net(x), reference(x), exact(x.double())
        assert_close_to_ref(ours, theirs, ref)
        dy = randn(*ours.shape)  # (a sum of squares of normalized values has ~0 gradient)
        ours.backward(dy)
        theirs.backward(dy)
        ref.backward(dy.double())
    for (n, a), b, r in zip(net.named_parameters(), reference.parameters(), exact.parameters()):
        assert_close_to_ref(a.grad, b.grad, r.grad, dtype=torch.float32, what=n)
    for (n, a), b in zip(net.named_buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_recognised_but_unsupported_raises_before_replacing_anything():
    cohere = hf_class("cohere")
    model = nn.ModuleDict({"ln": nn.LayerNorm(16), "q_norm": cohere(hidden_size=(4, 16))})
    with pytest.raises(NotImplementedError, match=r"q_norm \(CohereLayerNorm\).*per-head"):
        patch(model)
    assert type(model["ln"]) is nn.LayerNorm
    norm = nn.LayerNorm(16)
    norm.forward = lambda x: x  # what hook libraries do
    with pytest.raises(NotImplementedError, match="forward was replaced on the instance"):
        patch(nn.Sequential(norm))


def test_shared_modules_hooks_and_training_flag_carry_over():
    ln = nn.LayerNorm(8)
    model = nn.ModuleDict({"a": ln, "b": nn.Sequential(ln)}).train(False)
    seen = []
    ln.register_forward_hook(lambda m, args, out: seen.append(type(m)))
    patch(model)
    assert model["a"] is model["b"][0] and isinstance(model["a"], fusednorm.LayerNorm)
    assert not model["a"].training
    model["a"](torch.randn(2, 8))
    assert seen == [fusednorm.LayerNorm]
    unpatch(model)
    assert model["a"] is ln and model["b"][0] is ln


@pytest.mark.parametrize("fn", [fusednorm.patch, fusednorm.unpatch], ids=["patch", "unpatch"])
@pytest.mark.parametrize("not_a_model", [42, nn.LayerNorm, [nn.LayerNorm(8)]],
                         ids=["int", "a class", "a list"])
def test_anything_but_a_module_is_a_type_error(fn, not_a_model):
    with pytest.raises(TypeError, match=rf"^fusednorm.{fn.__name__}\(model\) takes a "
                                        r"torch.nn.Module .*, got "):
        fn(not_a_model)
