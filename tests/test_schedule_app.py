"""The app and schedules: every run writes schedule.yaml, `strategy=schedule
strategy.path=RUN/schedule.yaml` replays the run, `stage=schedule` writes a starter.

In-process app runs on the README's own-model example (examples/own_model)."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import own_model_app
import pytest
import yaml
from own_model_app import PROJECT, own_model_importable  # noqa: F401 (an autouse fixture)

SETTINGS = ("trainer.max_epochs=4", "transfer.source=null")


def compose(*overrides: str):
    return own_model_app.compose(*SETTINGS, *overrides)


def run(out: Path, *overrides: str) -> dict:
    return own_model_app.run(out, *SETTINGS, *overrides)


@pytest.mark.parametrize(
    "strategy",
    [
        ["strategy=gradual_unfreeze", "strategy.callbacks.gradual_unfreeze.every_n_epochs=1",
         "addons=[discriminative_lr]"],
        ["strategy=freeze_then_finetune",
         "strategy.callbacks.freeze_then_unfreeze.unfreeze_at_epoch=2", "addons=[warmup]",
         "strategy.addons.warmup.warmup_steps=4"],
    ],
    ids=["gradual_unfreeze+discriminative_lr", "freeze_then_finetune+warmup"],
)  # fmt: skip
def test_a_runs_schedule_yaml_replays_the_run(tmp_path, strategy):
    first = run(tmp_path / "run", *strategy)
    path = tmp_path / "run" / "schedule.yaml"
    assert len(yaml.safe_load(path.read_text())["phases"]) >= 2
    replay = run(tmp_path / "replay", "strategy=schedule", f"strategy.path={path}")
    assert filecmp.cmp(
        tmp_path / "run" / "lr_schedule.csv", tmp_path / "replay" / "lr_schedule.csv", shallow=False
    )
    for key in ("test_acc", "test_loss"):
        assert replay[key] == first[key], key
    assert replay["strategy"] == "schedule"


def test_a_bad_schedule_is_refused_before_any_work_naming_file_phase_and_key(tmp_path):
    from freezeft.app.build import build_run

    path = tmp_path / "schedule.yaml"
    path.write_text("phases:\n  - {epoch: 0, train: [head]}\n  - {epoch: 1, train: [encodr.0]}\n")
    with pytest.raises(ValueError, match=r"schedule.yaml: phase 1: 'encodr.0' is no layer group"):
        build_run(compose("strategy=schedule", f"strategy.path={path}"))
    path.write_text("phases:\n  - {epoch: 0, train: [head], lr_scal: 2}\n")
    with pytest.raises(Exception, match=r"schedule.yaml: phase 0: unknown key 'lr_scal'"):
        build_run(compose("strategy=schedule", f"strategy.path={path}"))


def test_the_starter_schedule_lists_the_models_groups_and_runs(tmp_path):
    from freezeft.app.starter import write_starter_schedule

    path = write_starter_schedule(compose(), tmp_path / "starter")
    written = yaml.safe_load(path.read_text())
    assert written["groups"] == ["encoder.0", "encoder.2", "head"]
    assert [p["train"] for p in written["phases"]] == [
        ["head"], ["encoder.2", "head"], ["*"]
    ]  # fmt: skip
    assert "strategy=schedule strategy.path=" in path.read_text()
    results = run(tmp_path / "run", "strategy=schedule", f"strategy.path={path}")
    assert results["status"] == "finished"


@pytest.mark.slow  # a subprocess: the command as typed
def test_stage_schedule_on_a_users_config_dir_writes_the_starter(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "freezeft.run", "--config-dir", "conf", "model=mynet",
         "data=mydata", "stage=schedule", f"hydra.run.dir={out}"],
        cwd=PROJECT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"wrote a starter schedule to {out / 'schedule.yaml'}" in proc.stdout
    assert "encoder.0" in proc.stdout + proc.stderr  # the group table
