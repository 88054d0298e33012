"""Print a results.csv of `python -m fusednorm bench` as a Markdown table for the README:
one line per (op, dtype, shape, mode), fusednorm's time and GB/s, its % of the copy's bandwidth
and its speed-up over every other provider."""

import csv
import sys
from collections import defaultdict


def main(path: str) -> None:
    rows = defaultdict(dict)
    with open(path) as f:
        for r in csv.DictReader(f):
            rows[(r["op"], r["dtype"], r["shape"], r["mode"])][r["provider"]] = r
    others = sorted({p for by in rows.values() for p in by} - {"fusednorm", "copy"})
    print("| op | dtype | M×N | mode | fusednorm | GB/s | % of copy | "
          + " | ".join(f"vs {p}" for p in others) + " |")
    print("|---" * (7 + len(others)) + "|")
    for (op, dtype, shape, mode), by in rows.items():
        ours = by.get("fusednorm")
        if not ours or ours["status"] != "ok":
            continue
        t = float(ours["time_us"])
        ratios = [f"{float(by[p]['time_us']) / t:.2f}x" if p in by and by[p]["status"] == "ok"
                  else "-" for p in others]
        pct = f"{float(ours['pct_copy']):.0f}%" if ours["pct_copy"] else "-"
        print(f"| {op} | {dtype} | {shape} | {mode} | {t / 1000:.3g} ms | "
              f"{float(ours['gbps']):.2f} | {pct} | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
