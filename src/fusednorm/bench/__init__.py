"""The benchmark CLI: `python -m fusednorm bench --help`.

cases.py (ops, shapes, inputs, references, bytes moved) → providers.py (what is compared) →
check.py (correctness before timing) → timing.py (round-robin medians, memory) → report.py
(table, CSV/JSON, PNG) → __main__.py (the command line and the loop).
"""
