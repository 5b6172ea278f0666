"""What ``pip install .`` (not editable) puts in the wheel: every module and every config.

pyproject.toml names its packages one by one (the configs live in ``conf/`` at the top and
install as ``freezeft.conf``), so a new folder under ``src/freezeft`` that is not named there
works in an editable checkout and is missing from every real install.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

pytestmark = pytest.mark.library

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def package_folder(package: str) -> Path:
    """The folder setuptools takes ``package`` from, by ``package-dir``."""
    dirs = SETUPTOOLS["package-dir"]
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in dirs:
            return ROOT / dirs[prefix] / Path(*parts[cut:])
    return ROOT / dirs[""] / Path(*parts)


def test_every_folder_of_python_modules_is_a_declared_package():
    declared = {package_folder(p).resolve() for p in SETUPTOOLS["packages"]}
    folders = {p.parent.resolve() for p in (ROOT / "src" / "freezeft").rglob("*.py")}
    missing = sorted(str(f.relative_to(ROOT)) for f in folders - declared)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"


def test_every_config_file_is_package_data():
    data = SETUPTOOLS["package-data"]
    missing = []
    for package in ("freezeft.conf", "freezeft.speech.conf"):
        folder = package_folder(package)
        for path in folder.rglob("*.yaml"):
            relative = path.relative_to(folder).as_posix()
            if not any(fnmatch.fnmatch(relative, glob) for glob in data[package]):
                missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
