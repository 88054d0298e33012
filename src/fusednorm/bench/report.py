"""What a run leaves behind: the machine and versions, the terminal table, results.csv,
results.json and one PNG per op, mode and dtype (matplotlib is imported only here, lazily)."""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

FIELDS = ("op", "dtype", "mode", "shape", "input_shape", "tag", "M", "N", "provider", "status",
          "time_us", "time_min_us", "time_q1_us", "time_q3_us", "samples", "bytes", "gbps",
          "pct_copy", "mem_bytes", "worst_err_ratio", "note", "vs_torch_rounds",
          "vs_torch_ci95_lo", "vs_torch_ci95_hi")
META_FIELDS = ("device", "torch", "triton", "numba")
PACKAGES = ("torch", "triton", "numba", "fusednorm", "liger-kernel", "quack-kernels", "apex",
            "matplotlib")
REFERENCES = ("copy", "launch")


def _cpuinfo() -> tuple[str, int | None]:
    """CPU model and physical core count, from /proc/cpuinfo where there is one."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), None
    model, cores, phys = None, set(), None
    for line in text.splitlines():
        key, _, value = (p.strip() for p in line.partition(":"))
        if key == "model name" and model is None:
            model = value
        elif key == "physical id":
            phys = value
        elif key == "core id":
            cores.add((phys, value))
    return model or platform.machine(), len(cores) or None


def environment(device: str, argv: list[str]) -> dict:
    cpu, cores = _cpuinfo()
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "fusednorm", "bench", *argv]),
        "device_type": device,
        "device": cpu,
        "cpu": cpu,
        "physical_cores": cores,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        meta.update(device=torch.cuda.get_device_name(0), sm_count=p.multi_processor_count,
                    l2_bytes=getattr(p, "L2_cache_size", None), gpu_memory_bytes=p.total_memory,
                    cuda=torch.version.cuda)
    for pkg in PACKAGES:
        try:
            meta[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            meta[pkg] = None
    return meta


def _time(s: float | None) -> str:
    if s is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def block(rows: list[dict]) -> str:
    """One table block: rows of one (op, dtype, shape, mode), one line per provider."""
    r0 = rows[0]
    timed = {r["provider"]: r["time_us"] for r in rows if r["time_us"] is not None}
    head = f"{r0['op']}  {r0['dtype']}  {r0['shape']}  {r0['mode']}"
    head += "  [per-call overhead]" if r0["tag"] == "tiny" else ""
    # every column starts with a space: a wide value never runs into its neighbour
    lines = [f"{head}  (moves {r0['bytes'] / 1e6:.4g} MB)",
             f"  {'provider':<10} {'time':>10} {'GB/s':>9} {'% copy':>7} {'mem MB':>8}"
             + "".join(f" {'vs ' + p:>13}" for p in timed)]
    for r in rows:
        if r["time_us"] is None:
            lines.append(f"  {r['provider']:<10}  {r['status'].upper()}: {r['note']}")
            continue
        t = r["time_us"] * 1e-6
        mem = "-" if r["mem_bytes"] is None else f"{r['mem_bytes'] / 1e6:.4g}"
        pct = "-" if r["pct_copy"] is None else f"{r['pct_copy']:.0f}%"
        ratios = "".join(
            f" {'-' if p == r['provider'] else format(timed[p] / r['time_us'], '.2f') + 'x':>13}"
            for p in timed)
        gbps = "-" if r["gbps"] is None else f"{r['gbps']:.4g}"
        lines.append(f"  {r['provider']:<10} {_time(t):>10} {gbps:>9} {pct:>7} {mem:>8}"
                     + ratios)
    for r in rows:
        if r.get("vs_torch_ci95_lo") is not None:
            lines.append(f"  {r['provider']} vs torch round by round: "
                         f"{r['vs_torch_rounds']:.2f}x (95% CI {r['vs_torch_ci95_lo']:.2f}-"
                         f"{r['vs_torch_ci95_hi']:.2f})")
    return "\n".join(lines)


LEGEND = ("vs P = time of P / time of this line (above 1: faster than P); \"round by round\": "
          "the median of the rounds' own ratios, with its 95% confidence interval. GB/s counts "
          "the bytes every implementation must move; % copy compares with x.clone() timed in the "
          "same run.")


def overhead_summary(rows: list[dict]) -> str:
    tiny = [r for r in rows if r["tag"] == "tiny" and r["time_us"] is not None]
    if not tiny:
        return ""
    providers = list(dict.fromkeys(r["provider"] for r in tiny))
    table = defaultdict(dict)
    for r in tiny:
        table[(r["op"], r["dtype"], r["mode"])][r["provider"]] = r["time_us"]
    lines = ["per-call overhead: median time of one tiny call (1x64; channel norms 1x32x1x2)",
             f"  {'op':<16}{'dtype':<10}{'mode':<8}" + "".join(f"{p:>11}" for p in providers)]
    for (op, dtype, mode), t in table.items():
        cells = "".join(f"{_time(t[p] * 1e-6) if p in t else '-':>11}" for p in providers)
        lines.append(f"  {op:<16}{dtype:<10}{mode:<8}" + cells)
    return "\n".join(lines)


def _with_ratios(rows: list[dict]) -> list[dict]:
    """Each row with "vs": {provider: its time / this time} over the same op, dtype, shape, mode."""
    times = defaultdict(dict)
    for r in rows:
        if r["time_us"] is not None:
            times[(r["op"], r["dtype"], r["shape"], r["mode"])][r["provider"]] = r["time_us"]
    return [{**r, "vs": {p: t / r["time_us"] for p, t in
                         times[(r["op"], r["dtype"], r["shape"], r["mode"])].items()
                         if p != r["provider"]} if r["time_us"] else {}} for r in rows]


def write_files(rows: list[dict], meta: dict, notes: list[str], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS + META_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, **{k: meta.get(k) for k in META_FIELDS}})
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "notes": notes, "results": _with_ratios(rows)}, indent=1) + "\n")
    return [out / "results.csv", out / "results.json", *plots(rows, meta, out)]


def plots(rows: list[dict], meta: dict, out: Path) -> list[Path]:
    """GB/s against N, one line per provider, copy as a horizontal line (its median)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed (pip install ".[bench]" in the checkout): no plots',
              file=sys.stderr)
        return []
    groups = defaultdict(list)
    for r in rows:
        if r["tag"] not in ("tiny", "small") and r["gbps"] is not None:
            groups[(r["op"], r["mode"], r["dtype"])].append(r)
    versions = ", ".join(f"{k} {meta[k]}" for k in ("torch", "triton", "numba", "fusednorm")
                         if meta.get(k))
    paths = []
    for (op, mode, dtype), group in groups.items():
        # One point per (provider, N): the sweep shape where a headline shape shares its N.
        best = {}
        for r in sorted(group, key=lambda r: r["tag"] != "sweep", reverse=True):
            best[(r["provider"], r["N"])] = r
        fig, ax = plt.subplots(figsize=(8, 4.8))
        for p in dict.fromkeys(r["provider"] for r in group if r["provider"] not in REFERENCES):
            pts = sorted((n, r["gbps"]) for (q, n), r in best.items() if q == p)
            ax.plot(*zip(*pts), marker="o", label=p)
        copy = [r["gbps"] for (q, _), r in best.items() if q == "copy"]
        if copy:
            ax.axhline(statistics.median(copy), color="gray", linestyle="--",
                       label=f"copy (x.clone(), median {statistics.median(copy):.3g} GB/s)")
        ax.set_xscale("log", base=2)
        ns = sorted({n for _, n in best})
        ax.set_xticks(ns, [str(n) for n in ns], rotation=45 if len(ns) > 6 else 0)
        ax.minorticks_off()
        ax.set_xlabel("N (elements per row; channel norms: per group of 32)")
        ax.set_ylabel("GB/s (bytes that must move / time)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{op} {mode} {dtype} on {meta['device']}\n{versions}", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        path = out / f"{op}_{mode}_{dtype}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
