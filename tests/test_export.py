"""Export for deployment: torch.export to core ATen, ONNX (run by onnxruntime), AOTInductor, and
TorchScript's tracer, with every family's modules and with Hugging Face models patched by
`fusednorm.patch` (fuse_residual too). The exported programs hold torch's norm ops (docs/DESIGN.md,
"Export"), so they run without fusednorm and give fusednorm's eager result."""

import warnings

import pytest
import torch
from torch import nn

import fusednorm

pytestmark = pytest.mark.filterwarnings("ignore")


class Rows(nn.Module):
    """The row norms with the fused residual and the options Hugging Face models use."""

    def __init__(self):
        super().__init__()
        self.ln = fusednorm.LayerNorm(16)
        self.rms = fusednorm.RMSNorm(16, eps=1e-6)
        self.gemma = fusednorm.RMSNorm(16, eps=1e-6, zero_centered_weight=True)
        self.plain = fusednorm.LayerNorm(16, elementwise_affine=False)

    def forward(self, x):
        y, h = self.ln(x, residual=2 * x)
        y, h = self.rms(y, residual=h)
        return self.plain(self.gemma(y) + h)


class Channels(nn.Module):
    def __init__(self):
        super().__init__()
        self.gn = fusednorm.GroupNorm(2, 4, activation="silu")
        self.bn = fusednorm.BatchNorm2d(4)
        self.inorm = fusednorm.InstanceNorm2d(4, affine=True)

    def forward(self, x):
        return self.inorm(self.bn(self.gn(x)))


def _model(cls):
    torch.manual_seed(0)
    model = cls().eval()
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5)
    return model


CASES = {
    "rows": (Rows, lambda b, s: torch.randn(b, s, 16)),
    "channels": (Channels, lambda b, s: torch.randn(b, 4, s, 3)),
}


def _dynamic(example):
    return ({0: torch.export.Dim("batch", min=1, max=64), 2 if example.dim() == 4 else 1:
             torch.export.Dim("seq", min=2, max=64)},)


def _exported(case):
    cls, make = CASES[case]
    model, x = _model(cls), make(3, 5)
    return model, make, torch.export.export(model, (x,), dynamic_shapes=_dynamic(x))


@pytest.mark.parametrize("case", list(CASES))
def test_export_decomposes_to_core_aten(case):
    model, make, ep = _exported(case)
    decomposed = ep.run_decompositions()
    targets = {str(n.target) for n in decomposed.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "fusednorm" in t], targets
    # aten ops, and Python's operators on symbolic sizes (getitem, mul)
    assert all(t.startswith(("aten.", "<built-in function")) for t in targets), targets
    for b, s in ((3, 5), (1, 2), (7, 9)):  # the dynamic dims stay dynamic
        x = make(b, s)
        with torch.no_grad():
            torch.testing.assert_close(decomposed.module()(x), model(x))


# (opset 18 for the row norms: the Hugging Face GPT-2 case below)
ONNX_OPS = {("rows", 23): {"LayerNormalization", "RMSNormalization"},
            ("channels", 18): {"BatchNormalization", "InstanceNormalization"},
            ("channels", 21): {"GroupNormalization", "BatchNormalization",
                               "InstanceNormalization"}}


def _onnxruntime(program, *inputs):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(program.model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})


@pytest.mark.parametrize("case, opset", list(ONNX_OPS))
def test_onnx_export_runs_in_onnxruntime(case, opset):
    pytest.importorskip("onnxscript")
    cls, make = CASES[case]
    model, x = _model(cls), make(3, 5)
    with warnings.catch_warnings():
        program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset,
                                    dynamic_shapes=_dynamic(x), verbose=False)
    ops = {n.op_type for n in program.model_proto.graph.node}
    assert ONNX_OPS[case, opset] <= ops, ops
    for b, s in ((3, 5), (2, 7)):
        x = make(b, s)
        got = torch.from_numpy(_onnxruntime(program, x)[0])
        torch.testing.assert_close(got, model(x).detach(), rtol=1e-4, atol=1e-5)


def _hf(family):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "gpt2":
        config = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=64)
        return tf.GPT2LMHeadModel(config).eval()
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                            max_position_embeddings=64)
    return tf.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("family, fuse, opset, norm_op", [
    ("gpt2", False, 18, "LayerNormalization"),
    ("llama", False, 23, "RMSNormalization"),
    ("llama", True, 23, "RMSNormalization"),
])
def test_patched_hugging_face_models_export_to_onnx(family, fuse, opset, norm_op):
    pytest.importorskip("onnxscript")
    reference = _hf(family)
    model = _hf(family)
    fusednorm.patch(model, fuse_residual=fuse)
    ids = torch.randint(0, 64, (2, 7))

    class Logits(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner(input_ids=ids, use_cache=False).logits

    with warnings.catch_warnings():
        program = torch.onnx.export(Logits(model), (ids,), dynamo=True, opset_version=opset,
                                    verbose=False)
    norms = [n for n in program.model_proto.graph.node if n.op_type == norm_op]
    assert len(norms) == 2 * 2 + 1  # two per layer, and the final norm
    got = torch.from_numpy(_onnxruntime(program, ids)[0])
    with torch.no_grad():
        torch.testing.assert_close(got, reference(input_ids=ids, use_cache=False).logits,
                                   rtol=1e-4, atol=1e-4)


def test_aot_inductor_package_runs_with_dynamic_batch(tmp_path):
    model, make, ep = _exported("rows")
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "rows.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    for b, s in ((3, 5), (6, 11)):
        x = make(b, s)
        torch.testing.assert_close(loaded(x), model(x).detach())


@pytest.mark.parametrize("case", list(CASES))
def test_jit_trace_records_torch_ops(case):
    """TorchScript's tracer sees aten ops only: a traced fusednorm call must be one of them, not
    a constant (the kernels' output would be baked into the trace)."""
    cls, make = CASES[case]
    model = _model(cls)
    with torch.no_grad(), warnings.catch_warnings():
        traced = torch.jit.trace(model, (make(3, 5),))
        x = make(3, 5)
        torch.testing.assert_close(traced(x), model(x))
