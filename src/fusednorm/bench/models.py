"""`python -m fusednorm bench --models`: whole Hugging Face models (transformers' language
models, diffusers' UNet and autoencoder), patched against unpatched.

A norm library is judged where users run it: inside a model, where the norms are a small part of
the time and a slower call or a second thread pool shows as a net loss. Each case builds a
randomly initialised model (no download) and copies of it, unpatched and patched with
`fusednorm.patch`, checks that all give the same outputs, then times them in interleaved rounds
in one process (each round: one sample of each, in an order that alternates; a sample is as many
back-to-back steps as last half a second, one training step). The figure is the median over rounds
of the per-round speed-up, unpatched time / patched time (above 1: fusednorm faster), with its
quartiles and the 95% confidence interval of that median (`timing.median_interval`: a speed-up is
shown above 1.0 only where the whole interval is); the same from the process's CPU time,
steadier than the wall clock when other processes share the cores.

Copies of one model are not equally fast: where their tensors land in memory moves a training
step by up to 2-4% here (unpatched copies of the UNet and the autoencoder, timed in alternation),
as much as the norms themselves can, and the model as built differs from the copies made after
it (the autoencoder's original 3-4% slower than its copies, the UNet's 1-2% faster). So every
timed model is a copy, the sides' copies made in turn, and with `instances` K > 1 each side is K
copies, every one timed once a round, a side's time in a round the mean over its copies: the
placement averages out instead of deciding.

Workloads: a training step (forward with the loss, and backward) on 8×256 tokens, and inference
(no grad) on 1×1 and 1×64 tokens (no KV cache); for the diffusion models a training step (mean
squared error of the output) and inference on a batch of random images (`IMAGE_WORKLOADS`).
bfloat16 training steps only run where the CPU multiplies bfloat16 matrices. Variants: `eager` (patched), `fused`
(patch(fuse_residual=True) for models with decoder layers, fuse_activation=True for the diffusion
models: see FUSABLE), and the same under torch.compile
(default mode) against the unpatched model compiled: `compiled`, `compiled+fused`. References:
`no-norm` (the ceiling) and `copy` (the noise floor), see VARIANTS.
"""

from __future__ import annotations

import copy
import importlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import fusednorm
from fusednorm.bench.timing import calls_per_sample, median_interval

WIDTH, LAYERS, HEADS = 768, 4, 12
# (batch, tokens, train) of the language models; (batch, image side, train) of the diffusion ones
WORKLOADS = {"train 8x256": (8, 256, True), "infer 1x1": (1, 1, False),
             "infer 1x64": (1, 64, False)}
IMAGE_WORKLOADS = {"unet": {"train 4x32x32": (4, 32, True), "infer 1x32x32": (1, 32, False)},
                   "vae": {"train 2x64x64": (2, 64, True), "infer 1x64x64": (1, 64, False)}}


class Unavailable(RuntimeError):
    """The model family needs a package that is not installed (transformers, diffusers)."""


def gpt2(dtype: torch.dtype) -> torch.nn.Module:
    """GPT-2 at width 768 (Post-LN inside each block's pre-norms: nn.LayerNorm), 4 layers."""
    tf = _library("transformers")
    config = tf.GPT2Config(n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, n_positions=512,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return tf.GPT2LMHeadModel(config).to(dtype)


def llama(dtype: torch.dtype) -> torch.nn.Module:
    """A Llama-style model at width 768 (RMSNorm pre-norms), 4 layers."""
    tf = _library("transformers")
    config = tf.LlamaConfig(hidden_size=WIDTH, intermediate_size=2048, num_hidden_layers=LAYERS,
                            num_attention_heads=HEADS, num_key_value_heads=HEADS,
                            max_position_embeddings=512, vocab_size=32000)
    return tf.LlamaForCausalLM(config).to(dtype)


def unet(dtype: torch.dtype) -> torch.nn.Module:
    """diffusers' UNet2DModel shaped like DDPM's CIFAR-10 model at half its width (channels
    64-128, two ResNet blocks per level, attention at 16×16; GroupNorm of 32 groups)."""
    d = _library("diffusers")
    return d.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(64, 128, 128, 128),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")).to(dtype)


def vae(dtype: torch.dtype) -> torch.nn.Module:
    """diffusers' AutoencoderKL shaped like Stable Diffusion's at half its width (channels
    64-256, two ResNet blocks per level, attention in the middle blocks; GroupNorm of 32
    groups)."""
    d = _library("diffusers")
    return d.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=(64, 128, 256, 256), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4).to(dtype)


