"""The CPU launch layer (cpu/_launch.py) and the plans above it (row_norm.py, group_norms.py):
threads, the kernel cache, and plans that never serve a call they were not made for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from helpers import randn

import fusednorm
from fusednorm.cpu import _launch
from fusednorm.cpu import layer_norm as ln

# --- threads: torch's count, torch's pool --------------------------------------------------------


def _launches() -> list:
    """Every loaded kernel launcher of the CPU kernel families."""
    from fusednorm.cpu import _channels, batch_norm, group_norm, layer_norm

    return [launch for module in (layer_norm, group_norm, batch_norm, _channels)
            for family in vars(module).values() if isinstance(family, _launch.Kernel)
            for launch in family._compiled.values()]


def _threads_used(fn) -> list[int]:
    """The thread counts of the kernel launches fn makes (1: on the calling thread). The
    launchers call `serial` and `on_threads` themselves; `Launch.__call__` calls them too."""
    fn()  # (every kernel fn needs loaded)
    seen, swapped = [], []
    for launch in _launches():
        on_threads, serial = launch.on_threads, launch.serial
        swapped.append((launch, on_threads, serial))
        launch.on_threads = lambda block, n, flags, f=on_threads: (seen.append(n), f(block, n, flags))
        launch.serial = lambda block, f=serial: (seen.append(1), f(block))
    try:
        fn()
    finally:
        for launch, on_threads, serial in swapped:
            launch.on_threads, launch.serial = on_threads, serial
    return seen


def _with_threads(threads, fn):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
def test_kernels_follow_torch_set_num_threads(threads):
    x = randn(256, 1024, requires_grad=True)  # above the grain: a parallel call
    norm = fusednorm.LayerNorm(1024)
    seen = _with_threads(threads, lambda: _threads_used(lambda: norm(x).sum().backward()))
    assert len(seen) == 2 and set(seen) == {threads}


@pytest.mark.parametrize("norm", ["group", "batch"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_channel_norm_launches_follow_torch_set_num_threads(threads, channels_last, norm,
                                                             monkeypatch):
    # (the launches the Python nodes make: GroupNorm's C++ node, cpu/_native.py, launches from
    # C++, where these records cannot see it; fresh plans, none of them on it)
    from fusednorm import group_norms
    from fusednorm._plan_cache import PlanCache
    from fusednorm.cpu import _native

    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(group_norms, "_PLANS", PlanCache())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = randn(8, 64, 32, 32).contiguous(memory_format=fmt).requires_grad_()
    module = fusednorm.GroupNorm(8, 64) if norm == "group" else fusednorm.BatchNorm2d(64)
    seen = _with_threads(threads, lambda: _threads_used(lambda: module(x).sum().backward()))
    assert len(seen) == 2 and set(seen) == {threads}


def test_without_an_openmp_runtime_a_launch_runs_serially(monkeypatch):
    """Where no OpenMP runtime was found, `on_threads` runs the kernel on the calling thread."""
    monkeypatch.setattr(_launch._runtime().openmp, "parallel", None)
    launch = _launch.Launch(0)  # (never called: `serial` is replaced)
    blocks = []
    launch.serial = blocks.append
    launch.on_threads(b"block", 2, 0)
    launch(b"other", 2)
    assert blocks == [b"block", b"other"]


def test_one_thread_pool():
    """The kernels run on torch's OpenMP threads: no thread is started for them."""
    if not os.path.isdir("/proc/self/task") or _launch.openmp_runtime() is None:
        pytest.skip("needs Linux's /proc and torch built with OpenMP")
    torch.set_num_threads(2)
    x = randn(512, 1024)
    F.layer_norm(x, (1024,))  # torch's pool is up
    count = len(os.listdir("/proc/self/task"))
    for _ in range(3):
        fusednorm.layer_norm(x, (1024,))
        fusednorm.group_norm(x.view(8, 64, 1024), 8)
    assert len(os.listdir("/proc/self/task")) == count


def test_a_first_kernel_leaves_torch_thread_count_alone():
    """(numba's own threading layer set torch's OpenMP thread count on its first launch.)"""
    code = ("import torch, fusednorm; torch.set_num_threads(1); "
            "fusednorm.layer_norm(torch.randn(512, 1024), (1024,)); "
            "print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


# --- the kernel cache ------------------------------------------------------------------------------


def test_a_cached_kernel_loads_without_numba(tmp_path):
    """The first process compiles into the cache directory (numba: the shipped kernels turned
    off); the next loads the machine code and never imports numba."""
    code = ("import json, sys, torch, fusednorm; x = torch.randn(4, 96, requires_grad=True); "
            "fusednorm.LayerNorm(96)(x).sum().backward(); "
            "print(json.dumps({'numba': 'numba' in sys.modules}))")
    env = dict(os.environ, FUSEDNORM_CACHE_DIR=str(tmp_path), FUSEDNORM_PREBUILT="0")
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           check=True)
    files = list(tmp_path.rglob("*.o"))
    assert len(files) >= 2 and all(f.stat().st_size for f in files)  # forward and backward
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, check=True)
    assert json.loads(first.stdout.splitlines()[-1]) == {"numba": True}
    assert json.loads(second.stdout.splitlines()[-1]) == {"numba": False}


