"""Writing the report: ``report.md`` (verdict, table, plots, jobs), ``report.csv`` and the
plots, into the sweep dir."""

from __future__ import annotations

import csv
import functools
import math
import re
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from freezeft.app.report.jobs import (
    DIVERGED,
    FAILED,
    FINISHED,
    INTERRUPTED,
    NO_RESULT,
    OTHER_STAGE,
    UNREADABLE,
    Job,
    Run,
    finite,
    read_yaml,
)
from freezeft.app.report.markdown import code, text
from freezeft.app.report.plots import (
    discard_figures,
    lr_plot_run,
    plot_learning_curves,
    plot_lr_schedule,
    plot_metric_vs_time,
)
from freezeft.app.report.rows import StrategySummary, metric_columns, ranking, summarise
from freezeft.app.report.sweep import Sweep, collect
from freezeft.app.report.verdict import ALPHA, verdict_cell, verdict_line
from freezeft.files import WriteError, atomic_write, check_regular_file, write_text_atomic
from freezeft.history import read_decisions, read_history, read_lr_schedule
from freezeft.machine import summary as machine_summary

#: the largest ``history.json`` or ``lr_schedule.csv`` the report reads: a run of a million
#: steps writes some 100 MiB of LRs
RUN_FILE_LIMIT = 512 * 2**20


