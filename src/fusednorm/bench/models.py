"""`python -m fusednorm bench --models`: whole Hugging Face models, patched against unpatched.

A norm library is judged where users run it: inside a model, where the norms are a small part of
the time and a slower call or a second thread pool shows as a net loss. Each case builds a
randomly initialised model (no download), a copy of it patched with `fusednorm.patch`, checks
that both give the same logits, then times them in interleaved rounds in one process (each
round: one sample of each, in alternating order). The figure is the median over rounds of the
per-round speed-up, unpatched time / patched time (above 1: fusednorm faster).

Workloads: a training step (forward with the loss, and backward) on 8×256 tokens, and inference
(no grad) on 1×1 and 1×64 tokens (no KV cache).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import fusednorm

WIDTH, LAYERS, HEADS = 768, 4, 12
WORKLOADS = {"train 8x256": (8, 256, True), "infer 1x1": (1, 1, False),
             "infer 1x64": (1, 64, False)}


class Unavailable(RuntimeError):
    """The model family needs a package that is not installed (transformers)."""


def gpt2(dtype: torch.dtype) -> torch.nn.Module:
    """GPT-2 at width 768 (Post-LN inside each block's pre-norms: nn.LayerNorm), 4 layers."""
    tf = _transformers()
    config = tf.GPT2Config(n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, n_positions=512,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return tf.GPT2LMHeadModel(config).to(dtype)


def llama(dtype: torch.dtype) -> torch.nn.Module:
    """A Llama-style model at width 768 (RMSNorm pre-norms), 4 layers."""
    tf = _transformers()
    config = tf.LlamaConfig(hidden_size=WIDTH, intermediate_size=2048, num_hidden_layers=LAYERS,
                            num_attention_heads=HEADS, num_key_value_heads=HEADS,
                            max_position_embeddings=512, vocab_size=32000)
    return tf.LlamaForCausalLM(config).to(dtype)


MODELS = {"gpt2": gpt2, "llama": llama}


def _transformers():
    try:
        import transformers
    except ImportError as e:  # the bench extra installs it
        raise Unavailable("needs transformers (pip install '.[bench]')") from e
    transformers.logging.set_verbosity_error()
    return transformers


@dataclass
class Pair:
    name: str
    unpatched: Callable[[], object]
    patched: Callable[[], object]


def _step(model: torch.nn.Module, ids: torch.Tensor, train: bool) -> Callable[[], object]:
    if train:
        def step():
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids).loss.backward()
        return step

    def infer():
        with torch.no_grad():
            return model(ids).logits
    return infer


def pair(model_name: str, workload: str, dtype: torch.dtype, seed: int = 0) -> Pair:
    """The two callables of one case, after checking that the two models agree."""
    torch.manual_seed(seed)
    base = MODELS[model_name](dtype)
    ours = copy.deepcopy(base)
    report = fusednorm.patch(ours)
    if not report.replaced:
        raise RuntimeError(f"fusednorm.patch replaced nothing in {model_name}: {report}")
    batch, tokens, train = WORKLOADS[workload]
    ids = torch.randint(0, base.config.vocab_size, (batch, tokens))
    base.train(train)
    ours.train(train)
    with torch.no_grad():
        a, b = base(ids[:1]).logits.float(), ours(ids[:1]).logits.float()
    # same weights, different kernels: the logits differ by the norms' rounding only
    tol = 5e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-3
    err = ((a - b).abs().max() / a.abs().max()).item()
    if not err <= tol:
        raise RuntimeError(f"{model_name} {workload} {dtype}: patched logits differ by {err:.3g}")
    return Pair(f"{model_name} {workload} {str(dtype).removeprefix('torch.')}",
                _step(base, ids, train), _step(ours, ids, train))


def measure(p: Pair, rounds: int, min_sample_s: float = 0.05) -> dict:
    """Median per-call times and the median per-round speed-up unpatched/patched."""
    for fn in (p.unpatched, p.patched, p.unpatched, p.patched):  # warm-up (plans, allocator)
        fn()
    k = 1
    while _time(p.unpatched, k) < min_sample_s and k < 1024:
        k *= 2
    base, ours, speedups = [], [], []
    for r in range(rounds):
        if r % 2:
            o = _time(p.patched, k)
            b = _time(p.unpatched, k)
        else:
            b = _time(p.unpatched, k)
            o = _time(p.patched, k)
        base.append(b)
        ours.append(o)
        speedups.append(b / o)
    q = statistics.quantiles(speedups, n=4) if rounds > 1 else [speedups[0]] * 3
    return {"case": p.name, "unpatched_ms": statistics.median(base) * 1e3,
            "patched_ms": statistics.median(ours) * 1e3, "speedup": statistics.median(speedups),
            "speedup_q1": q[0], "speedup_q3": q[2], "rounds": rounds, "calls_per_sample": k}


def _time(fn: Callable[[], object], k: int) -> float:
    t0 = time.perf_counter()
    for _ in range(k):
        fn()
    return (time.perf_counter() - t0) / k


def run(models=tuple(MODELS), workloads=tuple(WORKLOADS),
        dtypes=(torch.float32, torch.bfloat16), rounds: int = 15,
        progress: Callable[[str], None] = lambda s: None) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for model_name in models:
            for workload in workloads:
                p = pair(model_name, workload, dtype)
                progress(p.name)
                rows.append(measure(p, rounds))
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'case':<28} {'unpatched':>10} {'patched':>10} {'speed-up':>9}  {'(q1-q3)':>11}"
            "  goal >= 1.0x")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['case']:<28} {r['unpatched_ms']:>8.2f}ms {r['patched_ms']:>8.2f}ms "
                     f"{r['speedup']:>8.3f}x  {r['speedup_q1']:.3f}-{r['speedup_q3']:.3f}")
    return "\n".join(lines)
