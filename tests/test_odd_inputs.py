"""Every kind of tensor torch accepts, given to every public function: torch's result or
torch's error, never a crash.

The cases (tests/odd_inputs.py: zero-size, overlapping as_strided, expanded, negative and conj
views, complex, integer, quantized, mkldnn, sparse, meta, subclasses, a __torch_dispatch__
wrapper, a dead functorch wrapper, fake tensors, strided-nested and jagged tensors, odd weights)
run in a child process (one for all the families: starting one is most of the time), so that a
crash fails the test, naming its case, instead of killing the suite.
"""

import subprocess
import sys
from pathlib import Path

from odd_inputs import FAMILIES

RUNNER = Path(__file__).with_name("odd_inputs.py")


def test_odd_inputs_get_torchs_answer():
    run = subprocess.run([sys.executable, str(RUNNER)], capture_output=True, text=True,
                         timeout=600, check=False)
    lines = run.stdout.splitlines()
    started = [line.split(" ", 1)[1] for line in lines if line.startswith("start ")]
    assert run.returncode == 0, (
        f"the child crashed (exit {run.returncode}) in case {started[-1] if started else '?'!r}"
        f"\n{run.stderr[-2000:]}")
    differs = [line for line in lines if line.startswith("differs ")]
    assert not differs, "\n".join(differs)
    assert len(started) == sum(line.startswith("same ") for line in lines)
    assert {name.split(":")[0] for name in started} == set(FAMILIES)
