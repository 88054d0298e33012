"""The benchmark CLI, run in-process on tiny shapes: files written, wrong providers caught.

Tiny shapes only: this checks the plumbing (check → timing → table → CSV/JSON/PNG), not speed.
"""

import csv
import json

import torch

from fusednorm.bench import __main__ as cli
from fusednorm.bench import cases, providers
from fusednorm.bench.cases import bytes_moved


def _wrong_output(op, device):
    """torch's answer shifted by 0.1: the forward check must reject it."""
    f = providers.torch_eager(op, device)
    return lambda x, w, b, r: tuple(t + 0.1 for t in f(x, w, b, r))


def _wrong_gradient(op, device):
    """torch's forward, but twice the gradient: only the backward modes are invalid."""
    f = providers.torch_eager(op, device)

    def g(x, w, b, r):
        y, *rest = f(x, w, b, r)
        if y.requires_grad:
            y.register_hook(lambda grad: 2 * grad)
        return (y, *rest)
    return g


def _raises(op, device):
    def g(*args):
        raise RuntimeError("no C++ compiler")
    return g


def test_cli_writes_results_and_marks_wrong_providers(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(providers.PROVIDERS, "wrong", _wrong_output)
    monkeypatch.setitem(providers.PROVIDERS, "wronggrad", _wrong_gradient)
    monkeypatch.setitem(providers.PROVIDERS, "broken", _raises)
    monkeypatch.setitem(cli.TIMING, "quick", {"min_sample_s": 1e-4, "budget_s": 0, "rounds": (2, 2)})
    rc = cli.main(["bench", "--quick", "--device", "cpu", "--ops", "layer_norm,add_layer_norm",
                   "--dtypes", "bfloat16", "--modes", "fwd,bwd,fwdbwd",
                   "--shapes", "64x256,1x64", "--out", str(tmp_path),
                   "--providers", "fusednorm,torch,wrong,wronggrad,broken"])
    out, err = capsys.readouterr()

    rows = list(csv.DictReader((tmp_path / "results.csv").read_text().splitlines()))
    status = {(r["op"], r["dtype"], r["shape"], r["mode"], r["provider"]): r for r in rows}
    for op in ("layer_norm", "add_layer_norm"):
        for mode in ("fwd", "bwd", "fwdbwd"):
            key = (op, "bfloat16", "64x256", mode)
            assert status[(*key, "torch")]["status"] == "ok"
            assert float(status[(*key, "torch")]["gbps"]) > 0
            assert status[(*key, "copy")]["status"] == "ok"
            assert status[(*key, "wrong")]["status"] == "invalid"
            assert status[(*key, "wrong")]["time_us"] == ""  # no speed for a wrong answer
            assert status[(*key, "wronggrad")]["status"] == ("ok" if mode == "fwd" else "invalid")
            assert status[(*key, "broken")]["status"] == "error"
    assert status[("layer_norm", "bfloat16", "1x64", "fwd", "torch")]["tag"] == "tiny"
    assert "wrong GIVES WRONG RESULTS" in err and "max|y - ref|" in err
    assert "INVALID" in out and "per-call overhead" in out

    # every fusednorm row checks out (the other providers' failures do not fail the run)
    ours = [r for r in rows if r["provider"] == "fusednorm"]
    assert len(ours) == 2 * 3 * 2  # (op, mode, shape)
    assert all(r["status"] == "ok" for r in ours), [r for r in ours if r["status"] != "ok"]
    assert rc == 0
    # the round-by-round ratio to torch, for every timed provider but torch (two rounds: too
    # few for an interval)
    assert all(float(r["vs_torch_rounds"]) > 0 and r["vs_torch_ci95_lo"] == "" for r in ours)
    assert all(r["vs_torch_rounds"] == "" for r in rows if r["provider"] == "torch")
    saved = json.loads((tmp_path / "results.json").read_text())
    meta = saved["meta"]
    torch_row = next(r for r in saved["results"] if r["provider"] == "torch")
    assert torch_row["vs"]["copy"] > 0 and "wrong" not in torch_row["vs"]
    assert meta["device"] and meta["torch"] == torch.__version__ and "--quick" in meta["command"]
    for mode in ("fwd", "bwd", "fwdbwd"):
        assert (tmp_path / f"add_layer_norm_{mode}_bfloat16.png").stat().st_size > 0


def test_bytes_moved():
    # forward: read x, write y (M·N·4 each) and read weight, bias (N·4 each)
    assert bytes_moved("layer_norm", "fwd", (8, 16), torch.float32) == 2 * 8 * 16 * 4 + 2 * 16 * 4
    # add + rms norm forward and backward: 4 + 4 tensors; weight read twice, dweight written
    assert bytes_moved("add_rms_norm", "fwdbwd", (8, 16), torch.bfloat16) == (
        8 * 8 * 16 * 2 + 3 * 16 * 2)


def test_channel_norm_ops_are_checked_and_keep_their_layout(tmp_path, monkeypatch, capsys):
    """GroupNorm and BatchNorm cases, channels first and channels_last: every provider's answer
    is checked against the float64 reference of that op, and a wrong one is caught."""
    monkeypatch.setitem(providers.PROVIDERS, "wrong", _wrong_output)
    monkeypatch.setitem(cli.TIMING, "quick", {"min_sample_s": 1e-4, "budget_s": 0, "rounds": (2, 2)})
    ops = ("group_norm", "group_norm_nhwc", "group_norm_silu", "group_norm_silu_nhwc",
           "batch_norm", "batch_norm_nhwc")
    # (an (M, N) shape, and an input given as BxCxHxW, which row norms cannot take)
    rc = cli.main(["bench", "--quick", "--device", "cpu", "--ops", "channel_norms,layer_norm",
              "--dtypes", "float32", "--modes", "fwd,fwdbwd", "--shapes", "64x128,3x64x5x7",
              "--out", str(tmp_path), "--providers", "fusednorm,torch,wrong"])
    capsys.readouterr()
    rows = list(csv.DictReader((tmp_path / "results.csv").read_text().splitlines()))
    status = {(r["op"], r["mode"], r["provider"], r["input_shape"]): r for r in rows}
    for op in ops:
        for mode in ("fwd", "fwdbwd"):
            for shape in ("2x256x4x4", "3x64x5x7"):  # 64 = 2·32 groups of 8 channels
                assert status[(op, mode, "torch", shape)]["status"] == "ok"
                assert status[(op, mode, "fusednorm", shape)]["status"] == "ok"
                assert status[(op, mode, "wrong", shape)]["status"] == "invalid"
    assert {r["input_shape"] for r in rows if r["op"] == "layer_norm"} == {"64x128"}
    assert rc == 0
    x = cases.make_inputs("batch_norm_nhwc", torch.float32, (2, 8, 3, 3), "cpu").args[0]
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def test_a_sample_lasts_the_minimum_not_each_call(monkeypatch):
    # A fake clock: each call of the step takes 10 ms. A sample of at least 50 ms is 8 calls;
    # comparing each call's time to the minimum instead would take the cap (--models once did:
    # a 14 ms inference step then made 14 s samples and 40-minute runs).
    from fusednorm.bench import timing

    now = [0.0]

    def step():
        now[0] += 0.01

    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    assert timing.calls_per_sample(step, 0.05) == 8
    assert timing.calls_per_sample(step, 0.005) == 1


def test_vmap_suite_counts_one_launch_per_vmapped_call():
    """`bench --vmap`'s plumbing on a tiny case: timings, ratios and the launch count."""
    import torch.func as tf

    import fusednorm
    from fusednorm.bench import transforms

    x, w = torch.randn(4, 3, 8), torch.randn(8)
    case = transforms.Case(
        "tiny", lambda: tf.vmap(lambda xi: fusednorm.layer_norm(xi, (8,), w))(x),
        lambda: tf.vmap(lambda xi: torch.nn.functional.layer_norm(xi, (8,), w))(x),
        lambda: [fusednorm.layer_norm(xi, (8,), w) for xi in x], "row_norm")
    row = transforms.measure(case, rounds=2, sample_s=1e-4)
    assert row["launches"] == 1
    assert row["ours_ms"] > 0 and row["torch_over_ours"] > 0 and row["loop_over_ours"] > 0
    assert "tiny" in transforms.table([row])


def test_median_interval_is_the_sign_test_interval():
    """The 95% interval of a median: the order statistics of the published sign-test tables
    (n = 10: 2nd and 9th; 15: 4th and 12th; 25: 8th and 18th), none for 5 values, and on
    normal samples it holds the true median at least 95% of the time (about 96% for n = 25)."""
    import random

    from fusednorm.bench import timing

    for n, (lo, hi) in {10: (2, 9), 15: (4, 12), 25: (8, 18)}.items():
        values = [float(v) for v in range(n, 0, -1)]  # (any order)
        assert timing.median_interval(values) == (lo, hi)
    assert timing.median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None
    assert timing.median_interval([1.0] * 6) == (1.0, 1.0)
    rng = random.Random(0)
    sets = 4000
    held = sum(lo <= 0.0 <= hi for lo, hi in (
        timing.median_interval([rng.gauss(0, 1) for _ in range(25)]) for _ in range(sets)))
    assert 0.945 <= held / sets <= 0.975  # exact: 1 - 2 P(Bin(25, 1/2) <= 7) = 0.957


def test_models_table_shows_the_interval():
    from fusednorm.bench import models

    row = {"case": "unet infer 1x32x32 float32", "variant": "eager", "unpatched_ms": 40.0,
           "patched_ms": 39.0, "speedup": 1.02, "speedup_q1": 0.99, "speedup_q3": 1.05,
           "speedup_cpu": 1.01, "speedup_cpu_q1": 0.98, "speedup_cpu_q3": 1.04}
    assert "0.995-1.031" in models.table([{**row, "speedup_ci95": [0.995, 1.031]}])
    assert "(95% CI)" in models.table([{**row, "speedup_ci95": None}])


def test_the_first_measurement_of_a_process_is_dropped(tmp_path, monkeypatch):
    """The table's first timing of a process is taken twice, the first one thrown away (it read
    the provider warmed up first 25-50% slow); every later case and mode is timed once."""
    from fusednorm.bench import timing

    taken = []
    measure = timing.measure

    def counted(calls, *args, **kwargs):
        taken.append(sorted(calls))
        return measure(calls, *args, **kwargs)

    monkeypatch.setattr(cli, "_warmed", False)
    monkeypatch.setattr(timing, "measure", counted)
    monkeypatch.setitem(cli.TIMING, "quick",
                        {"min_sample_s": 1e-4, "budget_s": 0, "rounds": (2, 2)})
    assert cli.main(["bench", "--quick", "--device", "cpu", "--ops", "layer_norm", "--dtypes",
                     "float32", "--modes", "fwd,fwdbwd", "--shapes", "8x64,16x64", "--out",
                     str(tmp_path), "--providers", "fusednorm,torch"]) == 0
    assert len(taken) == 2 * 2 + 1  # (shapes x modes, and the dropped one)
    assert taken[0] == taken[1] == ["copy", "fusednorm", "torch"]


def test_models_average_each_side_over_its_instances(monkeypatch):
    """With several instances a side, a round's time per side is the mean over its instances,
    each instance timed once a round: a slow unpatched copy and a fast one against two patched
    copies between them is parity, not the first pair's 0.91x."""
    from fusednorm.bench import models

    timed = []

    def step(ms):
        def fn():
            return None
        fn.ms = ms
        return fn

    def fake_time(fn, k):
        timed.append(fn.ms)
        return fn.ms / 1e3, fn.ms / 1e3

    monkeypatch.setattr(models, "_time", fake_time)
    monkeypatch.setattr(models, "calls_per_sample", lambda fn, s: 1)
    c = models.Case("unet train 4x32x32 float32", [step(10.0), step(14.0)],
                    {"eager": [step(11.0), step(13.0)]})
    (row,) = models.measure(c, rounds=4)
    assert sorted(timed) == sorted([10.0, 14.0, 11.0, 13.0] * 4)  # each instance once a round
    assert row["speedup"] == 1.0 and row["instances"] == 2
    assert row["unpatched_ms"] == 12.0 and row["patched_ms"] == 12.0
    assert row["instance_ms"] == {"unpatched": [10.0, 14.0], "eager": [11.0, 13.0]}
    assert "2 instances a side" in models.table([row])
