"""The report on any task's sweep: one row per setting, every job accounted for, unreadable
files named and skipped, and a winner only when it is ahead by more than the seeds' noise.

The sweep dirs are built as ``python -m freezeft.run -m`` writes them: per job
``.hydra/overrides.yaml``, ``results.json`` (or ``failure.json``), ``history.json``,
``lr_schedule.csv`` and ``checkpoints/``, and the sweep's ``multirun.yaml``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from omegaconf import OmegaConf

from freezeft.app import task
from freezeft.app.report import collect, main, welch_p, write_report

GROUPS = ("encoder.0", "encoder.2", "head")


def job(sweep: Path, number: int, strategy: str, seed: int, overrides=None, **results) -> Path:
    """A finished job: what the app writes into ``<sweep>/<number>``."""
    folder = sweep / str(number)
    hydra_dir(
        folder, overrides if overrides is not None else [f"strategy={strategy}", f"seed={seed}"]
    )
    monitor = results.pop("monitor", "val_acc")
    tested = {k: v for k, v in results.items() if k.startswith("test")}
    record = {
        **results,
        "status": "finished",
        "strategy": strategy,
        "seed": seed,
        "epochs": 3,
        "best_epoch": 2,
        "train_seconds": 1.0 + number,
        "trainable_params": 10,
        "monitor": monitor,
        "monitor_mode": "max",
        "report": task.report_spec(object(), monitor, "max", tested),
        "transfer": None if strategy == "scratch" else {},
        "budget": {"max_epochs": 3, "protocol": "fixed"},
        "run_dir": str(folder),
    }
    (folder / "results.json").write_text(json.dumps(record))
    epochs = [{"epoch": e, monitor: 0.5 + 0.1 * e, "train_loss": 1.0 - 0.2 * e} for e in range(3)]
    (folder / "history.json").write_text(json.dumps({"epochs": epochs, "decisions": []}))
    frozen = strategy == "frozen_encoder"
    rows = [f"{step},{step // 2}," + ",".join("0.0" if frozen and g != "head" else "0.01"
                                              for g in GROUPS) for step in range(6)]  # fmt: skip
    (folder / "lr_schedule.csv").write_text("\n".join(["step,epoch," + ",".join(GROUPS), *rows]))
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"checkpoint")
    return folder


def hydra_dir(folder: Path, overrides: list[str]) -> None:
    """The ``.hydra/`` Hydra writes into every job dir as the job starts."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


def multirun_yaml(sweep: Path, task_overrides: list[str], sweeper: dict | None = None) -> None:
    """The sweep's ``multirun.yaml``: the sweeper and the command-line overrides."""
    sweeper = sweeper or {
        "_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
        "max_batch_size": None,
        "params": None,
    }
    config = {
        "hydra": {
            "sweeper": sweeper,
            "overrides": {
                "hydra": [f"hydra.sweep.dir={sweep}", "hydra.mode=MULTIRUN"],
                "task": task_overrides,
            },
            "runtime": {"cwd": str(sweep.parent), "config_sources": []},
        }
    }
    OmegaConf.save(OmegaConf.create(config), sweep / "multirun.yaml")


def report_rows(sweep: Path) -> dict[str, dict[str, str]]:
    with open(sweep / "report.csv") as stream:
        return {row["strategy"]: row for row in csv.DictReader(stream)}


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
    assert "**scratch** is best by a single run (highest test/mae)" in report  # mode "max"
    assert (tmp_path / "mae_vs_time.png").exists()


def test_a_diverged_run_is_listed_apart_and_never_averaged_in(tmp_path):
    job(tmp_path, 0, "naive", 0, test_acc=0.80, test_loss=0.2)
    job(tmp_path, 1, "naive", 1, test_acc=0.84, test_loss=0.16)
    job(tmp_path, 2, "scratch", 0, test_acc=0.70, test_loss=0.3)
    diverged = tmp_path / "3"
    hydra_dir(diverged, ["strategy=naive", "seed=2"])
    (diverged / "results.json").write_text(json.dumps({
        "status": "diverged", "strategy": "naive", "seed": 2, "monitor": "val_acc",
        "diverged": {"step": 2, "epoch": 0, "lr": [1e30], "what": "NaN in head.weight"},
    }))  # fmt: skip
    (diverged / "failure.json").write_text(json.dumps({"error": "Diverged: the same again"}))
    report = write_report(tmp_path).read_text()
    rows = report_rows(tmp_path)
    assert rows["naive"]["runs"] == "2"
    assert float(rows["naive"]["test_acc_mean"]) == pytest.approx(0.82)
    assert "- Jobs: 4 in all: 3 finished, 1 failed (1 diverged, not ranked);" in report
    assert (
        "- `3` (strategy=naive seed=2): diverged at step 2 (epoch 0, learning rate 1e+30)" in report
    )
    assert "| `3` | diverged | (strategy=naive seed=2) | 2 | – |" in report


