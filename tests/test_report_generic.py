"""The report ranks any task's runs by what the runs declare, in the declared direction."""

from __future__ import annotations

import csv
import json

import pytest

from freezeft import task
from freezeft.report import write_report


def job(sweep, number: int, strategy: str, seed: int, **results) -> None:
    folder = sweep / str(number)
    folder.mkdir(parents=True)
    monitor = results.pop("monitor", "val_acc")
    tested = {k: v for k, v in results.items() if k.startswith("test")}
    record = {
        **results,
        "strategy": strategy,
        "seed": seed,
        "epochs": 3,
        "best_epoch": 2,
        "train_seconds": 1.0 + number,
        "trainable_params": 10,
        "monitor": monitor,
        "report": task.report_spec(object(), monitor, "max", tested),
        "transfer": None if strategy == "scratch" else {},
        "budget": {"max_epochs": 3, "protocol": "fixed"},
    }
    (folder / "results.json").write_text(json.dumps(record))


def test_higher_is_better_ranks_the_highest_mean_first(tmp_path):
    for number, (strategy, seed, acc) in enumerate(
        [
            ("naive", 0, 0.80),
            ("naive", 1, 0.82),
            ("scratch", 0, 0.70),
            ("scratch", 1, 0.66),
            ("frozen_encoder", 0, 0.90),
            ("frozen_encoder", 1, 0.88),
        ]  # fmt: skip
    ):
        job(tmp_path, number, strategy, seed, test_acc=acc, test_loss=1 - acc)
    report = write_report(tmp_path).read_text()
    with open(tmp_path / "report.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["strategy"] for row in rows] == ["frozen_encoder", "naive", "scratch"]
    assert float(rows[0]["test_acc_mean"]) == 0.89
    assert "Winner: **frozen_encoder** (highest mean test_acc)" in report
    assert "| frozen_encoder | 2 | 0.890 ± 0.014 | 0.110 ± 0.014 |" in report  # acc, loss
    assert (tmp_path / "acc_vs_time.png").read_bytes()[:4] == b"\x89PNG"
    assert "scratch " not in report.replace("| scratch |", "")  # scratch is not split off


def test_a_metric_named_with_a_slash_has_its_test_counterpart(tmp_path):
    assert task.test_counterpart("val/mae") == "test/mae"
    assert task.test_counterpart("val_acc") == "test_acc"
    assert task.dev_key("val/mae") == "dev_mae"
    for number, (strategy, value) in enumerate([("naive", 0.4), ("scratch", 0.6)]):
        job(tmp_path, number, strategy, 0, monitor="val/mae", **{"test/mae": value})
    report = write_report(tmp_path).read_text()
    assert "Winner: **scratch** (highest mean test/mae)" in report  # mode "max" as declared


def test_a_diverged_run_is_listed_apart_and_never_averaged_in(tmp_path):
    job(tmp_path, 0, "naive", 0, test_acc=0.80, test_loss=0.2)
    job(tmp_path, 1, "naive", 1, test_acc=0.84, test_loss=0.16)
    job(tmp_path, 2, "scratch", 0, test_acc=0.70, test_loss=0.3)
    diverged = tmp_path / "3"
    (diverged / ".hydra").mkdir(parents=True)
    (diverged / ".hydra" / "overrides.yaml").write_text("- strategy=naive\n- seed=2\n")
    (diverged / "results.json").write_text(json.dumps({
        "status": "diverged", "strategy": "naive", "seed": 2, "monitor": "val_acc",
        "diverged": {"step": 2, "epoch": 0, "lr": [1e30], "what": "NaN in head.weight"},
    }))  # fmt: skip
    report = write_report(tmp_path).read_text()
    with open(tmp_path / "report.csv") as stream:
        rows = {row["strategy"]: row for row in csv.DictReader(stream)}
    assert rows["naive"]["runs"] == "2" and float(rows["naive"]["test_acc_mean"]) == pytest.approx(
        0.82
    )
    assert "3 finished, 1 failed (1 diverged, not ranked)" in report
    assert (
        "- `3` (strategy=naive seed=2): diverged at step 2 (epoch 0, learning rate 1e+30)" in report
    )


def test_runs_of_a_swept_setting_are_not_averaged_as_if_they_were_seeds(tmp_path):
    for number, (lr, seed, acc) in enumerate(
        [("0.1", 0, 0.5), ("0.1", 1, 0.52), ("0.001", 0, 0.8), ("0.001", 1, 0.84)]
    ):
        job(tmp_path, number, "naive", seed, test_acc=acc, test_loss=1 - acc)
        overrides = tmp_path / str(number) / ".hydra" / "overrides.yaml"
        overrides.parent.mkdir()
        overrides.write_text(f"- model.lr={lr}\n- seed={seed}\n- hydra.job.chdir=false\n")
    write_report(tmp_path)
    with open(tmp_path / "report.csv") as stream:
        rows = {row["strategy"]: row for row in csv.DictReader(stream)}
    assert sorted(rows) == ["naive model.lr=0.001", "naive model.lr=0.1"]
    assert rows["naive model.lr=0.001"]["runs"] == "2"
    assert float(rows["naive model.lr=0.001"]["test_acc_mean"]) == pytest.approx(0.82)