MODELS = {"gpt2": gpt2, "llama": llama, "unet": unet, "vae": vae}
# model -> what its "fused" variants fuse: the residual adds of decoder layers patch knows,
# the SiLU after diffusers' GroupNorms
FUSABLE = {"llama": "fuse_residual", "unet": "fuse_activation", "vae": "fuse_activation"}
# variant -> (compiled, fused). Two are not results but references: "no-norm" replaces
# the norms by nn.Identity (the ceiling, the speed-up a norm that cost nothing would give);
# "copy" is an unpatched copy of the model, timed like the patched ones: its speed-up is 1.0 but
# for the noise of the machine, which it shows case by case
VARIANTS = {"eager": (False, False), "fused": (False, True), "compiled": (True, False),
            "compiled+fused": (True, True), "no-norm": (False, None), "copy": (False, None)}
_NOTES = {"no-norm": "  (ceiling: no norm at all)", "copy": "  (noise: an unpatched copy)"}


def _library(name: str):
    """transformers or diffusers, quiet (the bench extra installs both)."""
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise Unavailable(f"needs {name} (pip install '.[bench]')") from e
    module.logging.set_verbosity_error()
    return module


def workloads_of(model_name: str) -> dict[str, tuple[int, int, bool]]:
    return IMAGE_WORKLOADS.get(model_name, WORKLOADS)


