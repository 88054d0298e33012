"""The command line: `python -m fusednorm {bench,warmup,info}`, its help and exit codes, and the
benchmark suites' plumbing on tiny cases (timings are never asserted)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fusednorm.__main__ import main
from fusednorm.bench import calls, models, startup


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusednorm", *args], check=False,
                          capture_output=True, text=True)


def test_help_lists_the_commands_and_exits_0():
    out = _run("--help")
    assert out.returncode == 0
    for command in ("bench", "warmup", "info"):
        assert f"  {command} " in out.stdout


def test_no_command_or_an_unknown_one_exits_2():
    assert _run().returncode == 2
    out = _run("nope")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_each_command_has_help(capsys):
    for command in ("bench", "warmup", "info"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        assert f"python -m fusednorm {command}" in capsys.readouterr().out


def test_info_names_versions_threads_and_cache(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    import fusednorm
    from fusednorm.cpu._launch import cache_dir

    assert f"fusednorm {fusednorm.__version__}" in out
    assert str(cache_dir()) in out
    assert f"torch.get_num_threads() = {torch.get_num_threads()}" in out


def test_warmup_loads_the_kernels_and_refuses_unknown_dtypes(capsys):
    assert main(["warmup", "--dtypes", "float32"]) == 0
    assert "kernels ready in" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["warmup", "--dtypes", "float8"])
    assert e.value.code == 2


def test_bench_names_every_known_op_when_one_is_unknown(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--ops", "nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    for op in ("layer_norm", "add_norm", "channel_norms"):
        assert op in err


def test_bench_calls_suite(monkeypatch, capsys, tmp_path):
    cases = calls.cases()
    monkeypatch.setattr(calls, "cases", lambda dtype: [cases[0], cases[3]])
    assert main(["bench", "--calls", "--rounds", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "layer_norm 1x768" in out and "LayerNorm 1x768" in out
    assert (tmp_path / "results.json").is_file()


def test_models_patched_match_unpatched_on_tiny_configs(monkeypatch):
    """The suite's own check (same logits) on tiny models; one round each."""
    pytest.importorskip("transformers")
    monkeypatch.setattr(models, "WIDTH", 64)
    monkeypatch.setattr(models, "HEADS", 4)
    monkeypatch.setattr(models, "LAYERS", 1)
    rows = models.run(workloads=("infer 1x1",), dtypes=(torch.float32,), rounds=1,
                      variants=("eager", "fused", "no-norm"))  # (GPT-2 has no layer to fuse)
    assert [(r["case"], r["variant"]) for r in rows] == [
        ("gpt2 infer 1x1 float32", "eager"), ("gpt2 infer 1x1 float32", "no-norm"),
        ("llama infer 1x1 float32", "eager"), ("llama infer 1x1 float32", "fused"),
        ("llama infer 1x1 float32", "no-norm")]
    assert all(r["speedup"] > 0 and r["speedup_cpu"] > 0 for r in rows)


def test_models_diffusion_cases_on_tiny_configs(monkeypatch):
    """The suite's UNet and autoencoder cases (inputs, outputs checked, patched and copy) on
    tiny configs; bfloat16 training steps skipped where the CPU has no bfloat16 matmuls."""
    diffusers = pytest.importorskip("diffusers")
    small = {"block_out_channels": (32, 32), "layers_per_block": 1}
    monkeypatch.setitem(models.MODELS, "unet", lambda dtype: diffusers.UNet2DModel(
        sample_size=32, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), **small).to(dtype))
    monkeypatch.setitem(models.MODELS, "vae", lambda dtype: diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        **small).to(dtype))
    monkeypatch.setattr(models, "IMAGE_WORKLOADS", {  # (smaller images; one call a sample)
        "unet": {"infer 1x8x8": (1, 8, False)}, "vae": {"train 2x8x8": (2, 8, True)}})
    monkeypatch.setattr(models, "calls_per_sample", lambda fn, min_sample_s: 1)
    rows = models.run(models=("unet", "vae"), dtypes=(torch.float32,), rounds=1,
                      variants=("eager", "copy"))
    assert [(r["case"], r["variant"]) for r in rows] == [
        ("unet infer 1x8x8 float32", "eager"), ("unet infer 1x8x8 float32", "copy"),
        ("vae train 2x8x8 float32", "eager"), ("vae train 2x8x8 float32", "copy")]
    monkeypatch.setattr(models, "native_bf16_matmul", lambda: False)
    skipped = []
    assert models.run(models=("vae",), dtypes=(torch.bfloat16,), rounds=1,
                      progress=skipped.append) == []
    assert skipped == ["vae train 2x8x8 bfloat16 skipped: no bfloat16 matmuls"]


def test_models_no_norm_ceiling_has_no_norm_left(monkeypatch):
    """The ceiling variant times the model with every norm that patch replaces gone."""
    pytest.importorskip("transformers")
    monkeypatch.setattr(models, "WIDTH", 64)
    monkeypatch.setattr(models, "HEADS", 4)
    monkeypatch.setattr(models, "LAYERS", 1)
    seen = []
    monkeypatch.setattr(models, "_step", lambda model, ids, train: seen.append(model))
    models.case("llama", "infer 1x1", torch.float32, ("no-norm",))
    unpatched, ceiling = seen
    assert any("RMSNorm" in type(m).__name__ for m in unpatched.modules())
    assert not any("Norm" in type(m).__name__ for m in ceiling.modules())
    assert sum(isinstance(m, torch.nn.Identity) for m in ceiling.modules()) == 3  # 2 + final


def test_startup_processes_need_numba_only_without_shipped_kernels():
    """The startup suite's plumbing, once: the cold process finalizes the shipped kernels and the
    warm one loads the cache the cold one left (neither imports numba); without the shipped
    kernels numba compiles; torch's first call is timed apart from ours."""
    rows = startup.run(dtypes=("float32",), repeats=1, norms=("GroupNorm-cl",))
    assert [(r["cache"], r["numba_imported"]) for r in rows] == [
        ("cold", False), ("warm", False), ("numba", True)]
    assert all(r["torch_first_call"] > 0 and r["forward"] > 0 for r in rows)
    assert "torch's 1st fwd+bwd" in startup.table(rows)
