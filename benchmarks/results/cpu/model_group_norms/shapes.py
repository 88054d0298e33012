"""The GroupNorm calls of the diffusion models of `bench --models`, one module at a time: how
much of a step they are, and what fusednorm's GroupNorm saves or loses there.

For each model and workload (the bench's: UNet train 4x32x32 / infer 1x32x32, VAE train
2x64x64 / infer 1x64x64) the GroupNorm inputs are recorded by hooks (shape and layout, calls
per step), then each distinct call is timed alone: torch's nn.GroupNorm against fusednorm's,
no grad (inference) or forward + autograd.grad (training), interleaved rounds, the median of
per-round ratios. The sum over calls of count x (torch - ours) is what the norms can change in
one step of the model, against the model's step time.

    PYTHONPATH=src python benchmarks/results/cpu/model_group_norms/shapes.py [float32|bfloat16]
"""

import collections
import statistics
import sys
import time

import torch

import fusednorm
from fusednorm.bench import models as M

DTYPE = getattr(torch, sys.argv[1] if len(sys.argv) > 1 else "float32")
WORKLOADS = [("unet", "train", 4, 32), ("unet", "infer", 1, 32), ("vae", "train", 2, 64),
             ("vae", "infer", 1, 64)]
ROUNDS, CALLS = 15, 50


def recorded_calls(name, batch, size):
    torch.manual_seed(0)
    model = M.MODELS[name](DTYPE)
    calls = collections.Counter()

    def hook(module, args):
        x = args[0]
        cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last)
        calls[(tuple(x.shape), module.num_groups, cl)] += 1

    for m in model.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.register_forward_pre_hook(hook)
    x = torch.randn(batch, 3, size, size, dtype=DTYPE)
    with torch.no_grad():
        model(x, 10) if name == "unet" else model(x)
    return calls


def timed(fns):
    res = {k: [] for k in fns}
    for f in fns.values():
        for _ in range(10):
            f()
    for r in range(ROUNDS):
        names = list(fns)[r % 2:] + list(fns)[:r % 2]
        for k in names:
            t0 = time.perf_counter()
            for _ in range(CALLS):
                fns[k]()
            res[k].append((time.perf_counter() - t0) / CALLS * 1e6)
    return res


def one_call(shape, groups, cl, train):
    c = shape[1]
    theirs = torch.nn.GroupNorm(groups, c).to(DTYPE)
    ours = fusednorm.GroupNorm(groups, c).to(DTYPE)
    ours.load_state_dict(theirs.state_dict())
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = torch.randn(shape, dtype=DTYPE).contiguous(memory_format=fmt)
    dy = torch.randn(shape, dtype=DTYPE).contiguous(memory_format=fmt)
    if train:
        x.requires_grad_()

        def step(m):
            inputs = (x, *m.parameters())
            return lambda: torch.autograd.grad(m(x), inputs, dy)
    else:
        def step(m):
            def f():
                with torch.no_grad():
                    return m(x)
            return f
    res = timed({"torch": step(theirs), "ours": step(ours)})
    t, o = statistics.median(res["torch"]), statistics.median(res["ours"])
    ratio = statistics.median(a / b for a, b in zip(res["torch"], res["ours"]))
    return t, o, ratio


def main():
    print(f"fusednorm {fusednorm.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {DTYPE}")
    for name, work, batch, size in WORKLOADS:
        train = work == "train"
        calls = recorded_calls(name, batch, size)
        print(f"\n{name} {work} {batch}x{size}x{size}: {sum(calls.values())} GroupNorm calls "
              f"per step, {len(calls)} distinct")
        total_t = total_o = 0.0
        for (shape, groups, cl), count in sorted(calls.items(), key=lambda kv: -kv[1]):
            t, o, ratio = one_call(shape, groups, cl, train)
            total_t, total_o = total_t + count * t, total_o + count * o
            layout = "channels-last" if cl else "contiguous"
            print(f"  {'x'.join(map(str, shape)):>14} {layout:<13} x{count:<2} torch {t:7.1f} us"
                  f"  ours {o:7.1f} us  ({ratio:.2f}x)", flush=True)
        print(f"  per step: torch's GroupNorms {total_t / 1e3:.2f} ms, ours {total_o / 1e3:.2f} "
              f"ms: {(total_t - total_o) / 1e3:+.2f} ms")


if __name__ == "__main__":
    main()