def test_runs_of_a_swept_setting_are_not_averaged_as_if_they_were_seeds(tmp_path):
    for number, (lr, seed, acc) in enumerate(
        [("0.1", 0, 0.5), ("0.1", 1, 0.52), ("0.001", 0, 0.8), ("0.001", 1, 0.84)]
    ):
        overrides = [f"model.lr={lr}", f"seed={seed}", "hydra.job.chdir=false"]
        job(tmp_path, number, "naive", seed, overrides, test_acc=acc, test_loss=1 - acc)
    write_report(tmp_path)
    rows = report_rows(tmp_path)
    assert sorted(rows) == ["naive model.lr=0.001", "naive model.lr=0.1"]
    assert rows["naive model.lr=0.001"]["runs"] == "2"
    assert float(rows["naive model.lr=0.001"]["test_acc_mean"]) == pytest.approx(0.82)


def test_every_job_is_listed_with_its_state_and_each_lr_is_its_own_row(tmp_path):
    """``-m strategy=naive "model.optimizer.lr=0.002,0.05" seed=0,1,2,3``, stopped early:
    job 2 failed, 3 was killed before its first checkpoint, 6 was interrupted with one and
    7 never started."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    common = ["experiment=tiny", f"paths.cache_dir={tmp_path}/cache", "strategy=naive"]
    multirun_yaml(sweep, [*common, "model.optimizer.lr=0.002,0.05", "seed=0,1,2,3"])
    accs = {(0.002, 0): 0.80, (0.002, 1): 0.82, (0.05, 0): 0.60, (0.05, 1): 0.62}
    for number in range(7):
        lr, seed = (0.002, 0.05)[number // 4], number % 4
        overrides = [*common, f"model.optimizer.lr={lr}", f"seed={seed}"]
        if (lr, seed) in accs:
            job(sweep, number, "naive", seed, overrides, test_acc=accs[lr, seed])
            continue
        hydra_dir(sweep / str(number), overrides)
        if number == 2:
            failure = {"job": 2, "overrides": overrides, "error": "RuntimeError: out of memory\n"
                       "while allocating", "traceback": "Traceback ..."}  # fmt: skip
            (sweep / "2" / "failure.json").write_text(json.dumps(failure))
        if number == 6:
            (sweep / "6" / "checkpoints").mkdir()
            (sweep / "6" / "checkpoints" / "interrupted.ckpt").write_bytes(b"checkpoint")
    report = write_report(sweep).read_text()
    rows = report_rows(sweep)
    assert sorted(rows) == ["naive model.optimizer.lr=0.002", "naive model.optimizer.lr=0.05"]
    assert [rows[r]["runs"] for r in sorted(rows)] == ["2", "2"]
    assert float(rows["naive model.optimizer.lr=0.05"]["test_acc_mean"]) == pytest.approx(0.61)
    jobs_line = (
        "- Jobs: 8 in all: 4 finished, 1 failed, 1 interrupted (resumable), "
        "1 killed or still running (no result), 1 never started;"
    )
    assert jobs_line in report
    table = report[report.index("## Jobs") :]
    for number, state in enumerate(["finished", "finished", "failed", "killed or still running",
                                    "finished", "finished", "interrupted"]):  # fmt: skip
        assert f"| `{number}` | {state} |" in table
    assert "| – | never started | (model.optimizer.lr=0.05 seed=3) |" in table
    assert "- `2` (model.optimizer.lr=0.002 seed=2): RuntimeError: out of memory while" in report
    resume = (
        f"python -m freezeft.run experiment=tiny paths.cache_dir={tmp_path}/cache strategy=naive "
        f"model.optimizer.lr=0.05 seed=2 resume={(sweep / '6').resolve()}"
    )
    assert "- `6` (model.optimizer.lr=0.05 seed=2): interrupted: " in report
    assert resume in report and "interrupted.ckpt" in report
    assert "- `3` (model.optimizer.lr=0.002 seed=3): killed or still running: " in report
    assert "1 of the 8 jobs the sweep planned (multirun.yaml) never started" in report


def test_an_optuna_sweep_reports_each_trial_apart(tmp_path):
    """``-m hparams_search=discriminative_lr``: every trial's own decay is its own row."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    optuna = {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
              "n_trials": 4, "direction": "${freezeft.direction:${monitor_mode}}"}  # fmt: skip
    multirun_yaml(sweep, ["hparams_search=discriminative_lr"], optuna)
    for number, decay in enumerate([0.53, 0.91, 0.35]):
        overrides = [f"strategy.callbacks.discriminative_lr.decay={decay}",
                     "hparams_search=discriminative_lr"]  # fmt: skip
        job(sweep, number, "discriminative_lr", 0, overrides, test_acc=0.5 + decay / 10)
    report = write_report(sweep).read_text()
    rows = report_rows(sweep)
    assert sorted(rows) == [
        f"discriminative_lr strategy.callbacks.discriminative_lr.decay={d}"
        for d in ("0.35", "0.53", "0.91")
    ]
    assert "- Jobs: 4 in all: 3 finished, 0 failed, 1 never started;" in report
    assert "decay=0.91** is best by a single run" in report


