import json, statistics, sys, glob, collections
root = sys.argv[1]
cells = collections.defaultdict(lambda: {"base": [], "new": []})
times = collections.defaultdict(list)
for kind in ("base", "new"):
    for f in sorted(glob.glob(f"{root}/{kind}_run*/results.json")):
        d = json.load(open(f))
        for r in d["results"]:
            times[kind, r["op"], r["dtype"], r["input_shape"], r["provider"]].append(r["time_us"])
            if r["provider"] == "fusednorm" and r.get("vs_torch_rounds"):
                cells[r["op"], r["dtype"], r["mode"], r["input_shape"]][kind].append(r["vs_torch_rounds"])
print(f"torch's time / ours (median over the runs of each run's median of per-round ratios), {len(next(iter(cells.values()))['base'])} runs each")
for k, v in cells.items():
    b, n = statistics.median(v["base"]), statistics.median(v["new"])
    print(f"{k[0]:16s} {k[1]:9s} {k[2]:7s} {k[3]:12s} base {b:.2f}x  new {n:.2f}x   runs base {' '.join(f'{x:.2f}' for x in v['base'])} | new {' '.join(f'{x:.2f}' for x in v['new'])}")
print("\nper-call times, µs (median over the runs): base ours / torch's | new ours / torch's")
for k in cells:
    op, dtype, _, shape = k
    m = {(kind, p): statistics.median(times[kind, op, dtype, shape, p]) for kind in ("base", "new") for p in ("fusednorm", "torch")}
    print(f"{op:16s} {dtype:9s} {shape:12s} {m['base', 'fusednorm']:6.0f} / {m['base', 'torch']:6.0f} | {m['new', 'fusednorm']:6.0f} / {m['new', 'torch']:6.0f}")
