"""The README works as written: its Python blocks run, its install lines name real extras."""

import pathlib
import re
import runpy

ROOT = pathlib.Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def python_blocks_as_one_script(text: str) -> tuple[str, int]:
    """The README with every line outside its ```python blocks blanked, so that a traceback's
    line numbers are the README's; and the number of blocks."""
    lines, inside, blocks = [], False, 0
    for line in text.splitlines():
        if not inside and line.strip() == "```python":
            inside, blocks = True, blocks + 1
            lines.append("")
        elif inside and line.strip() == "```":
            inside = False
            lines.append("")
        else:
            lines.append(line if inside else "")
    assert not inside, "a ```python block is never closed"
    return "\n".join(lines), blocks


def test_python_blocks_run_top_to_bottom_as_one_script(tmp_path):
    source, blocks = python_blocks_as_one_script(README)
    assert blocks >= 3  # Use, choosing the kernels, existing models: fences still recognised
    script = tmp_path / "README.md.py"  # a failure reads "README.md.py", line N: README's line N
    script.write_text(source)
    runpy.run_path(str(script), run_name="__main__")


def test_install_lines_name_pyprojects_extras_from_a_checkout():
    pyproject = (ROOT / "pyproject.toml").read_text()
    table = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = set(re.findall(r"^(\w+) = \[", table, re.MULTILINE))
    assert extras and set(re.findall(r'pip install "\.\[(\w+)\]"', README)) <= extras
    assert set(re.findall(r"^\| `(\w+)` \| ", README, re.MULTILINE)) >= extras  # each described
    # `pip install fusednorm[...]` would look for the package on an index, not in the checkout
    assert "pip install fusednorm" not in README