def native_bf16_matmul() -> bool:
    """Whether the CPU multiplies bfloat16 matrices in hardware (AVX512-BF16, AMX): without,
    a bfloat16 training step of these models takes minutes, for torch as for fusednorm."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass
class Case:
    """One model, workload and dtype: the unpatched steps and each variant's, one per instance
    (see the module docstring), all compiled or none."""

    name: str
    unpatched: list[Callable[[], object]]
    patched: dict[str, list[Callable[[], object]]] = field(default_factory=dict)


def _inputs(model_name: str, base: torch.nn.Module, workload: str,
            dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    batch, size, _ = workloads_of(model_name)[workload]
    if model_name not in IMAGE_WORKLOADS:
        return (torch.randint(0, base.config.vocab_size, (batch, size)),)
    x = torch.randn(batch, 3, size, size, dtype=dtype)
    if model_name == "unet":  # a noisy image and its diffusion step
        return x, torch.randint(0, 1000, (batch,))
    return (x,)


def _output(model: torch.nn.Module, inputs: tuple) -> torch.Tensor:
    """The model's output: a language model's logits, a diffusion model's predicted sample (the
    autoencoder decodes the mode of its latent distribution: deterministic)."""
    out = model(*inputs)
    return out.logits if hasattr(out, "logits") else out.sample


def _step(model: torch.nn.Module, inputs: tuple, train: bool) -> Callable[[], object]:
    if train:
        def step():
            model.zero_grad(set_to_none=True)
            if inputs[0].is_floating_point():  # a diffusion model: mean squared error
                loss = (_output(model, inputs).float() - inputs[0].float()).square().mean()
            else:
                loss = model(*inputs, labels=inputs[0]).loss
            loss.backward()
        return step

    def infer():
        with torch.no_grad():
            return _output(model, inputs)
    return infer


def case(model_name: str, workload: str, dtype: torch.dtype, variants=("eager",),
         seed: int = 0, instances: int = 1) -> Case:
    """The callables of one case (variants all compiled or all eager), `instances` models per
    side, after checking that the patched models' outputs agree with the unpatched model's."""
    compiled = {VARIANTS[v][0] for v in variants}
    if len(compiled) != 1:
        raise ValueError(f"variants {variants} mix compiled and eager")
    compiled = compiled.pop()
    torch.manual_seed(seed)
    base = MODELS[model_name](dtype)
    inputs = _inputs(model_name, base, workload, dtype)
    train = workloads_of(model_name)[workload][2]
    base.train(train)
    # compiled models are checked on the timed shape: another would make a second graph, with
    # dynamic shapes
    check = inputs if compiled else tuple(t[:1] for t in inputs)
    half = dtype in (torch.bfloat16, torch.float16)
    with torch.no_grad():
        expected = _output(base, check).float()
        # in half precision, the float32 model is the yardstick: the norms' rounding compounds
        # through a deep model (a bfloat16 autoencoder's outputs move by 6% of their largest)
        exact = (_output(copy.deepcopy(base).float(), tuple(
            t.float() if t.is_floating_point() else t for t in check)) if half else expected)
    if compiled:
        torch._dynamo.reset()  # each case compiles afresh (recompile limits are per code)
    wrap = torch.compile if compiled else (lambda m: m)
    c = Case(f"{model_name} {workload} {str(dtype).removeprefix('torch.')}", [],
             {variant: [] for variant in variants})
    # every timed model a copy, the sides' copies made in turn: where a model's tensors land
    # differs between the model built and copies made after (see the module docstring)
    for _ in range(instances):
        c.unpatched.append(_step(wrap(copy.deepcopy(base)), inputs, train))
        for variant in variants:
            c.patched[variant].append(_variant_step(base, variant, model_name, inputs, train,
                                                    wrap, check, expected, exact, half, c.name))
    return c


def _variant_step(base: torch.nn.Module, variant: str, model_name: str, inputs: tuple,
                  train: bool, wrap: Callable, check: tuple, expected: torch.Tensor,
                  exact: torch.Tensor, half: bool, case_name: str) -> Callable[[], object]:
    """The step of one instance of a variant: a copy of the model, patched as the variant says
    and its outputs checked against the unpatched model's."""
    ours = copy.deepcopy(base)
    if variant == "copy":
        return _step(ours, inputs, train)
    fusion = {FUSABLE[model_name]: True} if VARIANTS[variant][1] else {}
    report = fusednorm.patch(ours, **fusion)
    if not report.replaced:
        raise RuntimeError(f"fusednorm.patch replaced nothing in {model_name}: {report}")
    if VARIANTS[variant][1] is None:
        for path in report.replaced:
            parent, _, name = path.rpartition(".")
            setattr(ours.get_submodule(parent), name, torch.nn.Identity())
        return _step(ours, inputs, train)
    ours = wrap(ours)
    with torch.no_grad():
        got = _output(ours, check).float()
    # same weights, different kernels: the outputs differ by the norms' rounding only (in half
    # precision no further from the float32 model than twice the unpatched model's)
    err = _distance(got, exact)
    tol = 2 * _distance(expected, exact) + 1e-2 if half else 1e-3
    if not err <= tol:
        raise RuntimeError(f"{case_name} {variant}: patched outputs differ by {err:.3g} "
                           f"(allowed {tol:.3g})")
    return _step(ours, inputs, train)


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to b's largest magnitude."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def measure(c: Case, rounds: int, min_sample_s: float = 0.5) -> list[dict]:
    """Per variant: median per-call times and the median per-round speed-up unpatched/patched
    (wall clock and CPU time), with quartiles. Each round times every instance of every side
    once, instance by instance (the order alternating); a side's time in a round is the mean
    over its instances."""
    sides = {"unpatched": c.unpatched, **c.patched}
    order = [(name, i) for i in range(len(c.unpatched)) for name in sides]
    for _ in range(2):  # warm-up (compilation, plans, allocator)
        for name, i in order:
            sides[name][i]()
    k = calls_per_sample(c.unpatched[0], min_sample_s)
    times = {name: [] for name in sides}
    per_instance = {name: [[] for _ in fns] for name, fns in sides.items()}
    for r in range(rounds):
        sample = {name: [] for name in sides}
        for name, i in (order if r % 2 == 0 else order[::-1]):
            t = _time(sides[name][i], k)
            sample[name].append(t)
            per_instance[name][i].append(t[0])
        for name, ts in sample.items():
            times[name].append((statistics.fmean(t[0] for t in ts),
                                statistics.fmean(t[1] for t in ts)))
    rows = []
    for variant in c.patched:
        row = {"case": c.name, "variant": variant, "rounds": rounds, "calls_per_sample": k,
               "instances": len(c.unpatched),
               # (each instance's median: how far copies of one model differ, side by side)
               "instance_ms": {side: [statistics.median(t) * 1e3 for t in per_instance[side]]
                               for side in ("unpatched", variant)}}
        for clock, suffix in ((0, ""), (1, "_cpu")):
            base = [t[clock] for t in times["unpatched"]]
            ours = [t[clock] for t in times[variant]]
            ratios = [b / o for b, o in zip(base, ours)]
            q = statistics.quantiles(ratios, n=4) if rounds > 1 else [ratios[0]] * 3
            row.update({f"unpatched_ms{suffix}": statistics.median(base) * 1e3,
                        f"patched_ms{suffix}": statistics.median(ours) * 1e3,
                        f"speedup{suffix}": statistics.median(ratios),
                        f"speedup{suffix}_q1": q[0], f"speedup{suffix}_q3": q[2]})
            if clock == 0:
                lo_hi = median_interval(ratios)
                row["speedup_ci95"] = list(lo_hi) if lo_hi else None
                row["speedup_rounds"] = ratios  # (in round order: runs can be pooled)
        rows.append(row)
    return rows


