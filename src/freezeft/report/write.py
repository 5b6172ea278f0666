"""Writing the report: ``report.md`` (verdict, table, plots, jobs), ``report.csv`` and the
plots, into the sweep dir."""

from __future__ import annotations

import csv
import functools
import math
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from freezeft.files import atomic_write, write_text_atomic
from freezeft.history import read_decisions, read_history, read_lr_schedule
from freezeft.machine import summary as machine_summary
from freezeft.report.jobs import (
    DIVERGED,
    FAILED,
    FINISHED,
    INTERRUPTED,
    NO_RESULT,
    OTHER_STAGE,
    UNREADABLE,
    Run,
    finite,
)
from freezeft.report.plots import (
    lr_plot_run,
    plot_learning_curves,
    plot_lr_schedule,
    plot_metric_vs_time,
)
from freezeft.report.rows import StrategySummary, metric_columns, ranking, summarise
from freezeft.report.sweep import Sweep, collect
from freezeft.report.verdict import ALPHA, verdict_cell, verdict_line


def write_report(sweep_dir: str | Path) -> Path:
    """Write ``report.md``, ``report.csv`` and the plots into ``sweep_dir``; returns report.md.

    Raises:
        FileNotFoundError: ``sweep_dir`` does not exist.
        ValueError: no job of the sweep finished with a usable result (every job is listed
            with its state), ``sweep_dir`` is a single run's dir, or its runs rank by
            different metrics.
    """
    sweep = collect(sweep_dir)
    sweep_dir = sweep.dir
    name = sweep_dir.resolve().name
    runs = sweep.runs
    if not runs:
        if not sweep.jobs:
            raise ValueError(
                f"No finished job under {sweep_dir.resolve()}: it holds no job dir (a folder "
                "with .hydra/, results.json or failure.json). Pass the dir a multirun wrote "
                "(multirun/<date>/<time> by default)."
            )
        listed = "; ".join(
            f"{_label(job.dir, sweep_dir)}: {job.state}: {job.detail}" for job in sweep.jobs
        )
        raise ValueError(
            f"No finished job under {sweep_dir.resolve()} ({_counts(sweep)}), so there is "
            f"nothing to compare. Jobs: {listed}"
        )
    spec = ranking(runs)
    summaries = summarise(runs, spec)
    metrics = metric_columns(spec)
    key, label = spec["rank_by"], metrics[spec["rank_by"]][0]
    monitor = str(runs[0].results.get("monitor") or "val_cer")
    plot_name = f"{key.removeprefix('test_').removeprefix('test/').replace('/', '_')}_vs_time.png"
    sign = -1 if spec.get("mode") == "max" else 1

    def tolerant(
        read: Callable[[Path], Any], name: str, what: str, empty: Callable[[], Any]
    ) -> Any:
        """``read`` once per run dir (cached); an unreadable file is named, and left out
        of ``what``."""

        @functools.cache
        def read_once(run_dir: Path) -> Any:
            try:
                return read(run_dir)
            except ValueError as err:
                sweep.cannot_read(run_dir / name, str(err), what)
                return empty()

        return read_once

    history = tolerant(read_history, "history.json", "the learning curves", list)
    schedule = tolerant(read_lr_schedule, "lr_schedule.csv", "the LR plot", dict)
    decisions = tolerant(read_decisions, "history.json", "the LR plot's decisions", list)

    write_csv(summaries, sweep_dir / "report.csv", metrics)
    plot_metric_vs_time(summaries, sweep_dir / plot_name, key, label)
    has_curves = plot_learning_curves(
        summaries, sweep_dir / "learning_curves.png", monitor, history
    )
    lr_run = lr_plot_run(
        summaries, lambda r: _or_inf(r.results.get(key), sign), schedule, decisions
    )
    if lr_run is not None:
        lr_caption = (
            f"Per-group LR of `{lr_run.dir.resolve()}` ({lr_run.variant}, seed "
            f"{lr_run.results.get('seed')})"
        )
        plot_lr_schedule(
            lr_run,
            sweep_dir / "lr_schedule.png",
            f"Per-group LR of job {_label(lr_run.dir, sweep_dir)} of {name} "
            f"({lr_run.variant}, seed {lr_run.results.get('seed')})",
            schedule(lr_run.dir),
            decisions(lr_run.dir),
        )

    machines = _distinct([machine_summary(r.results.get("machine") or {}) for r in runs])
    wall = _sweep_wall_seconds(runs)
    best_word = "highest" if spec.get("mode") == "max" else "lowest"
    trained = sum(
        r.results["train_seconds"] for r in runs if finite(r.results.get("train_seconds"))
    )
    total = len(sweep.jobs) + len(sweep.not_started)
    lines = [
        f"# Strategy comparison: {name}",
        "",
        verdict_line(summaries, runs, label, best_word),
        "",
        f"- Machine: {machines}",
        f"- Budget: {_budget(runs)}",
    ]
    notes = [r.results["report_note"] for r in runs if r.results.get("report_note")]
    if notes:
        lines.append(f"- {_distinct(notes)}")
    lines.append(
        f"- Jobs: {total} in all: {_counts(sweep)}; training {trained:.0f} s in all"
        + (f", sweep wall time {wall:.0f} s" if wall is not None else "")
    )
    command = _command(sweep)
    if command:
        lines.append(f"- Reproduce: {command}")
    optuna = _optuna(sweep, monitor)
    if optuna:
        lines.append(f"- {optuna}")
    header = ["strategy", "runs", *(label for label, _ in metrics.values()), "verdict"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for summary in summaries:
        cells = [summary.variant, str(len(summary.runs))]
        cells += [_cell(summary, k, fmt) for k, (_, fmt) in metrics.items()]
        lines.append("| " + " | ".join([*cells, verdict_cell(summary)]) + " |")
    lines += [
        "",
        f"One row per setting: the jobs that differ in nothing but their seed. Mean ± sample "
        f"standard deviation over the row's runs, ranked by {label} ({best_word} first); "
        f"the best epoch is picked on {monitor}.",
        "",
        f"The verdict: Welch's t-test (two-sided) on {label} between the best row and each "
        f"other row, over their runs. The best row is the winner only when p < {ALPHA} "
        f"against every other row; a row at p ≥ {ALPHA} ties with it (their difference is "
        "within the seeds' noise); a row of a single run cannot be tested (its noise is "
        "unknown). Several rows make several tests, without correction: read a p near "
        f"{ALPHA} as a tie.",
        "",
        f"![{label} against training time]({plot_name})",
    ]
    if has_curves:
        lines += ["", f"![{monitor} per epoch](learning_curves.png)"]
    if lr_run is not None:
        lines += ["", f"![per-group learning rate](lr_schedule.png) {lr_caption}."]
    lines += _job_sections(sweep, key, label)
    path = sweep_dir / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def _job_sections(sweep: Sweep, key: str, label: str) -> list[str]:
    """Every job with its state, then the failed and the unfinished ones with why, then
    the files that could not be read."""
    shown = _shown_overrides(sweep)
    lines = [
        "",
        "## Jobs",
        "",
        f"| job | state | row | seed | {label} |",
        "| --- | --- | --- | --- | --- |",
    ]
    for job in sweep.jobs:
        if job.run is not None:
            row, seed = job.run.variant, job.run.results.get("seed")
            value = f"{float(job.run.results[key]):.3f}"
        else:
            row, value = f"({shown(job.overrides) or 'no overrides saved'})", "–"
            seed = next((o.partition("=")[2] for o in job.overrides if o.startswith("seed=")), "")
        lines.append(f"| `{_label(job.dir, sweep.dir)}` | {job.state} | {row} | {seed} | {value} |")
    for overrides in sweep.not_started:
        row = f"({shown(overrides)})" if overrides is not None else ""
        lines.append(f"| – | never started | {row} |  | – |")

    failed = [job for job in sweep.jobs if job.state in (FAILED, DIVERGED)]
    if failed:
        lines += ["", "## Failed jobs (not ranked)", ""]
        lines += [
            f"- `{_label(job.dir, sweep.dir)}` ({shown(job.overrides)}): {job.detail}"
            for job in failed
        ]
    unfinished = [job for job in sweep.jobs if job.state in (INTERRUPTED, NO_RESULT, OTHER_STAGE)]
    if unfinished or sweep.not_started:
        lines += ["", "## Unfinished jobs (not ranked)", ""]
        lines += [
            f"- `{_label(job.dir, sweep.dir)}` ({shown(job.overrides)}): {job.state}: {job.detail}"
            for job in unfinished
        ]
        if sweep.not_started:
            known = [o for o in sweep.not_started if o is not None]
            lines.append(
                f"- {len(sweep.not_started)} of the {sweep.planned} jobs the sweep planned "
                "(multirun.yaml) never started: the sweep was stopped before them"
                + (": " + "; ".join(f"`{shown(o)}`" for o in known) if known else "")
                + "."
            )
    if sweep.unreadable:
        lines += ["", "## Unreadable files (left out)", ""]
        lines += [
            f"- {message}; left out: {', '.join(left_out)}"
            for message, *left_out in sweep.unreadable.values()
        ]
    return lines


def write_csv(
    summaries: Sequence[StrategySummary], path: Path, metrics: dict[str, tuple[str, str]]
) -> None:
    """``report.csv``: strategy (the row), runs, then ``<metric>_mean`` and ``<metric>_std``,
    then ``verdict`` (see :class:`StrategySummary`) and ``p_vs_best``."""
    columns = ["strategy", "runs"] + [f"{k}_{s}" for k in metrics for s in ("mean", "std")]
    with atomic_write(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow([*columns, "verdict", "p_vs_best"])
        for summary in summaries:
            row: list[Any] = [summary.variant, len(summary.runs)]
            for key in metrics:
                std = summary.std[key]
                row += [repr(summary.mean[key]), "" if std is None else repr(std)]
            p = summary.p_vs_best
            writer.writerow([*row, summary.verdict, "" if p is None else repr(p)])


def _cell(summary: StrategySummary, key: str, fmt: str) -> str:
    mean, std = summary.mean[key], summary.std[key]
    if math.isnan(mean):
        return "–"
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if std is not None else "")


def _or_inf(value: Any, sign: int) -> float:
    """``sign * value`` to sort by (best first), a missing value last."""
    return sign * float(value) if finite(value) else math.inf


def _distinct(values: Sequence[Any]) -> str:
    unique = []
    for value in values:
        if value not in unique:
            unique.append(value)
    return " / ".join(str(v) for v in unique)


def _budget(runs: Sequence[Run]) -> str:
    budgets = [r.results.get("budget") or {} for r in runs]
    protocols = [b.get("protocol") for b in budgets if b.get("protocol")]
    described = [  # what the task's data and model said of themselves, in their order
        key
        for budget in budgets
        for key in budget
        if key not in ("max_epochs", "protocol", "source_epochs")
    ]
    parts = [
        (f"protocol {_distinct(protocols)}, " if protocols else "")
        + f"max_epochs={_distinct([b.get('max_epochs') for b in budgets])} per job"
        + "".join(
            f", {key} {_distinct([b.get(key) for b in budgets])}"
            for key in dict.fromkeys(described)
        )
    ]
    sources = [b.get("source_epochs") for b in budgets if b.get("source_epochs") is not None]
    if sources:
        # a swept model option pretrains a source model per value (the source is trained
        # with the run's model settings): say so, never "shared" then
        models = {r.results.get("source") for r in runs if r.results.get("source")}
        parts.append(
            f"source model pretrained once (max_epochs={_distinct(sources)}), shared"
            if len(models) <= 1
            else f"{len(models)} source models (max_epochs={_distinct(sources)}): the swept "
            "settings changed the source model too"
        )
    seeds = sorted({r.results.get("seed") for r in runs}, key=str)
    parts.append(f"seeds {', '.join(map(str, seeds))}")
    return "; ".join(parts)


def _command(sweep: Sweep) -> str | None:
    """The command that reproduces the sweep, and the folder it ran from (relative paths in
    its overrides, e.g. ``transfer.source``, are relative to it)."""
    path = sweep.dir / "multirun.yaml"
    if not path.exists():
        return None
    try:
        hydra_cfg = OmegaConf.load(path).hydra
        overrides = hydra_cfg.overrides
        launch = [
            o
            for o in overrides.hydra
            if not str(o).startswith(("hydra.sweep.", "hydra.run.", "hydra.mode"))
        ]
        config_dirs = [  # --config-dir: the user's own model and data configs
            f"--config-dir {shlex.quote(source.path)}"
            for source in hydra_cfg.runtime.get("config_sources", [])
            if source.get("provider") == "command-line"
        ]
        cwd = hydra_cfg.runtime.get("cwd")
    except Exception as err:
        sweep.cannot_read(path, f"{path} is not readable ({err})", "the command of the sweep")
        return None
    command = "python -m freezeft.run -m " + " ".join(
        [*config_dirs, *(shlex.quote(str(o)) for o in [*launch, *overrides.task])]
    )
    return f"`{command}`" + (f" (from `{cwd}`)" if cwd else "")


def _optuna(sweep: Sweep, monitor: str) -> str | None:
    path = sweep.dir / "optimization_results.yaml"
    if not path.exists():
        return None
    try:
        best = OmegaConf.load(path)
        if "best_value" not in best:
            return None
        params = ", ".join(f"`{k}={v}`" for k, v in best.best_params.items())
        return f"Optuna: best {monitor} {float(best.best_value):.4f} with {params}"
    except Exception as err:
        sweep.cannot_read(path, f"{path} is not readable ({err})", "Optuna's best trial")
        return None


def _sweep_wall_seconds(runs: Sequence[Run]) -> float | None:
    try:
        starts = [(r.dir / ".hydra").stat().st_mtime for r in runs if (r.dir / ".hydra").exists()]
        ends = [(r.dir / "results.json").stat().st_mtime for r in runs]
    except OSError:
        return None
    return max(ends) - min(starts) if starts and ends else None


def _counts(sweep: Sweep) -> str:
    """``3 finished, 1 failed (1 diverged, not ranked), 1 interrupted (resumable), ...``."""
    states = [job.state for job in sweep.jobs]
    failed = states.count(FAILED) + states.count(DIVERGED)
    parts = [
        f"{states.count(FINISHED)} finished",
        f"{failed} failed"
        + (f" ({states.count(DIVERGED)} diverged, not ranked)" if DIVERGED in states else ""),
    ]
    for state, shown in (
        (INTERRUPTED, "interrupted (resumable)"),
        (NO_RESULT, "killed or still running (no result)"),
        (UNREADABLE, "unreadable"),
        (OTHER_STAGE, "not a transfer run"),
    ):
        if state in states:
            parts.append(f"{states.count(state)} {shown}")
    if sweep.not_started:
        parts.append(f"{len(sweep.not_started)} never started")
    return ", ".join(parts)


def _label(job_dir: Path, sweep_dir: Path) -> str:
    """The job dir as the sweep names it: ``3`` (its number), or its path below the sweep."""
    return job_dir.relative_to(sweep_dir).as_posix()


def _shown_overrides(sweep: Sweep) -> Callable[[Sequence[str]], str]:
    """The overrides that tell a job apart (those whose values vary across the jobs; all
    but Hydra's and paths if none vary), as one string."""

    def keyed(overrides: Sequence[str]) -> dict[str, str]:
        return {o.lstrip("+~").partition("=")[0]: o for o in overrides}

    every = [keyed(job.overrides) for job in sweep.jobs]
    keys = {k for overrides in every for k in overrides}
    varying = {k for k in keys if len({overrides.get(k) for overrides in every}) > 1}

    def shown(overrides: Sequence[str]) -> str:
        picked = [
            o
            for k, o in keyed(overrides).items()
            if (k in varying if varying else not k.startswith(("hydra.", "paths.")))
        ]
        return " ".join(picked)

    return shown
