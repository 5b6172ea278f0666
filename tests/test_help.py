"""``python -m freezeft.run --help`` describes the app, its key options and every config
group a user picks, with each of its options; internal groups stay hidden (issue 23)."""

from __future__ import annotations

import sys
from pathlib import Path

from freezeft.app.main import cli

CONF = Path(__file__).parents[1] / "conf"
SPEECH_CONF = Path(__file__).parents[1] / "src" / "freezeft" / "speech" / "conf"
INTERNAL = {"parts", "speech", "hydra"}  # pieces other configs compose


def user_groups() -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for root in (CONF, SPEECH_CONF):
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            if folder.name not in INTERNAL and not folder.name.startswith("__"):
                groups.setdefault(folder.name, []).extend(p.stem for p in folder.glob("*.yaml"))
    return groups


def test_help_lists_every_group_a_user_picks_and_hides_the_internal_ones(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["freezeft.run", "--help"])
    try:
        cli()
    except SystemExit as stopped:
        assert stopped.code in (0, None)
    text = capsys.readouterr().out
    assert "run is powered by Hydra" not in text  # not Hydra's generic page
    for option in ("transfer.source=", "resume=", "stage=", "strategy=", "--cfg job"):
        assert option in text, option
    listed = {
        line.split(":")[0].strip(): line.split(":", 1)[1]
        for line in text.split("Config groups")[1].split("Show the composed config")[0].splitlines()
        if ":" in line and not line.startswith(" " * 8)
    }
    groups = user_groups()
    assert set(listed) == {*groups, "hydra/launcher"}, "--help lists the groups a user picks"
    block = text.split("Config groups")[1]
    for group, options in groups.items():
        for option in options:
            assert option in block, f"{group}={option} is not in --help"
    assert "parts" not in block
