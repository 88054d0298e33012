"""`python -m fusednorm bench` (or `fusednorm bench`): fusednorm measured against torch.

By default the bandwidth of every norm op, fusednorm against torch eager, torch.compile and
whichever peers are installed: for each (op, dtype, shape), build every provider, check its
outputs and gradients against the float64 reference (check.py), measure its forward+backward
memory, then per mode time the valid ones round-robin with x.clone() (and, on CUDA for small
calls, an empty launch) as references. `--calls`, `--vmap`, `--startup` and `--models` run the
other suites instead: small calls (calls.py), the norms under torch.func.vmap (transforms.py),
first calls of new processes (startup.py) and whole Hugging Face models (models.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fusednorm.bench import cases, check, providers, report, timing

PRESETS = {  # --quick, and the full default sweep; explicit flags override either
    "quick": {"ops": "layer_norm", "dtypes": "float32,bfloat16", "modes": "fwd,fwdbwd",
              "providers": "fusednorm,torch"},
    "full": {"ops": "layer_norm,rms_norm,add_norm,channel_norms", "dtypes": "float32,bfloat16",
             "modes": "fwd,bwd,fwdbwd", "providers": ",".join(providers.PROVIDERS)},
}
TIMING = {  # min_sample_s: shortest sample; budget_s: time aimed at per case and mode
    "quick": {"min_sample_s": 2e-3, "budget_s": 1.0, "rounds": (5, 15)},
    "full": {"min_sample_s": 5e-3, "budget_s": 3.0, "rounds": (7, 25)},
}
_warmed = False  # whether this process has taken (and dropped) its first measurement
QUICK_NOTE = ("--quick leaves torch.compile out (its first compilation alone takes ~20 s on a "
              "small CPU); add it with --providers fusednorm,torch,compile")


class Progress:
    """One line on stderr: redrawn in place on a terminal, one line per case otherwise."""

    def __init__(self, total: int):
        self.total, self.done, self.label = total, 0, ""
        self.t0, self.tty = time.perf_counter(), sys.stderr.isatty()

    def show(self, label: str) -> None:
        self.label = label
        self._draw()

    def step(self, n: int = 1) -> None:
        self.done += n
        if self.tty:
            self._draw()

    def _draw(self) -> None:
        filled = 24 * self.done // max(self.total, 1)
        text = (f"[{'#' * filled}{'.' * (24 - filled)}] {self.done}/{self.total} "
                f"{time.perf_counter() - self.t0:.0f}s {self.label}")
        sys.stderr.write(("\r\033[K" + text) if self.tty else text + "\n")
        sys.stderr.flush()

    def clear(self) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fusednorm bench",
        description="Bandwidth (GB/s of the bytes that must move) of fusednorm's ops against "
        "torch eager, torch.compile, Liger-Kernel, quack and apex. Exits with 1 if fusednorm "
        "gives results outside the tolerance or fails. --calls, --startup and --models run "
        "the other suites instead.")
    suites = p.add_mutually_exclusive_group()
    suites.add_argument("--calls", action="store_true",
                        help="the cost of small calls (1x768, 8x768, 1x4096 LayerNorm and "
                        "RMSNorm, 2x32x4x4 GroupNorm; no grad, and module forward+backward): "
                        "median ratio to torch over interleaved rounds")
    suites.add_argument("--vmap", action="store_true",
                        help="the norms under torch.func.vmap (and vmap(grad) per-sample "
                        "gradients) against torch's op under vmap and a Python loop of "
                        "fusednorm calls; kernel launches per vmapped call")
    suites.add_argument("--startup", action="store_true",
                        help="a new process's import and first forward and backward (LayerNorm, "
                        "GroupNorm and BatchNorm2d, channels first and last), with an empty "
                        "kernel cache (cold) and with the cache it left (warm)")
    suites.add_argument("--models", action="store_true",
                        help="Hugging Face models, random init, patched against unpatched: "
                        "GPT-2 and Llama-style (4 layers, width 768; a training step and 1- "
                        "and 64-token inference) and diffusers' UNet2DModel and AutoencoderKL "
                        "(a training step and inference on random images), float32 and "
                        "bfloat16 (--dtypes)")
    p.add_argument("--rounds", type=int,
                   help="rounds for --calls (15), --vmap (15) and --models (15)")
    p.add_argument("--variants", default="eager",
                   help="for --models, a comma list of eager (patched), fused "
                   "(fuse_residual=True for llama, fuse_activation=True for unet and vae), compiled, compiled+fused (torch.compile, against the "
                   "unpatched model compiled), no-norm (the norms replaced by nn.Identity: the "
                   "ceiling of any norm's speed-up), copy (an unpatched copy: the noise floor); "
                   "default eager")
    p.add_argument("--instances", type=int, default=1,
                   help="for --models, copies of the model a side (unpatched, and each "
                   "variant), each timed every round: copies of one model differ in speed by "
                   "where their memory lands, several average that out; default 1")
    p.add_argument("--model-names", default="gpt2,llama,unet,vae",
                   help="for --models, a comma list of gpt2, llama, unet, vae (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="the headline shapes (4096x4096, 32768x768, 8192x1024): layer_norm, "
                   "fwd and fwdbwd, fusednorm and torch against a copy, plus the per-call "
                   "overhead (under two minutes on CPU)")
    p.add_argument("--out", type=Path, help="write results.csv, results.json and PNG plots here")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--ops", help="comma list of " + ", ".join(cases.OPS + tuple(cases.ALIASES))
                   + " (aliases: " + "; ".join(f"{a} = {','.join(o)}"
                                               for a, o in cases.ALIASES.items()) + ")")
    p.add_argument("--dtypes", help="comma list of " + ", ".join(cases.DTYPES))
    p.add_argument("--modes", help="comma list of " + ", ".join(cases.MODES))
    p.add_argument("--shapes", help="comma list of MxN (rows x row length), replacing the sweep")
    p.add_argument("--providers", help="comma list of " + ", ".join(providers.PROVIDERS))
    args = p.parse_args(argv)
    from fusednorm.bench.models import MODELS, VARIANTS

    if bad := [v for v in args.variants.split(",") if v not in VARIANTS]:
        p.error(f"unknown variants: {', '.join(bad)} (known: {', '.join(VARIANTS)})")
    if args.instances < 1:
        p.error(f"--instances must be at least 1, got {args.instances}")
    if bad := [m for m in args.model_names.split(",") if m not in MODELS]:
        p.error(f"unknown models: {', '.join(bad)} (known: {', '.join(MODELS)})")
    if args.calls and not args.dtypes:
        args.dtypes = "float32"  # the small-call table is about the launch, not the dtype
    preset = PRESETS["quick" if args.quick else "full"]
    for key, value in preset.items():
        setattr(args, key, [v for v in (getattr(args, key) or value).split(",") if v])
    args.ops = [o for op in args.ops for o in cases.ALIASES.get(op, (op,))]
    for key, known in (("ops", cases.OPS + tuple(cases.ALIASES)), ("dtypes", cases.DTYPES),
                       ("modes", cases.MODES), ("providers", providers.PROVIDERS)):
        if bad := [v for v in getattr(args, key) if v not in known]:
            p.error(f"unknown {key}: {', '.join(bad)} (known: {', '.join(known)})")
    args.ops = sorted(set(args.ops), key=cases.OPS.index)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    return args


def shapes_for(args, dtype: torch.dtype) -> list[cases.Shape]:
    found = (cases.parse_shapes(args.shapes) if args.shapes
             else cases.default_shapes(args.device, dtype, args.quick))
    first = {}  # a sweep shape may repeat a headline shape
    for s in found:
        first.setdefault((s.M, s.N, s.dims), s)
    return list(first.values())


def run_case(op, dtype, shape, ishape, args, progress, skipped) -> list[dict]:
    """All modes of one (op, dtype, shape); returns the rows and prints the table blocks."""
    dev, dname = args.device, str(dtype).removeprefix("torch.")
    inp = cases.make_inputs(op, dtype, ishape, dev)
    fns = {}
    for name in args.providers:
        try:
            fns[name] = providers.PROVIDERS[name](op, dev)
        except providers.Unavailable as e:
            skipped.setdefault(name, set()).add(str(e))
    grads = any(m != "fwd" for m in args.modes)
    verdicts = check.check(op, inp, fns, providers.torch_eager(op, dev), grads)
    numel = inp.args[0].numel()
    rows_m = ishape[0] * (cases.GROUPS if op in cases.CHANNEL_OPS else 1)
    base = {"op": op, "dtype": dname, "shape": f"{rows_m}x{numel // rows_m}", "tag": shape.tag,
            "input_shape": "x".join(map(str, ishape)), "M": rows_m, "N": numel // rows_m}
    for name, v in verdicts.items():
        if v.notes:
            progress.clear()
            what = "GIVES WRONG RESULTS" if "invalid" in (v.fwd, v.bwd) else "failed"
            print(f"!! {name} {what} on {op} {dname} {base['shape']}: {'; '.join(v.notes)}"
                  " -- its timings there are marked invalid", file=sys.stderr)
    mem = {n: timing.fwdbwd_memory(f, inp, dev) for n, f in fns.items()
           if grads and verdicts[n].status("fwdbwd") == "ok"}
    sets = [inp] + [inp.clone() for _ in
                    range(timing.n_copies(dev, cases.bytes_moved(op, "fwd", ishape, dtype)) - 1)]
    xs = [s.args[0].detach() for s in sets]
    copy_bytes = 2 * xs[0].numel() * xs[0].element_size()
    rows = []
    for mode in args.modes:
        progress.show(f"{op} {dname} {base['shape']} {mode}")
        calls = {n: timing.make_call(f, sets, mode) for n, f in fns.items()
                 if verdicts[n].status(mode) == "ok"}
        calls["copy"] = timing.copy_call(xs)
        if dev == "cuda" and shape.tag in ("tiny", "small"):
            calls["launch"] = timing.launch_call(dev)
        settings = TIMING["quick" if args.quick else "full"]
        global _warmed
        if not _warmed:
            # The first measurement of a process reads the provider warmed up first 25-50%
            # slow, whichever it is (the rounds alternate; a second measurement of the same
            # case does not): it is taken once and dropped.
            timing.measure(calls, dev, **settings)
            _warmed = True
        stats = timing.measure(calls, dev, **settings)
        moved = {"copy": copy_bytes, "launch": 0}
        moved.update(dict.fromkeys(fns, cases.bytes_moved(op, mode, ishape, dtype)))
        copy_gbps = copy_bytes / stats["copy"]["median"] / 1e9
        block = [_row({**base, "mode": mode, "provider": name}, stats.get(name),
                      verdicts.get(name), moved[name], copy_gbps,
                      mem.get(name) if mode != "fwd" else None)
                 for name in list(fns) + [c for c in calls if c not in fns]]
        for r in block:  # the steadier ratio on a shared machine: round by round
            if r["provider"] in fns and r["provider"] in stats and "torch" in stats \
                    and r["provider"] != "torch":
                per = timing.per_round(stats["torch"], stats[r["provider"]])
                r.update({"vs_torch_rounds": per["median"], "vs_torch_ci95_lo": per["ci95_lo"],
                          "vs_torch_ci95_hi": per["ci95_hi"]})
        progress.clear()
        print(report.block(block) + "\n", flush=True)
        progress.step()
        rows += block
        del calls  # frees the bwd graphs
    return rows


def _row(row: dict, st: dict | None, v: check.Verdict | None, nbytes: int, copy_gbps: float,
         mem: int | None) -> dict:
    """One result line; st (timing statistics) is None for a provider not timed."""
    us = {k: st[k] * 1e6 if st else None for k in ("median", "min", "q1", "q3")}
    gbps = nbytes / st["median"] / 1e9 if st and nbytes else None
    return {**row, "status": "ok" if st else v.status(row["mode"]), "time_us": us["median"],
            "time_min_us": us["min"], "time_q1_us": us["q1"], "time_q3_us": us["q3"],
            "samples": st and st["samples"], "bytes": nbytes, "gbps": gbps,
            "pct_copy": gbps and 100 * gbps / copy_gbps, "mem_bytes": mem,
            "worst_err_ratio": v and v.worst, "note": "; ".join(v.notes) if v else ""}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m fusednorm bench` (argv: what follows "bench")."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        argv = argv[1:]
    args = parse(argv)
    if args.calls or args.vmap or args.startup or args.models:
        return _suite(args, argv)
    import fusednorm

    meta = report.environment(args.device, argv)
    notes = [QUICK_NOTE] if args.quick and "compile" not in args.providers else []
    print(f"fusednorm bench on {meta['device']} ({meta['logical_cpus']} CPUs, torch "
          f"{meta['torch']}, triton {meta['triton']}, numba {meta['numba']})\n{report.LEGEND}\n")
    todo = [(op, dtype, s) for op in args.ops for dtype in args.dtypes
            for s in shapes_for(args, cases.DTYPES[dtype])]
    progress, skipped, rows = Progress(len(todo) * len(args.modes)), {}, []
    with fusednorm.use_backend("auto"):
        for op, dtype, shape in todo:
            ishape = cases.input_shape(op, shape)
            if ishape is None:  # channel norms need M to be a multiple of the 32 groups
                progress.step(len(args.modes))
                continue
            try:
                rows += run_case(op, cases.DTYPES[dtype], shape, ishape, args, progress, skipped)
            except torch.cuda.OutOfMemoryError as e:  # one case too big: go on with the rest
                notes.append(f"{op} {dtype} {shape}: out of memory ({str(e).splitlines()[0]})")
                torch.cuda.empty_cache()
    progress.clear()
    notes += [f"{name} not measured: {'; '.join(sorted(why))}" for name, why in skipped.items()]
    summary = report.overhead_summary(rows)
    print("\n".join(filter(None, [summary, *notes])))
    if args.out:
        for path in report.write_files(rows, meta, notes, args.out):
            print(f"wrote {path}")
    ours_bad = [r for r in rows if r["provider"] == "fusednorm" and r["status"] != "ok"]
    return 1 if ours_bad else 0


def _suite(args, argv: list[str]) -> int:
    """--calls, --vmap, --startup or --models: run, print the table, write results.json to
    --out."""
    meta = report.environment("cpu", argv)
    print(f"fusednorm bench on {meta['device']} ({meta['logical_cpus']} CPUs, torch "
          f"{meta['torch']}, {torch.get_num_threads()} threads, numba {meta['numba']})\n",
          flush=True)
    if args.calls:
        from fusednorm.bench import calls as suite

        rows = [r for dtype in args.dtypes
                for r in suite.run(rounds=args.rounds or 15, dtype=cases.DTYPES[dtype])]
    elif args.vmap:
        from fusednorm.bench import transforms as suite

        rows = suite.run(rounds=args.rounds or 15)
    elif args.startup:
        from fusednorm.bench import startup as suite

        rows = suite.run(dtypes=args.dtypes)
    else:
        from fusednorm.bench import models as suite

        try:
            rows = suite.run(models=args.model_names.split(","),
                             dtypes=[cases.DTYPES[d] for d in args.dtypes],
                             rounds=args.rounds or 15, variants=args.variants.split(","),
                             instances=args.instances,
                             progress=lambda s: print(f"  {s} ...", file=sys.stderr, flush=True))
        except suite.Unavailable as e:
            print(f"--models: {e}", file=sys.stderr)
            return 1
    print(suite.table(rows))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "results.json"
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        (args.out / "results.txt").write_text(suite.table(rows) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