def _time(fn: Callable[[], object], k: int) -> tuple[float, float]:
    """Seconds per call: wall clock, and CPU time of the process (all its threads)."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(k):
        fn()
    return (time.perf_counter() - t0) / k, (time.process_time() - c0) / k


def run(models=tuple(MODELS), workloads=None, dtypes=(torch.float32, torch.bfloat16),
        rounds: int = 15, progress: Callable[[str], None] = lambda s: None,
        variants=("eager",), instances: int = 1) -> list[dict]:
    """Rows of `measure` for every model, workload (each model's own, or those named among
    them) and dtype; bfloat16 training steps only on CPUs with bfloat16 matrix multiplies."""
    rows = []
    for dtype in dtypes:
        for model_name in models:
            for workload, (_, _, train) in workloads_of(model_name).items():
                if workloads is not None and workload not in workloads:
                    continue
                if train and dtype == torch.bfloat16 and not native_bf16_matmul():
                    progress(f"{model_name} {workload} bfloat16 skipped: no bfloat16 matmuls")
                    continue
                for compiled in (False, True):
                    chosen = [v for v in variants if VARIANTS[v][0] == compiled
                              and (model_name in FUSABLE or not VARIANTS[v][1])]
                    if not chosen:
                        continue
                    c = case(model_name, workload, dtype, chosen, instances=instances)
                    progress(f"{c.name} {', '.join(chosen)}")
                    rows += measure(c, rounds)
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'case':<28} {'variant':<14} {'unpatched':>10} {'patched':>10} {'speed-up':>9}"
            f"  {'(q1-q3)':>11}  {'(95% CI)':>11}  {'cpu-time':>8}  {'(q1-q3)':>11}"
            "  goal >= 1.0x")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['case']:<28} {r['variant']:<14} {r['unpatched_ms']:>8.2f}ms "
            f"{r['patched_ms']:>8.2f}ms {r['speedup']:>8.3f}x  "
            f"{r['speedup_q1']:.3f}-{r['speedup_q3']:.3f}  {_interval(r['speedup_ci95'])}  "
            f"{r['speedup_cpu']:>7.3f}x  "
            f"{r['speedup_cpu_q1']:.3f}-{r['speedup_cpu_q3']:.3f}"
            + _NOTES.get(r["variant"], ""))
    for r in rows:  # the placement spread, where several instances averaged it out
        if r.get("instances", 1) > 1:
            ms = ", ".join(f"{side} " + " ".join(f"{t:.1f}" for t in each)
                           for side, each in r["instance_ms"].items())
            lines.append(f"  {r['case']} {r['variant']}: {r['instances']} instances a side, "
                         f"each one's median (ms): {ms}")
    return "\n".join(lines)


def _interval(lo_hi: list[float] | None) -> str:
    return f"{'-':>11}" if lo_hi is None else f"{lo_hi[0]:.3f}-{lo_hi[1]:.3f}"