def test_rows_within_their_seeds_spread_tie(tmp_path):
    """``-m strategy=naive,frozen_encoder seed=0,1,2``: the seeds are pooled, and 0.820 vs
    0.810 with a spread of 0.02 is no difference."""
    accs = {"naive": [0.80, 0.84, 0.82], "frozen_encoder": [0.83, 0.79, 0.81]}
    for number, (strategy, seed) in enumerate((s, i) for s in accs for i in range(3)):
        job(tmp_path, number, strategy, seed, test_acc=accs[strategy][seed])
    report = write_report(tmp_path).read_text()
    rows = report_rows(tmp_path)
    assert [(r, rows[r]["runs"], rows[r]["verdict"]) for r in rows] == [
        ("naive", "3", "tie"),
        ("frozen_encoder", "3", "tie"),
    ]
    assert float(rows["frozen_encoder"]["p_vs_best"]) == pytest.approx(0.573, abs=0.001)
    assert "Winner: **" not in report
    assert "Winner: none. The top rows tie: **naive**, **frozen_encoder**." in report
    assert "Rerun with more seeds (seed=0,1,2,3,4) to tell." in report
    assert "| tie (p = 0.573) |" in report


def test_rows_well_apart_name_the_winner(tmp_path):
    accs = {"naive": [0.80, 0.81, 0.79], "frozen_encoder": [0.90, 0.91, 0.89],
            "scratch": [0.5, 0.6, 0.4]}  # fmt: skip
    for number, (strategy, seed) in enumerate((s, i) for s in accs for i in range(3)):
        job(tmp_path, number, strategy, seed, test_acc=accs[strategy][seed])
    report = write_report(tmp_path).read_text()
    rows = report_rows(tmp_path)
    assert [(r, rows[r]["verdict"]) for r in rows] == [
        ("frozen_encoder", "winner"),
        ("naive", "behind"),
        ("scratch", "behind"),
    ]
    assert float(rows["naive"]["p_vs_best"]) < 0.001
    assert "Winner: **frozen_encoder** (highest mean test_acc), ahead of every other row" in report
    assert "against the closest, scratch" in report  # the largest p: its spread is large


def test_one_seed_per_row_crowns_no_winner(tmp_path):
    for number, (strategy, acc) in enumerate([("naive", 0.8), ("frozen_encoder", 0.9)]):
        job(tmp_path, number, strategy, 1, test_acc=acc)
    report = write_report(tmp_path).read_text()
    rows = report_rows(tmp_path)
    assert [(r, rows[r]["verdict"], rows[r]["p_vs_best"]) for r in rows] == [
        ("frozen_encoder", "best, untested", ""),
        ("naive", "untested", ""),
    ]
    assert "Winner: **" not in report
    assert "Winner: none. **frozen_encoder** is best by a single run (highest test_acc)" in report
    assert "Rerun with more seeds (seed=0,1,2) to tell." in report


