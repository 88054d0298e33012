"""`make prebuilt` (`python -m fusednorm.cpu.kernels._prebuild`): rebuild the archive of shipped
kernels (`cpu/_prebuilt`) for this target: every specialization `python -m fusednorm warmup`
reaches, compiled by numba up to its finalization. Run it after any change under cpu/ (the
archive records the source's fingerprint and is ignored once it differs)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import zipfile


def _write(path, manifest: dict, members: dict[str, bytes]) -> None:
    """A zip whose bytes depend on its content alone (fixed dates, sorted members)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w") as archive:
        for name, data in [("manifest.json", json.dumps(manifest, indent=1).encode()),
                           *sorted(members.items())]:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    os.replace(tmp, path)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="fusednorm-prebuild-") as cache:
        os.environ["FUSEDNORM_CACHE_DIR"] = cache  # every kernel compiled by numba, none loaded
        os.environ["FUSEDNORM_PREBUILT"] = "0"
        import llvmlite
        import llvmlite.binding as ll
        import numba

        from fusednorm import _setup
        from fusednorm.cpu import _launch, _prebuilt
        from fusednorm.cpu.kernels import _compile

        modules: dict[str, tuple[bytes, str]] = {}
        compile_kernel = _compile.compile_kernel

        def keeping(kernel, key, symbols, bitcode=None):
            kept: dict = {}
            obj, meta = compile_kernel(kernel, key, symbols, kept)
            modules[_prebuilt.entry_name(kernel.name, key)] = (kept["module"], meta["symbol"])
            return obj, meta

        _compile.compile_kernel = keeping
        _setup.warmup(progress=lambda s: print(f"compiled {s}", flush=True))
        members, kernels = {}, {}
        for i, name in enumerate(sorted(modules)):
            member = f"k{i:03d}.bc"
            members[member] = modules[name][0]
            kernels[name] = {"member": member, "symbol": modules[name][1]}
        manifest = {"source": _launch._runtime().source_hash, "triple": ll.get_process_triple(),
                    "llvm": list(ll.llvm_version_info), "llvmlite": llvmlite.__version__,
                    "numba": numba.__version__, "pipeline": _compile.pipeline(),
                    "kernels": kernels}
        path = _prebuilt.archive_path()
        _write(path, manifest, members)
    print(f"{path}: {len(kernels)} kernels, {path.stat().st_size / 1e3:.0f} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