def test_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSEDNORM_CACHE_DIR", str(tmp_path))
    assert _launch.cache_dir().parent == tmp_path
    monkeypatch.delenv("FUSEDNORM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _launch.cache_dir().parent == tmp_path / "xdg" / "fusednorm"
    assert "site-packages" not in str(_launch.cache_dir())


def test_a_new_build_folder_removes_builds_unused_for_a_month(tmp_path):
    """Each build of the kernels (fusednorm, numba, CPU, source) gets its own folder; making a
    new one removes the siblings nobody has loaded from for STALE_AFTER_S, and nothing else."""
    old = time.time() - _launch.STALE_AFTER_S - 3600
    for name in ("kernels-stale", "kernels-recent", "unrelated"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "k.o").write_bytes(b"x")
    for name in ("kernels-stale", "unrelated"):
        os.utime(tmp_path / name, (old, old))
    new = tmp_path / "kernels-new"
    _launch._store(new, new / "k.o", new / "k.json", b"obj", {"key": []})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "kernels-new", "kernels-recent", "unrelated"]
    assert (new / "k.o").read_bytes() == b"obj"


def test_loading_from_a_build_folder_marks_it_used(tmp_path):
    folder = tmp_path / "kernels-x"
    folder.mkdir()
    old = time.time() - _launch.STALE_AFTER_S - 3600
    os.utime(folder, (old, old))
    _launch._mark_used(folder)
    assert folder.stat().st_mtime > old + 3600


def test_a_kernel_needing_an_unknown_symbol_is_not_loaded():
    """A cache entry naming a symbol this process lacks is not loaded (the JIT would abort)."""
    rt = _launch._runtime()
    from fusednorm.cpu.kernels import _compile

    fusednorm.layer_norm(randn(2, 8), (8,))
    kernel = ln._FWD
    key = next(iter(kernel._compiled))
    obj, meta = _compile.compile_kernel(kernel, key, rt.symbols)
    assert rt.load(obj, meta)
    assert rt.load(obj, {**meta, "undefined": [*meta["undefined"], "no_such_symbol_xyz"]}) is None


# --- plans: one per call signature -----------------------------------------------------------------


def _same_as_torch(y, x, w, b, shape=None):
    torch.testing.assert_close(y, F.layer_norm(x, shape or (x.shape[-1],), w, b))


def test_plan_never_serves_another_signature():
    n = 48
    w, b = randn(n), randn(n)
    x = randn(6, n)
    _same_as_torch(fusednorm.layer_norm(x, (n,), w, b), x, w, b)  # the plan is made
    # another shape; other strides (a slice's rows read in place, a transpose's copied)
    for other in (randn(7, n), randn(6, 2 * n)[:, :n], randn(n, 6).t()):
        _same_as_torch(fusednorm.layer_norm(other, (n,), w, b), other, w, b)
    xb = x.to(torch.bfloat16)
    y = fusednorm.layer_norm(xb, (n,), w.bfloat16(), b.bfloat16())
    assert y.dtype == torch.bfloat16
    # requires_grad: a gradient appears where the first call needed none
    xg = x.clone().requires_grad_()
    y = fusednorm.layer_norm(xg, (n,), w, b)
    assert y.requires_grad
    y.sum().backward()
    assert xg.grad is not None
    # flags: a residual and another eps change the result
    r = randn(6, n)
    y, h = fusednorm.layer_norm(x, (n,), w, b, residual=r)
    torch.testing.assert_close(h, x + r)
    _same_as_torch(y, x + r, w, b)
    torch.testing.assert_close(fusednorm.layer_norm(x, (n,), w, b, eps=0.5),
                               F.layer_norm(x, (n,), w, b, eps=0.5))
    # the parameters: absent, of another dtype
    _same_as_torch(fusednorm.layer_norm(x, (n,)), x, None, None)
    with torch.no_grad():  # the same call without grad mode: no graph
        assert not fusednorm.layer_norm(xg, (n,), w, b).requires_grad


def test_errors_are_raised_after_a_plan_exists():
    n = 32
    x, w = randn(4, n), randn(n)
    fusednorm.layer_norm(x, (n,), w)
    fusednorm.rms_norm(x, (n,), w)
    fusednorm.group_norm(randn(2, 8, 4), 4, randn(8))
    for _ in range(2):  # a second time too: no plan was kept for the bad call
        with pytest.raises(RuntimeError) as ours:
            fusednorm.layer_norm(x, (n,), randn(n + 1))
        with pytest.raises(RuntimeError) as theirs:
            F.layer_norm(x, (n,), randn(n + 1))
        assert str(ours.value) == str(theirs.value)
        with pytest.raises(RuntimeError) as ours:
            fusednorm.rms_norm(x, (n + 1,), w)
        with pytest.raises(RuntimeError) as theirs:
            F.rms_norm(x, (n + 1,), w)
        assert str(ours.value) == str(theirs.value)
        with pytest.raises(RuntimeError) as ours:
            fusednorm.group_norm(randn(2, 8, 4), 3, randn(8))
        with pytest.raises(RuntimeError) as theirs:
            F.group_norm(randn(2, 8, 4), 3, randn(8))
        assert str(ours.value) == str(theirs.value)


