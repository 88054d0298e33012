"""The command line: `python -m fusednorm {bench,warmup,info}` (also the `fusednorm` script)."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
fusednorm: normalization layers for PyTorch on their own CPU (numba) and GPU (Triton) kernels.

commands:
  bench    measure fusednorm against torch and the peers: kernel bandwidth (default), the
           cost of small calls (--calls), a new process's first call (--startup), whole
           Hugging Face models, patched against unpatched (--models)
  warmup   compile the CPU kernels common calls use, into the kernel cache, ahead of time
  info     versions, backends, threads and the kernel cache

`python -m fusednorm <command> --help` describes each."""


def _warmup(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fusednorm warmup",
        description="Compile the CPU kernels of common calls (LayerNorm, RMSNorm, with and "
        "without residual, forward and backward; GroupNorm and BatchNorm in both layouts) "
        "into the kernel cache, so that no first call waits for a compiler. About a second "
        "per kernel the first time; instant once cached. Then GroupNorm's C++ autograd node, "
        "where a C++ compiler is (~40 s once; FUSEDNORM_NATIVE=0: not).")
    p.add_argument("--dtypes", default="float32,bfloat16,float16",
                   help="comma list of input dtypes (default: %(default)s)")
    args = p.parse_args(argv)
    from fusednorm import _setup

    dtypes = [d for d in args.dtypes.split(",") if d]
    if bad := [d for d in dtypes if d not in _setup.WARMUP_DTYPES]:
        p.error(f"unknown dtypes: {', '.join(bad)} (known: {', '.join(_setup.WARMUP_DTYPES)})")
    count = _setup.warmup(dtypes, progress=lambda s: print(f"warmup {s}", flush=True))
    from fusednorm.cpu._launch import cache_dir

    print(f"{count} kernels ready in {cache_dir()}")
    print(_setup.build_native(), flush=True)
    return 0


def _info(argv: list[str]) -> int:
    argparse.ArgumentParser(
        prog="python -m fusednorm info",
        description="Print the versions, the backends available, the CPU kernels' threads and "
        "the kernel cache directory.").parse_args(argv)
    from fusednorm import _setup

    print(_setup.info())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"warmup": _warmup, "info": _info}
    if argv and argv[0] == "bench":
        from fusednorm.bench.__main__ import main as bench

        return bench(argv[1:])
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    p = argparse.ArgumentParser(prog="python -m fusednorm", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("bench", *commands), help="see below")
    p.parse_args(argv)  # --help exits 0 with the text above; anything else exits 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
