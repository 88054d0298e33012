"""The version and the license say the same thing wherever they are written."""

import importlib.metadata
import pathlib
import re

import fusednorm

ROOT = pathlib.Path(__file__).parent.parent
PYPROJECT = (ROOT / "pyproject.toml").read_text()


def project_field(name: str) -> str:
    """A string field of pyproject.toml's [project] table (a regex: tomllib is Python 3.11+)."""
    table = PYPROJECT.split("[project]", 1)[1].split("\n[", 1)[0]
    return re.search(rf'^{name} = "([^"]*)"', table, re.MULTILINE).group(1)


def test_version_is_pyprojects_and_the_installed_metadatas():
    assert fusednorm.__version__ == project_field("version")
    assert fusednorm.__version__ == importlib.metadata.version("fusednorm")


def test_license_file_is_the_license_pyproject_names():
    assert project_field("license") == "BSD-3-Clause"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License\n\nCopyright (c) ")
    for clause in ("1. Redistributions of source code must retain",
                   "2. Redistributions in binary form must reproduce",
                   "3. Neither the name of the copyright holder"):
        assert clause in text


def test_the_shipped_kernels_are_package_data():
    """pyproject's package data names the archive of shipped kernels (cpu/_prebuilt.py): a
    wheel without it would compile every kernel with numba."""
    from fusednorm.cpu import _prebuilt

    table = PYPROJECT.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    globs = re.findall(r'^"fusednorm\.cpu" = \[(.*)\]', table, re.MULTILINE)
    archive = _prebuilt.archive_path().relative_to(ROOT / "src" / "fusednorm" / "cpu")
    assert any(archive.match(g.strip().strip('"')) for g in globs[0].split(","))