class NothingFinished(ValueError):
    """No job of the sweep finished; ``summary`` is the message without the job list."""

    def __init__(self, message: str, summary: str) -> None:
        super().__init__(message)
        self.summary = summary


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
        summary = f"No finished job under {sweep_dir.resolve()} ({_counts(sweep)})"
        raise NothingFinished(f"{summary}, so there is nothing to compare. Jobs: {listed}", summary)
    spec = ranking(runs)
    summaries = summarise(runs, spec)
    metrics = metric_columns(spec)
    key, label = spec["rank_by"], metrics[spec["rank_by"]][0]
    monitor = str(runs[0].results.get("monitor") or "val_cer")
    plot_name = _plot_name(key)
    sign = -1 if spec.get("mode") == "max" else 1

    def tolerant(
        read: Callable[[Path], Any], name: str, what: str, empty: Callable[[], Any]
    ) -> Any:
        """``read`` once per run dir (cached); an unreadable file is named, and left out
        of ``what``."""

        @functools.cache
        def read_once(run_dir: Path) -> Any:
            path = run_dir / name
            try:
                if path.exists():  # a FIFO would block the read, /dev/zero never end
                    check_regular_file(path, RUN_FILE_LIMIT, f"a {name}")
                return read(run_dir)
            except (OSError, ValueError, RecursionError) as err:
                problem = str(err) if str(path) in str(err) else f"{path} {_why(err)}"
            sweep.cannot_read(path, problem, what)
            return empty()

        return read_once

    history = tolerant(read_history, "history.json", "the learning curves", list)
    schedule = tolerant(read_lr_schedule, "lr_schedule.csv", "the LR plot", dict)
    decisions = tolerant(read_decisions, "history.json", "the LR plot's decisions", list)

    not_drawn: list[str] = []

    def draw(file: str, plot: Callable[[], Any]) -> bool:
        """``plot()``, which writes ``file``; a plot the runs' values break (matplotlib
        cannot lay out values near the float maximum) is named in the report, its old file
        removed, and the rest goes on."""
        try:
            return plot() is not False
        except WriteError:  # a full disk, a read-only sweep dir: the report fails
            raise
        except Exception as err:
            discard_figures()
            (sweep_dir / file).unlink(missing_ok=True)
            not_drawn.append(f"{file} ({type(err).__name__}: {err})")
            return False

    write_csv(summaries, sweep_dir / "report.csv", metrics)
    has_time_plot = draw(
        plot_name, lambda: plot_metric_vs_time(summaries, sweep_dir / plot_name, key, label)
    )
    has_curves = draw(
        "learning_curves.png",
        lambda: plot_learning_curves(
            summaries, sweep_dir / "learning_curves.png", monitor, history
        ),
    )
    lr_run = lr_plot_run(
        summaries, lambda r: _or_inf(r.results.get(key), sign), schedule, decisions
    )
    if lr_run is not None:
        lr_caption = (
            f"Per-group LR of {code(lr_run.dir.resolve())} ({text(lr_run.variant)}, seed "
            f"{text(lr_run.results.get('seed'))})"
        )
        has_lr_plot = draw(
            "lr_schedule.png",
            lambda: plot_lr_schedule(
                lr_run,
                sweep_dir / "lr_schedule.png",
                f"Per-group LR of job {_label(lr_run.dir, sweep_dir)} of {name} "
                f"({lr_run.variant}, seed {lr_run.results.get('seed')})",
                schedule(lr_run.dir),
                decisions(lr_run.dir),
            ),
        )

    machines = _distinct([machine_summary(r.results.get("machine") or {}) for r in runs])
    wall = _sweep_wall_seconds(runs)
    best_word = "highest" if spec.get("mode") == "max" else "lowest"
    trained = sum(
        r.results["train_seconds"] for r in runs if finite(r.results.get("train_seconds"))
    )
    total = len(sweep.jobs) + len(sweep.not_started)
    lines = [
        f"# Strategy comparison: {text(name)}",
        "",
        verdict_line(summaries, runs, label, best_word),
        "",
        f"- Machine: {text(machines)}",
        f"- Budget: {text(_budget(runs))}",
    ]
    notes = [r.results["report_note"] for r in runs if r.results.get("report_note")]
    if notes:
        lines.append(f"- {text(_distinct(notes))}")
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
    header = ["strategy", "runs", *(text(label) for label, _ in metrics.values()), "verdict"]
    schedules = {id(s): _schedule_link(s, sweep_dir) for s in summaries}
    if any(schedules.values()):
        header.append("schedule")
    lines += ["", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    too_large = False
    for summary in summaries:
        cells = [text(summary.variant), str(len(summary.runs))]
        cells += [_cell(summary, k, fmt) for k, (_, fmt) in metrics.items()]
        too_large = too_large or any("n/a" in cell for cell in cells[2:])
        row = [*cells, verdict_cell(summary)]
        if any(schedules.values()):
            row.append(schedules[id(summary)] or "–")
        lines.append("| " + " | ".join(row) + " |")
    label_md, monitor_md = text(label), text(monitor)
    lines += [
        "",
        f"One row per setting: the jobs that differ in nothing but their seed. Mean ± sample "
        f"standard deviation over the row's runs, ranked by {label_md} ({best_word} first); "
        f"the best epoch is picked on {monitor_md}"
        + ("; n/a: a statistic too large for a float." if too_large else "."),
        "",
        f"The verdict: Welch's t-test (two-sided) on {label_md} between the best row and each "
        f"other row, over their runs. The best row is the winner only when p < {ALPHA} "
        f"against every other row; a row at p ≥ {ALPHA} ties with it (their difference is "
        "within the seeds' noise); a row of a single run cannot be tested (its noise is "
        "unknown). Several rows make several tests, without correction: read a p near "
        f"{ALPHA} as a tie.",
    ]
    if has_time_plot:
        lines += ["", f"![{label_md} against training time]({plot_name})"]
    if has_curves:
        lines += ["", f"![{monitor_md} per epoch](learning_curves.png)"]
    if lr_run is not None and has_lr_plot:
        lines += ["", f"![per-group learning rate](lr_schedule.png) {lr_caption}."]
    if not_drawn:
        lines += ["", f"Not drawn: {text('; '.join(not_drawn))}."]
    lines += _job_sections(sweep, key, label_md)
    path = sweep_dir / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def _schedule_link(summary: StrategySummary, sweep_dir: Path) -> str | None:
    """A link to the ``schedule.yaml`` the row's first run followed (each run of a row
    wrote its own; a fixed schedule is the same in all), or None."""
    for run in summary.runs:
        path = run.dir / "schedule.yaml"
        try:
            relative = path.resolve().relative_to(sweep_dir.resolve()).as_posix()
        except ValueError:  # a run dir linked from outside the sweep
            continue
        if path.is_file():
            return f"[{text(_label(run.dir, sweep_dir))}/schedule.yaml]({relative})"
    return None


def _job_sections(sweep: Sweep, key: str, label_md: str) -> list[str]:
    """Every job with its state, then the failed and the unfinished ones with why, then
    the files that could not be read (``label_md``: the ranking metric's, as Markdown)."""
    shown = _shown_overrides(sweep)
    lines = [
        "",
        "## Jobs",
        "",
        f"| job | state | row | seed | {label_md} |",
        "| --- | --- | --- | --- | --- |",
    ]
    for job in sweep.jobs:
        if job.run is not None:
            row, seed = job.run.variant, job.run.results.get("seed")
            value = _number("{:.3f}", float(job.run.results[key]))
        else:
            row, value = f"({shown(job.overrides) or 'no overrides saved'})", "–"
            seed = next((o.partition("=")[2] for o in job.overrides if o.startswith("seed=")), "")
        job_label = code(_label(job.dir, sweep.dir), in_table=True)
        lines.append(f"| {job_label} | {job.state} | {text(row)} | {text(seed)} | {value} |")
    for overrides in sweep.not_started:
        row = f"({shown(overrides)})" if overrides is not None else ""
        lines.append(f"| – | never started | {text(row)} |  | – |")

    failed = [job for job in sweep.jobs if job.state in (FAILED, DIVERGED)]
    if failed:
        lines += ["", "## Failed jobs (not ranked)", ""]
        lines += [
            f"- {code(_label(job.dir, sweep.dir))} ({text(shown(job.overrides))}): " + _detail(job)
            for job in failed
        ]
    unfinished = [job for job in sweep.jobs if job.state in (INTERRUPTED, NO_RESULT, OTHER_STAGE)]
    if unfinished or sweep.not_started:
        lines += ["", "## Unfinished jobs (not ranked)", ""]
        lines += [
            f"- {code(_label(job.dir, sweep.dir))} ({text(shown(job.overrides))}): {job.state}: "
            + _detail(job)
            for job in unfinished
        ]
        if sweep.not_started:
            known = [o for o in sweep.not_started if o is not None]
            lines.append(
                f"- {len(sweep.not_started)} of the {sweep.planned} jobs the sweep planned "
                "(multirun.yaml) never started: the sweep was stopped before them"
                + (": " + "; ".join(code(shown(o)) for o in known) if known else "")
                + "."
            )
    if sweep.unreadable:
        lines += ["", "## Unreadable files (left out)", ""]
        lines += [
            f"- {text(message)}; left out: {text(', '.join(left_out))}"
            for message, *left_out in sweep.unreadable.values()
        ]
    return lines


def _detail(job: Job) -> str:
    """The job's detail as Markdown text, its resume command (if any) as code."""
    if not job.command:
        return text(job.detail)
    before, _, after = job.detail.partition(f"`{job.command}`")
    return text(before) + code(job.command) + text(after)


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
                std = summary.std[key]  # None (one run) or too large for a float: no number
                row += [repr(summary.mean[key]), repr(std) if finite(std) else ""]
            p = summary.p_vs_best
            writer.writerow([*row, summary.verdict, repr(p) if finite(p) else ""])


def _cell(summary: StrategySummary, key: str, fmt: str) -> str:
    """``mean ± std``; ``–`` where no run has the metric, ``n/a`` for a statistic too large
    for a float."""
    mean, std = summary.mean[key], summary.std[key]
    if math.isnan(mean):
        return "–"
    return _number(fmt, mean) + (f" ± {_number(fmt, std)}" if std is not None else "")


def _number(fmt: str, value: float) -> str:
    """``value`` in ``fmt``; in powers of ten beyond 1e15 (a damaged results.json's
    ``1e160`` in full would be 161 digits), ``n/a`` if it is not finite."""
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.3e}" if abs(value) >= 1e15 else fmt.format(value)


