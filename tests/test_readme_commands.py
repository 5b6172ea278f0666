"""Every ``python -m freezeft.run`` command the README and docs show composes with the
packages ``pip install ".[dev]"`` brings (every extra): no unknown option, key or plugin
(issue 23). A sweep's comma lists are composed with their first value; commands on a
user's own config dir (``--config-dir``) are run by tests/test_own_model.py."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def commands() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", path.read_text(), re.S)
        for block in blocks:
            for command in block.replace("\\\n", " ").splitlines():
                command = command.split(" #")[0].strip()
                if command.startswith("python -m freezeft.run") and "--" not in command:
                    found.append((f"{path.relative_to(ROOT)}: {command}", command))
    return found


COMMANDS = commands()


def first_values(overrides: list[str]) -> list[str]:
    """Each sweep override (``a,b``, ``range(...)``) as its first value."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    chosen = []
    for text, override in zip(overrides, parsed, strict=True):
        if override.is_sweep_override():
            value = next(iter(override.sweep_string_iterator()))
            chosen.append(f"{text.split('=', 1)[0]}={value}")
        else:
            chosen.append(text)
    return chosen


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize("command", [c for _, c in COMMANDS], ids=[i for i, _ in COMMANDS])
def test_a_documented_command_composes(command):
    overrides = [a for a in shlex.split(command)[3:] if a not in ("-m", "--multirun")]
    with initialize_config_module(config_module="freezeft.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=first_values(overrides),
                      return_hydra_config=True)  # fmt: skip
    assert cfg.stage in ("transfer", "pretrain")
