"""The app on a model that is not the speech model: the README's "Compare strategies on
your own model", run as a user runs it (examples/own_model, a ``lightning.pytorch`` module
that implements nothing of freezeft, its configs in a ``--config-dir``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from pyrun import run_python

pytestmark = pytest.mark.slow  # subprocess runs

PROJECT = Path(__file__).parents[1] / "examples" / "own_model"
STRATEGIES = ["naive", "frozen_encoder", "gradual_unfreeze", "scratch"]


def test_a_sweep_over_strategies_ranks_the_models_own_test_metric(tmp_path):
    source = tmp_path / "source.ckpt"
    run_python([str(PROJECT / "features.py"), "pretrain", str(source)], cwd=PROJECT)
    sweep = tmp_path / "sweep"
    run_python(
        [
            "-m",
            "freezeft.run",
            "-m",
            "--config-dir",
            str(PROJECT / "conf"),
            "model=mynet",
            "data=mydata",
            "monitor=val_acc",
            "monitor_mode=max",
            f"transfer.source={source}",
            f"strategy={','.join(STRATEGIES)}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=PROJECT,  # where the user's module is importable
    )
    results = {
        r["strategy"]: r
        for r in (json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json")))
    }
    assert sorted(results) == sorted(STRATEGIES)
    for strategy, result in results.items():
        assert 0 <= result["test_acc"] <= 1 and result["test_loss"] > 0  # logged in test_step
        assert result["monitor"] == "val_acc" and result["dev_acc"] > 0.25
        assert result["report"]["rank_by"] == "test_acc" and result["report"]["mode"] == "max"
        assert (result["source"] is None) == (strategy == "scratch")
    # transfer by name and shape: the encoder loads, the new 4-class head does not
    transfer = json.loads((sweep / "0" / "transfer.json").read_text())
    assert transfer["loaded"] == ["encoder.0.bias", "encoder.0.weight", "encoder.2.bias",
                                  "encoder.2.weight"]  # fmt: skip
    assert sorted(transfer["reinitialised"]) == ["head.bias", "head.weight"]
    assert "(8, 64) in the source, (4, 64) here" in transfer["reinitialised"]["head.weight"]
    assert not (sweep / "3" / "transfer.json").exists()  # scratch loads nothing
    # transfer beats scratch by a clear margin (accuracy and loss)
    assert results["naive"]["test_acc"] > results["scratch"]["test_acc"] + 0.03
    assert results["naive"]["test_loss"] < results["scratch"]["test_loss"]
    # the report ranks by test accuracy, higher first, and plots it
    with open(sweep / "report.csv") as stream:
        rows = list(csv.DictReader(stream))
    accuracies = [float(row["test_acc_mean"]) for row in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    assert rows[-1]["strategy"] == "scratch"
    report = (sweep / "report.md").read_text()
    # one seed per strategy: the best is named, no winner is crowned
    assert f"**{rows[0]['strategy']}** is best by a single run (highest test_acc)" in report
    assert "Winner: **" not in report
    assert "--config-dir" in report and "CER" not in report
    assert (sweep / "acc_vs_time.png").stat().st_size > 0


def test_a_monitor_the_model_never_logs_is_refused_before_an_epoch_is_spent(tmp_path):
    """`monitor=val_accuracy` on a model that logs val_acc: one line naming the logged
    keys, after the sanity-check validation, before any training: no checkpoint at all."""
    run_dir = tmp_path / "run"
    proc = run_python(
        [
            "-m",
            "freezeft.run",
            "--config-dir",
            str(PROJECT / "conf"),
            "model=mynet",
            "data=mydata",
            "monitor=val_accuracy",
            "monitor_mode=max",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=PROJECT,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("freezeft: error:")]
    assert "The run watches `val_accuracy` (monitor), which the model does not log" in line
    assert "after the sanity-check validation it had logged val_acc, val_loss" in line
    assert not list((run_dir / "checkpoints").glob("*.ckpt"))


@pytest.mark.parametrize("monitors", ["val_acc,val_nope", "val_nope"], ids=["one", "all"])
def test_a_sweep_exits_non_zero_when_a_job_failed_and_names_it(tmp_path, monitors):
    """A sweep exits 0 only when every job finished: a failed job makes it exit 1, after the
    report of the finished ones is written, with each other job's one-line reason."""
    sweep = tmp_path / "sweep"
    proc = run_python(
        ["-m", "freezeft.run", "-m", "--config-dir", str(PROJECT / "conf"), "model=mynet",
         "data=mydata", f"monitor={monitors}", "monitor_mode=max", f"hydra.sweep.dir={sweep}"],
        cwd=PROJECT,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    failed = monitors.count("val_nope")
    jobs = len(monitors.split(","))
    assert f"freezeft: {failed} of the sweep's {jobs} jobs did not finish" in proc.stderr
    assert f"  job {jobs - 1}: failed: The run watches `val_nope` (monitor)" in proc.stderr
    assert (sweep / "report.md").exists() == (failed < jobs)  # the finished ones' report
    output = proc.stdout + proc.stderr
    # each failed job's reason twice: when it fails, and in the list the sweep ends with
    assert output.count("The run watches `val_nope` (monitor)") == 2 * failed


@pytest.mark.parametrize("signal_name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_interrupted_sweep_says_so_on_stderr_with_its_exit_code(tmp_path, signal_name, code):
    """Ctrl+C (or SIGTERM) in job 0 of two: exit 130 (143), the job's resumable checkpoint,
    and one line on stderr that the sweep stopped and where its jobs are listed."""
    sweep = tmp_path / "sweep"
    proc = run_python(
        ["-m", "freezeft.run", "-m", "--config-dir", str(PROJECT / "conf"), "model=mynet",
         "data=mydata", "monitor=val_acc", "monitor_mode=max", "strategy=naive,frozen_encoder",
         "+callbacks.stop._target_=signal_at_step.SignalAtStep", f"hydra.sweep.dir={sweep}"],
        cwd=PROJECT,
        env={"PYTHONPATH": str(Path(__file__).parent), "SIGNAL_AT_STEP": f"2:{signal_name}:train"},
        check=False,
    )  # fmt: skip
    assert proc.returncode == code, proc.stderr[-2000:]
    assert (sweep / "0" / "checkpoints" / "interrupted.ckpt").exists()
    assert not (sweep / "1").exists()
    assert (
        f"freezeft: the sweep was interrupted in job 0; the jobs after it did not run. "
        f"`python -m freezeft.report {sweep}` lists every job"
    ) in proc.stderr
