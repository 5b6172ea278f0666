"""The generic library never imports the speech task or the app (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "freezeft"
APPS = ("run.py", "transcribe.py")  # the command-line programs of the speech app
GENERIC = sorted(
    [*SRC.glob("callbacks/*.py"), *(p for p in SRC.glob("*.py") if p.name not in APPS)]
)


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", GENERIC, ids=lambda p: str(p.relative_to(SRC)))
def test_generic_modules_import_no_speech_and_no_app(path):
    forbidden = {
        name for name in imported(path) if name.startswith(("freezeft.speech", "freezeft.run"))
    }
    assert not forbidden, f"{path.relative_to(SRC)} imports {sorted(forbidden)}"


@pytest.mark.parametrize(
    "path", sorted([SRC / "run.py", *SRC.glob("app/*.py")]), ids=lambda p: p.name
)
def test_the_app_reaches_the_speech_task_only_through_configs(path):
    speech = {name for name in imported(path) if name.startswith("freezeft.speech")}
    assert not speech, f"{path.relative_to(SRC)} imports {sorted(speech)}"
