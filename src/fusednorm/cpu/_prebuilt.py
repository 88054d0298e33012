"""The kernels common calls use, shipped as numba's LLVM bitcode: a new environment's first call
waits for LLVM alone (~0.15 s a kernel), not for numba (~0.5 s to import and set up, then 0.5-1.2 s
a kernel).

`prebuilt/<target triple>.zip` holds, for each specialization that `python -m fusednorm warmup`
reaches, the kernel's LLVM module as numba left it just before its finalization, and the
manifest: the fingerprint of the kernels' source, the LLVM version and numba's pass options. On a
cache miss `_launch.Kernel` asks `object_code` first; the module is finalized by
`_llvm.finalize` (numba's passes: the same machine code as numba's), then cached like any other
kernel. The archive is used only where it was built from this very source, by this LLVM major
version, for this target; every other case, and every other key, is compiled by numba as before.
`FUSEDNORM_PREBUILT=0` turns it off. `make prebuilt` rebuilds it (tests/test_prebuilt.py fails
when the kernels' source has changed since).
"""

from __future__ import annotations

import json
import os
import threading
import zipfile
from pathlib import Path

FOLDER = Path(__file__).with_name("prebuilt")
MANIFEST = "manifest.json"


def archive_path() -> Path:
    import llvmlite.binding as ll

    return FOLDER / f"{ll.get_process_triple()}.zip"


def entry_name(kernel: str, key: tuple) -> str:
    """A specialization's name in the manifest."""
    return json.dumps([kernel, *key])


class _Shelf:
    """The archive's manifest, when usable here (`reason` says why not, else "")."""

    def __init__(self, source_hash: str) -> None:
        import llvmlite.binding as ll

        self.entries: dict[str, dict] = {}
        self.pipeline: dict = {}
        self.reason = ""
        self.path = archive_path()
        if os.environ.get("FUSEDNORM_PREBUILT", "1") == "0":
            self.reason = "turned off (FUSEDNORM_PREBUILT=0)"
            return
        try:
            with zipfile.ZipFile(self.path) as archive:
                manifest = json.loads(archive.read(MANIFEST))
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            self.reason = f"no archive for {ll.get_process_triple()}"
            return
        if manifest["source"] != source_hash:
            self.reason = "built from another version of the kernels' source"
        elif manifest["llvm"][0] != ll.llvm_version_info[0]:
            self.reason = f"built with LLVM {manifest['llvm'][0]}, not {ll.llvm_version_info[0]}"
        else:
            self.entries, self.pipeline = manifest["kernels"], manifest["pipeline"]

    def object_code(self, kernel: str, key: tuple) -> tuple[bytes, dict] | None:
        import llvmlite.binding as ll

        from fusednorm.cpu import _llvm

        entry = self.entries.get(entry_name(kernel, key))
        if entry is None:
            return None
        try:
            with zipfile.ZipFile(self.path) as archive:
                module = ll.parse_bitcode(archive.read(entry["member"]))
            obj = _llvm.finalize(module, self.pipeline)  # (optimizes module in place)
        except (OSError, KeyError, ValueError, RuntimeError, zipfile.BadZipFile):
            return None  # numba compiles it instead (a damaged archive, a module LLVM refuses)
        undefined = _llvm.undefined_symbols(module)
        return obj, {"key": list(key), "symbol": entry["symbol"], "undefined": undefined}


_shelf: _Shelf | None = None
_lock = threading.Lock()


def shelf(source_hash: str) -> _Shelf:
    global _shelf
    with _lock:
        if _shelf is None:
            _shelf = _Shelf(source_hash)
        return _shelf


def object_code(kernel: str, key: tuple, source_hash: str) -> tuple[bytes, dict] | None:
    """(object code, loader metadata) of a shipped specialization, None where there is none."""
    return shelf(source_hash).object_code(kernel, key)