def test_welch_p_matches_the_t_tables():
    """Samples built so that t and the degrees of freedom are exact: at the two-sided 5%
    critical value of the t-distribution (a statistics table), p is 0.05."""
    # equal n=2 and spreads: se = 1, df = 2, t = the gap
    assert welch_p([0, 2**0.5], [4.302653, 4.302653 + 2**0.5]) == pytest.approx(0.05, abs=1e-6)
    # no spread in one row: df = n - 1 of the other = 1
    assert welch_p([0.0, 0.0], [12.7062 - 1, 12.7062 + 1]) == pytest.approx(0.05, abs=1e-5)
    # n=3 each, equal spreads (1, 1): se = sqrt(2/3), df = 4
    gap = 2.776445 * (2 / 3) ** 0.5
    assert welch_p([-1, 0, 1], [gap - 1, gap, gap + 1]) == pytest.approx(0.05, abs=1e-6)
    assert welch_p([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert welch_p([1, 1], [2, 2]) == 0.0 and welch_p([1, 1], [1, 1]) == 1.0
    assert welch_p([1.0], [2.0, 3.0]) is None


def test_unreadable_files_are_named_and_left_out(tmp_path):
    job(tmp_path, 0, "naive", 0, test_acc=0.80)
    job(tmp_path, 1, "naive", 1, test_acc=0.82)
    job(tmp_path, 2, "scratch", 0, test_acc=0.60)
    job(tmp_path, 3, "scratch", 1, test_acc=0.62)
    (job(tmp_path, 4, "naive", 2, test_acc=0.1) / "results.json").write_text('{"test_acc": 0.')
    (job(tmp_path, 5, "naive", 3, test_acc=0.1) / "results.json").write_text("[0.9]")
    nan = job(tmp_path, 6, "naive", 4, test_acc=0.1) / "results.json"
    nan.write_text(nan.read_text().replace('"test_acc": 0.1', '"test_acc": null, '
                                           '"test_acc_not_finite": "nan"'))  # fmt: skip
    hydra_dir(tmp_path / "7", ["strategy=naive", "seed=5"])
    (tmp_path / "7" / "failure.json").write_text('{"error": "Runtime')
    (tmp_path / "0" / "history.json").write_text("")
    lr_file = tmp_path / "1" / "lr_schedule.csv"
    lr_file.write_text(lr_file.read_text()[:-9])  # cut short mid-row
    report = write_report(tmp_path).read_text()
    rows = report_rows(tmp_path)
    assert float(rows["naive"]["test_acc_mean"]) == pytest.approx(0.81)
    assert rows["naive"]["runs"] == "2" and rows["naive"]["verdict"] == "winner"
    assert "4 finished, 1 failed, 3 unreadable;" in report
    unreadable = report[report.index("## Unreadable files (left out)") :]
    for number, why, left_out in [
        (4, "results.json is not valid JSON", "the job's results (not ranked)"),
        (5, "results.json holds a list, not an object of results", "the job's results"),
        (6, r"results.json has \`test_acc\`: null (nan), not a number to rank by", "the job's"),
        (7, "failure.json is not valid JSON", "why the job failed"),
        (0, "history.json is not a readable history.json (it is empty)", "the learning curves"),
        (1, "lr_schedule.csv is not a readable lr_schedule.csv (line", "the LR plot"),
    ]:
        line = next(x for x in unreadable.splitlines() if f"{tmp_path / str(number)}/" in x)
        assert why in line and f"left out: {left_out}" in line, line
    assert "| `7` | failed |" in report
    assert (tmp_path / "learning_curves.png").exists() and (tmp_path / "lr_schedule.png").exists()


def test_a_sweep_without_a_usable_job_is_refused_naming_the_dir(tmp_path, capsys):
    hydra_dir(tmp_path / "0", ["strategy=naive", "seed=0"])
    (tmp_path / "0" / "results.json").write_text("not json")
    hydra_dir(tmp_path / "1", ["strategy=naive", "seed=1"])
    counts = r"0 finished, 0 failed, 1 killed or still running \(no result\), 1 unreadable"
    with pytest.raises(ValueError, match=f"No finished job under .*{counts}.*0: unreadable"):
        write_report(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path)])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"freezeft: error: No finished job under {tmp_path.resolve()}")
    assert "Traceback" not in err and not (tmp_path / "report.md").exists()


def test_a_single_run_dir_is_refused_in_one_line(tmp_path, capsys):
    run = job(tmp_path, 0, "naive", 0, test_acc=0.8)
    with pytest.raises(ValueError, match="is a single run's dir"):
        collect(run)
    with pytest.raises(SystemExit) as stop:
        main([str(run)])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"freezeft: error: {run.resolve()} is a single run's dir" in err
    assert not (run / "report.md").exists()
    write_report(tmp_path)  # its parent: a folder of run dirs, one row of one run
    assert "One setting only: **naive** (1 run)" in (tmp_path / "report.md").read_text()


def test_the_lr_plot_gives_every_group_its_own_panel(tmp_path, monkeypatch):
    """frozen_encoder's two frozen groups are flat at 0: on one axes they hid each other."""
    job(tmp_path, 0, "frozen_encoder", 0, test_acc=0.9)
    job(tmp_path, 1, "frozen_encoder", 1, test_acc=0.8)
    job(tmp_path, 2, "naive", 0, test_acc=0.7)
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    report = write_report(tmp_path).read_text()
    figure = next(f for f in figures if f._suptitle is not None)
    assert [ax.get_title(loc="left") for ax in figure.axes] == list(GROUPS)
    assert [list(ax.lines[0].get_ydata()) for ax in figure.axes] == [[0.0] * 6, [0.0] * 6,
                                                                     [0.01] * 6]  # fmt: skip
    assert figure._suptitle.get_text() == (
        f"Per-group LR of job 0 of {tmp_path.name} (frozen_encoder, seed 0)"
    )
    assert f"Per-group LR of `{(tmp_path / '0').resolve()}` (frozen_encoder, seed 0)." in report