def test_group_norm_plan_never_serves_another_signature():
    w, b = randn(8), randn(8)
    x = randn(2, 8, 3, 3)
    torch.testing.assert_close(fusednorm.group_norm(x, 4, w, b), F.group_norm(x, 4, w, b))
    cl = x.contiguous(memory_format=torch.channels_last)  # same shape, other strides
    y = fusednorm.group_norm(cl, 4, w, b)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, F.group_norm(x, 4, w, b))
    torch.testing.assert_close(fusednorm.group_norm(x, 2, w, b), F.group_norm(x, 2, w, b))
    torch.testing.assert_close(fusednorm.group_norm(x, 4), F.group_norm(x, 4))
    xg = x.clone().requires_grad_()
    fusednorm.group_norm(xg, 4, w, b).sum().backward()
    assert xg.grad is not None


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("family", ["group_norm", "batch_norm"])
def test_a_forward_leaves_the_backward_kernel_to_the_first_backward(monkeypatch, family,
                                                                    channels_last):
    """A first forward waits for its own kernel's compilation only (inference never needs the
    backward's, and a training step's first forward would otherwise wait for both)."""
    from fusednorm.cpu import _channels, batch_norm, group_norm

    launcher = {"group_norm": group_norm, "batch_norm": batch_norm}[family]
    home = _channels if channels_last else launcher  # (channels last: one kernel for both)
    name = "_CL_BWD" if channels_last else "_CF_BWD"
    asked = []
    kernel = getattr(home, name)

    class Recording:
        def __getitem__(self, key):
            asked.append(key)
            return kernel[key]

    monkeypatch.setattr(home, name, Recording())
    monkeypatch.setattr(launcher, "_PLANS", {})
    x = randn(3, 8, 5, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    norm = (fusednorm.GroupNorm(4, 8) if family == "group_norm" else fusednorm.BatchNorm2d(8))
    with fusednorm.use_backend("cpu"):
        y = norm(x)
        assert asked == []
        y.sum().backward()
    assert len(asked) == 1 and x.grad is not None


@pytest.mark.parametrize("op", ["layer_norm", "residual", "group_norm"])
def test_fast_apply_unwraps_a_tensor_left_by_a_functorch_transform(op):
    """A tensor kept from inside torch.func.grad is a dead functorch wrapper, with no storage for
    a kernel to read: torch's ops (and `Function.apply`) unwrap it, and so do the plans, with
    grad and without (the Functions are called without torch's Python `apply`,
    _autograd.py)."""
    kept = {}

    def keep(x):
        kept["x"] = x
        return x.sum()

    x = randn(4, 8, 3, requires_grad=True)
    torch.func.grad(keep)(x)
    with torch.no_grad():
        torch.func.grad(keep)(x.detach())
        nograd = kept["x"]
        expected = (F.layer_norm(x, (3,)) if op != "group_norm" else F.group_norm(x, 2))
        ours = (fusednorm.layer_norm(nograd, (3,)) if op != "group_norm"
                else fusednorm.group_norm(nograd, 2))
        torch.testing.assert_close(ours, expected)
    torch.func.grad(keep)(x)
    dead, w, b, r = kept["x"], randn(3).requires_grad_(), randn(3), randn(4, 8, 3)
    assert torch._C._functorch.is_functorch_wrapped_tensor(dead)
    if op == "layer_norm":
        ours, theirs = fusednorm.layer_norm(dead, (3,), w, b), F.layer_norm(x, (3,), w, b)
    elif op == "residual":
        ours = fusednorm.layer_norm(dead, (3,), w, b, residual=r)[0]
        theirs = F.layer_norm(x + r, (3,), w, b)
    else:
        w8 = randn(8).requires_grad_()
        ours, theirs = fusednorm.group_norm(dead, 2, w8), F.group_norm(x, 2, w8)
    torch.testing.assert_close(ours, theirs)
    ours.sum().backward()


def test_a_kernel_that_raises_reports_and_aborts(tmp_path):
    """numba's error paths, never taken by fusednorm's kernels, are bound to a stub that says
    what happened before aborting (a raw abort() would leave no trace)."""
    code = """
import torch
from fusednorm.cpu._launch import Kernel, Layout

def build():
    def entry(block):
        raise ValueError("boom")
    return entry

Kernel("raises", Layout(("x",), ()), build)[()](b"\\0" * 8)
"""
    env = dict(os.environ, FUSEDNORM_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=False)
    assert out.returncode != 0
    assert "fusednorm: a CPU kernel reached numba's" in out.stderr