def _plot_name(key: str) -> str:
    """The file of the ranking metric's plot: ``cer_vs_time.png`` for ``cer``,
    ``mae_vs_time.png`` for ``test/mae``; characters other than letters, digits, ``.``,
    ``-`` and ``_`` in a key become ``_`` (the name is a link in report.md, and a file)."""
    stem = re.sub(r"[^\w.-]", "_", key.removeprefix("test_").removeprefix("test/"), flags=re.ASCII)
    return f"{stem[:100].lstrip('.') or 'metric'}_vs_time.png"


def _why(err: BaseException) -> str:
    """Why a file could not be read, after its path: ``is a FIFO (a named pipe), not a
    regular file``, ``is nested too deeply to be read``, ``cannot be read (...)``."""
    if isinstance(err, RecursionError):
        return "is nested too deeply to be read"
    if isinstance(err, ValueError) and str(err).startswith("is "):
        return str(err)
    return f"cannot be read ({err})"


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
        released = models and all((Path(m).parent / "release.json").is_file() for m in models)
        parts.append(
            f"the released source model {next(iter(models))} (max_epochs="
            f"{_distinct(sources)}), shared"
            if released and len(models) == 1
            else f"source model pretrained once (max_epochs={_distinct(sources)}), shared"
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
        hydra_cfg = read_yaml(path).hydra
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
    return code(command) + (f" (from {code(cwd)})" if cwd else "")


def _optuna(sweep: Sweep, monitor: str) -> str | None:
    path = sweep.dir / "optimization_results.yaml"
    if not path.exists():
        return None
    try:
        best = read_yaml(path)
        if "best_value" not in best:
            return None
        params = ", ".join(code(f"{k}={v}") for k, v in best.best_params.items())
        return f"Optuna: best {text(monitor)} {float(best.best_value):.4f} with {params}"
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
