"""Sweeps as a user runs them: `python -m freezeft.run -m ...` in a subprocess, then the report."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from pyrun import run_python

from freezeft.app.report import write_report

pytestmark = pytest.mark.slow  # subprocess runs

PNG = b"\x89PNG\r\n\x1a\n"


def multirun(tmp_path: Path, cache_dir: Path, *overrides: str, check: bool = True):
    sweep = tmp_path / "sweep"
    proc = run_python(
        [
            "-m",
            "freezeft.run",
            "-m",
            "experiment=tiny",
            f"paths.cache_dir={cache_dir}",
            f"hydra.sweep.dir={sweep}",
            *overrides,
        ],
        cwd=tmp_path,
        env={"PYTHONUNBUFFERED": "1"},
        check=check,
    )
    return sweep, proc


def job_results(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]


@pytest.fixture(scope="module")
def two_strategy_sweep(tmp_path_factory, cache_dir, german_corpus, english_corpus):
    tmp = tmp_path_factory.mktemp("sweep")
    return multirun(
        tmp, cache_dir, "strategy=frozen_encoder,scratch", "seed=0,1", "trainer.max_epochs=2"
    )


def test_sweep_report_matches_the_jobs_results(two_strategy_sweep):
    sweep, proc = two_strategy_sweep
    assert "freezeft: sweep report -> " in proc.stdout
    results = job_results(sweep)
    assert len(results) == 4
    by_strategy: dict[str, list[dict]] = {}
    for r in results:
        by_strategy.setdefault(r["strategy"], []).append(r)
    assert set(by_strategy) == {"frozen_encoder", "scratch"}
    assert [r["source"] is None for r in by_strategy["scratch"]] == [True, True]
    assert all(r["source"] for r in by_strategy["frozen_encoder"])

    with open(sweep / "report.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["strategy"] for row in rows] == sorted(
        by_strategy, key=lambda s: statistics.fmean(r["cer"] for r in by_strategy[s])
    )  # best (lowest mean test CER) first
    for row in rows:
        runs = by_strategy[row["strategy"]]
        assert int(row["runs"]) == 2
        for key in ("cer", "wer", "best_epoch", "train_seconds", "trainable_params"):
            values = [float(r[key]) for r in runs]
            assert float(row[f"{key}_mean"]) == pytest.approx(statistics.fmean(values))
            assert float(row[f"{key}_std"]) == pytest.approx(statistics.stdev(values))

    report = (sweep / "report.md").read_text()
    winner = rows[0]["strategy"]
    # named the winner only when ahead by more than its seeds' noise (Welch's t-test)
    assert rows[0]["verdict"] in ("winner", "tie")
    assert (f"Winner: **{winner}**" in report) == (rows[0]["verdict"] == "winner")
    mean, std = float(rows[0]["cer_mean"]), float(rows[0]["cer_std"])
    assert f"| {winner} | 2 | {mean:.3f} ± {std:.3f} |" in report
    assert "- Machine: " in report and "cores" in report
    budget = "- Budget: protocol fixed, max_epochs=2 per job, language de, train_utterances 32"
    assert budget in report
    assert "seeds 0, 1" in report
    assert "strategy=frozen_encoder,scratch" in report  # the command that reproduces it
    for name in ("cer_vs_time.png", "learning_curves.png", "lr_schedule.png"):
        assert (sweep / name).read_bytes()[:8] == PNG, name
        assert f"]({name})" in report


def test_report_command_rewrites_the_same_report(two_strategy_sweep):
    sweep, _ = two_strategy_sweep
    before = (sweep / "report.csv").read_text()
    (sweep / "report.csv").unlink()
    proc = run_python(["-m", "freezeft.report", str(sweep)], cwd=sweep)
    assert "Winner: " in proc.stdout
    assert (sweep / "report.csv").read_text() == before


def test_a_failing_job_is_logged_and_the_sweep_goes_on(tmp_path, cache_dir, two_strategy_sweep):
    # N=0 keeps the English output layer, which cannot fit the German alphabet: job 0 fails
    sweep, proc = multirun(tmp_path, cache_dir, "transfer.drop_source_layers=0,1", check=False)
    assert proc.returncode == 1  # not every job finished: a script must not count it a success
    assert "freezeft: 1 of the sweep's 2 jobs did not finish (1 finished)" in proc.stderr
    failure = json.loads((sweep / "0" / "failure.json").read_text())
    assert "transfer.drop_source_layers=0" in failure["overrides"]
    assert "Set `transfer.drop_source_layers` to 1 or more" in failure["error"]
    said = [line for line in proc.stderr.splitlines() if "job 0 failed" in line]
    assert len(said) == 1 and "drop_source_layers` to 1 or more" in said[0]  # one line
    assert "Traceback" not in proc.stdout + proc.stderr  # it is in the job's run.log
    assert "Traceback" in (sweep / "0" / "run.log").read_text()
    assert not (sweep / "0" / "results.json").exists()
    assert [r["transfer"]["drop_source_layers"] for r in job_results(sweep)] == [1]
    report = (sweep / "report.md").read_text()
    assert "1 finished, 1 failed" in report
    assert "## Failed jobs" in report  # the error's backticks shown as they are, escaped
    assert r"\`transfer.drop_source_layers\` to 1 or more" in report


def test_ddp_in_a_local_multirun_is_refused(tmp_path, cache_dir):
    sweep, proc = multirun(tmp_path, cache_dir, "trainer=ddp", check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "cannot run in a local multirun" in output
    assert "hydra/launcher=submitit_slurm" in output
    assert not list(sweep.glob("*/results.json"))


def test_optuna_sweep_minimises_the_dev_cer(tmp_path, cache_dir, two_strategy_sweep):
    sweep, _ = multirun(
        tmp_path, cache_dir, "hparams_search=discriminative_lr", "hydra.sweeper.n_trials=2"
    )
    results = job_results(sweep)
    assert len(results) == 2 and {r["strategy"] for r in results} == {"discriminative_lr"}
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == pytest.approx(min(r["dev_cer"] for r in results))
    assert 0.3 <= best.best_params["strategy.callbacks.discriminative_lr.decay"] <= 1.0
    assert "Optuna: best val_cer" in (sweep / "report.md").read_text()


def test_report_on_a_dir_without_results_says_so(tmp_path):
    with pytest.raises(ValueError, match="No finished job"):
        write_report(tmp_path)
    with pytest.raises(FileNotFoundError, match="No sweep dir"):
        write_report(tmp_path / "missing")


def test_parallel_joblib_jobs_share_one_pretrained_source(tmp_path):
    """Fresh cache: the jobs run in parallel worker processes, corpora and source built once."""
    cache = tmp_path / "cache"
    sweep, _ = multirun(
        tmp_path,
        cache,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "strategy=naive,frozen_encoder",
    )
    results = job_results(sweep)
    assert sorted(r["strategy"] for r in results) == ["frozen_encoder", "naive"]
    assert len({r["source"] for r in results}) == 1
    assert len([p for p in (cache / "source").iterdir() if p.is_dir()]) == 1
    cores = results[0]["machine"]["cores"]
    assert all(r["machine"]["torch_threads"] == max(1, cores // 2) for r in results)
