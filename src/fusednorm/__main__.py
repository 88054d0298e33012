"""`python -m fusednorm bench [...]`: the benchmark command line (see fusednorm.bench)."""

from __future__ import annotations

import sys

USAGE = "usage: python -m fusednorm bench [--quick] [--out DIR] [...]  (bench --help for more)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["bench"]:
        print(USAGE, file=sys.stderr)
        return 2
    from fusednorm.bench.__main__ import main as bench

    return bench(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
