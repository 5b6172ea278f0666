"""``python -m freezeft.report <sweep dir>``: which strategy won a sweep.

Reads every job's ``results.json`` (and ``failure.json``) under a Hydra multirun dir and
writes, into that dir:

* ``report.md``: per strategy the mean ± std over seeds of the task's test metrics, epochs
  trained, best epoch, training seconds and trainable parameters, best first, with the
  machine, the budget, the command that reproduces the sweep, failed jobs and the plots;
* ``report.csv``: the same table, one row per strategy, mean and std in their own columns;
* ``<metric>_vs_time.png``: the ranking test metric against training time, one marker per run;
* ``learning_curves.png``: the monitored dev metric per epoch, the mean over seeds per strategy;
* ``lr_schedule.png``: the per-group learning rate, step by step, of one run.

Which test metric ranks the runs, in which direction, and which columns show comes from
each run's ``results.json`` (``report``: the task's declaration, or the monitored metric's
test counterpart, e.g. ``val_acc`` -> ``test_acc``, higher is better with
``monitor_mode=max``). The speech task ranks by test CER, lower is better. Runs that
differ in a ``transfer`` option or in a key the task splits by (the speech task's
``decoder``) are reported apart (``naive drop_source_layers=2``, ``naive decoder=greedy``).
:class:`ReportCallback` runs this at the end of every multirun.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shlex
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from freezeft.app.divergence import describe as describe_divergence
from freezeft.files import atomic_write, write_text_atomic
from freezeft.history import read_decisions, read_history, read_lr_schedule
from freezeft.machine import summary as machine_summary

__all__ = [
    "Run",
    "StrategySummary",
    "collect",
    "ranking",
    "summarise",
    "write_report",
    "ReportCallback",
]

log = logging.getLogger(__name__)

#: results.json keys every task's runs are summarised by, after the task's own columns.
RUN_METRICS = {
    "epochs": ("epochs", "{:.1f}"),
    "best_epoch": ("best epoch", "{:.1f}"),
    "train_seconds": ("training s", "{:.0f}"),
    "trainable_params": ("trainable params", "{:,.0f}"),
}
MARKERS = "os^Dv<>PX*ph"


@dataclass
class Run:
    """One finished job: its dir, its ``results.json`` and the strategy it is filed under."""

    dir: Path
    results: dict[str, Any]
    variant: str = ""


@dataclass
class StrategySummary:
    """Mean and (sample) standard deviation of each metric over one strategy's runs."""

    variant: str
    runs: list[Run]
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float | None] = field(default_factory=dict)


def collect(sweep_dir: Path) -> tuple[list[Run], list[dict[str, Any]]]:
    """The finished runs and the failures (``failure.json`` contents, with ``dir``).

    A run whose ``results.json`` says it diverged is a failure (with ``diverged``: its
    step, epoch and learning rate), never a run: its NaN metrics are not averaged in.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(
            f"No sweep dir at {sweep_dir}; pass the dir a multirun wrote "
            "(multirun/<date>/<time> by default)."
        )
    runs = []
    diverged = []
    for path in sorted(sweep_dir.rglob("results.json"), key=_job_order):
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a readable results.json ({err}).") from err
        if results.get("status") == "diverged":
            details = results.get("diverged") or {}
            diverged.append(
                {
                    "dir": str(path.parent),
                    "overrides": _overrides(path.parent),
                    "error": describe_divergence(details),
                    "diverged": details,
                }
            )
        elif results.get("stage", "transfer") == "transfer":
            runs.append(Run(path.parent, results))
    failures = [
        {**json.loads(path.read_text()), "dir": str(path.parent)}
        for path in sorted(sweep_dir.rglob("failure.json"), key=_job_order)
    ]
    reported = {f["dir"] for f in diverged}  # a diverged job's failure.json says no more
    failures = [f for f in failures if f["dir"] not in reported] + diverged
    for run in runs:
        run.variant = str(run.results.get("strategy") or "none")
    for key, value_of in _setting_keys(runs).items():
        # a run without the setting (scratch has no transfer) does not make it vary
        values = {json.dumps(value_of(r), sort_keys=True) for r in runs} - {"null"}
        if len(values) > 1:  # runs of different settings are different measures
            for run in runs:
                if value_of(run) is not None:
                    run.variant += f" {key}={value_of(run)}"
    # any other swept override (model.lr=0.1,0.01) makes runs different measures too:
    # only the seed is averaged over
    swept = [_swept_settings(r.dir) for r in runs]
    for key in sorted({k for settings in swept for k in settings}):
        if len({settings.get(key) for settings in swept}) > 1:
            for run, settings in zip(runs, swept, strict=True):
                shown = f" {key.rsplit('.', 1)[-1]}=" in run.variant  # a transfer option
                if key in settings and not shown:
                    run.variant += f" {key}={settings[key]}"
    return runs, failures


#: overrides that name what the report already shows, or that do not change a result
_NOT_SETTINGS = ("seed", "strategy", "addons", "resume", "cpu_threads", "paths.")


def _swept_settings(job_dir: Path) -> dict[str, str]:
    """The job's command-line overrides that set something other than its seed and
    strategy, as ``{key: value}``."""
    settings = {}
    for override in _overrides(job_dir):
        key, _, value = override.lstrip("+~").partition("=")
        if key.startswith(("hydra.", *_NOT_SETTINGS)) and not key.startswith("strategy."):
            continue
        settings[key] = value
    return settings


def _overrides(job_dir: Path) -> list[str]:
    """The job's command-line overrides, as Hydra saved them (none if it did not)."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    try:
        return [str(o) for o in OmegaConf.load(path)]
    except Exception:  # unreadable: the report still lists the job
        return []


def _setting_keys(runs: Sequence[Run]) -> dict[str, Any]:
    """Settings that tell runs apart besides the strategy: every ``transfer`` option, and
    the keys the task splits by (``report.split_by``)."""
    keys: dict[str, Any] = {}
    for run in runs:
        for option in run.results.get("transfer") or {}:
            keys[option] = lambda r, o=option: (r.results.get("transfer") or {}).get(o)
        for key in (run.results.get("report") or {}).get("split_by", []):
            keys[key] = lambda r, k=key: r.results.get(k)
    return keys


def ranking(runs: Sequence[Run]) -> dict[str, Any]:
    """What ranks the runs and what the table shows: ``rank_by``, ``mode``, ``columns``
    (the runs' ``report`` entry, which every run of a sweep must share).

    Raises:
        ValueError: runs rank by different metrics (jobs of different tasks in one dir).
    """
    specs = {json.dumps(r.results.get("report") or {}, sort_keys=True) for r in runs}
    if len(specs) > 1:
        raise ValueError(
            "The runs under this dir rank by different metrics (their results.json `report` "
            f"entries differ: {sorted(specs)}); report each task's sweep dir on its own."
        )
    spec = dict(runs[0].results.get("report") or {}) if runs else {}
    if "rank_by" not in spec:  # results.json written before tasks declared their report
        spec = {"rank_by": "cer", "mode": "min", "columns": {"cer": "test CER", "wer": "test WER"}}
    spec.setdefault("columns", {spec["rank_by"]: spec["rank_by"]})
    return spec


def _metrics(spec: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The table's columns: the task's test metrics, then what every run has."""
    columns = {key: (label, "{:.3f}") for key, label in spec["columns"].items()}
    columns.setdefault(spec["rank_by"], (spec["rank_by"], "{:.3f}"))  # always shown
    return {**columns, **RUN_METRICS}


def _job_order(path: Path) -> tuple:
    return tuple(int(p) if p.isdigit() else math.inf for p in path.parent.parts), str(path)


def summarise(runs: Sequence[Run], spec: dict[str, Any] | None = None) -> list[StrategySummary]:
    """One summary per strategy, the best mean of the ranking metric first (``spec``: the
    runs' :func:`ranking`, computed here if not given)."""
    spec = spec or ranking(runs)
    by_variant: dict[str, list[Run]] = {}
    for run in runs:
        by_variant.setdefault(run.variant, []).append(run)
    summaries = []
    for variant, members in by_variant.items():
        summary = StrategySummary(variant, members)
        for key in _metrics(spec):
            values = [float(r.results[key]) for r in members if _number(r.results.get(key))]
            summary.mean[key] = statistics.fmean(values) if values else math.nan
            summary.std[key] = statistics.stdev(values) if len(values) > 1 else None
        summaries.append(summary)
    key, sign = spec["rank_by"], (-1 if spec.get("mode") == "max" else 1)
    return sorted(summaries, key=lambda s: (math.isnan(s.mean[key]), sign * s.mean[key]))


def _or_inf(value: Any, sign: int) -> float:
    """``sign * value`` to sort by (best first), a missing value last."""
    return sign * float(value) if _number(value) else math.inf


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(summary: StrategySummary, key: str, fmt: str) -> str:
    mean, std = summary.mean[key], summary.std[key]
    if math.isnan(mean):
        return "–"
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if std is not None else "")


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
        parts.append(f"source model pretrained once (max_epochs={_distinct(sources)}), shared")
    seeds = sorted({r.results.get("seed") for r in runs}, key=str)
    parts.append(f"seeds {', '.join(map(str, seeds))}")
    return "; ".join(parts)


def _command(sweep_dir: Path) -> str | None:
    """The command that reproduces the sweep, and the folder it ran from (relative paths in
    its overrides, e.g. ``transfer.source``, are relative to it)."""
    path = sweep_dir / "multirun.yaml"
    if not path.exists():
        return None
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
    command = "python -m freezeft.run -m " + " ".join(
        [*config_dirs, *(shlex.quote(str(o)) for o in [*launch, *overrides.task])]
    )
    cwd = hydra_cfg.runtime.get("cwd")
    return f"`{command}`" + (f" (from `{cwd}`)" if cwd else "")


def _optuna(sweep_dir: Path, monitor: str) -> str | None:
    path = sweep_dir / "optimization_results.yaml"
    if not path.exists():
        return None
    best = OmegaConf.load(path)
    if "best_value" not in best:
        return None
    params = ", ".join(f"`{k}={v}`" for k, v in best.best_params.items())
    return f"Optuna: best {monitor} {best.best_value:.4f} with {params}"


def _sweep_wall_seconds(runs: Sequence[Run]) -> float | None:
    starts = [(r.dir / ".hydra").stat().st_mtime for r in runs if (r.dir / ".hydra").exists()]
    ends = [(r.dir / "results.json").stat().st_mtime for r in runs]
    return max(ends) - min(starts) if starts and ends else None


def write_csv(
    summaries: Sequence[StrategySummary], path: Path, metrics: dict[str, tuple[str, str]]
) -> None:
    """``report.csv``: strategy, runs, then ``<metric>_mean`` and ``<metric>_std``."""
    columns = ["strategy", "runs"] + [f"{k}_{s}" for k in metrics for s in ("mean", "std")]
    with atomic_write(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(columns)
        for summary in summaries:
            row: list[Any] = [summary.variant, len(summary.runs)]
            for key in metrics:
                std = summary.std[key]
                row += [repr(summary.mean[key]), "" if std is None else repr(std)]
            writer.writerow(row)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric_vs_time(
    summaries: Sequence[StrategySummary], path: Path, key: str, label: str
) -> None:
    """A test metric against training seconds, one marker shape and colour per strategy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, summary in enumerate(summaries):
        ax.scatter(
            [r.results["train_seconds"] for r in summary.runs],
            [r.results.get(key) for r in summary.runs],
            marker=MARKERS[i % len(MARKERS)],
            color=f"C{i % 10}",
            label=summary.variant,
            s=45,
        )
    ax.set(xlabel="training time (s)", ylabel=label, title=f"{label} against training time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_learning_curves(summaries: Sequence[StrategySummary], path: Path, monitor: str) -> bool:
    """The monitored dev metric per epoch, the mean over each strategy's runs; False if no
    run has history."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    drawn = False
    for i, summary in enumerate(summaries):
        per_epoch: dict[int, list[float]] = {}
        for run in summary.runs:
            for row in read_history(run.dir):
                if monitor in row:
                    per_epoch.setdefault(int(row["epoch"]), []).append(row[monitor])
        if not per_epoch:
            continue
        epochs = sorted(per_epoch)
        ax.plot(
            epochs,
            [statistics.fmean(per_epoch[e]) for e in epochs],
            marker=MARKERS[i % len(MARKERS)],
            color=f"C{i % 10}",
            label=summary.variant,
            markersize=4,
        )
        drawn = True
    ax.set(xlabel="epoch", ylabel=f"{monitor} (mean over seeds)", title=f"{monitor} per epoch")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def _lr_run(summaries: Sequence[StrategySummary], order: Any) -> Run | None:
    """The best run with strategy decisions (AutoFreeze's freezes), else the best run of the
    best strategy whose groups train at different LRs, else the best."""
    for summary in summaries:
        for run in sorted(summary.runs, key=order):
            if read_decisions(run.dir):
                return run
    fallback = None
    for summary in summaries:
        for run in sorted(summary.runs, key=order):
            schedule = read_lr_schedule(run.dir)
            curves = {tuple(v) for k, v in schedule.items() if k not in ("step", "epoch")}
            if len(curves) > 1:
                return run
            if schedule and fallback is None:
                fallback = run
    return fallback


def plot_lr_schedule(run: Run, path: Path) -> None:
    """Each param group's LR per optimizer step (0 while frozen) for one run."""
    plt = _pyplot()
    schedule = read_lr_schedule(run.dir)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (name, values) in enumerate(
        (k, v) for k, v in schedule.items() if k not in ("step", "epoch")
    ):
        ax.plot(schedule["step"], values, color=f"C{i % 10}", label=name, linewidth=1.2)
    for decision in read_decisions(run.dir):  # e.g. AutoFreeze: which group froze when
        ax.axvline(decision["step"], color="0.4", linestyle=":", linewidth=1)
        ax.annotate(
            f"{decision.get('strategy', '')}: froze {decision['group']}",
            (decision["step"], 0),
            rotation=90,
            fontsize=6,
            xytext=(2, 4),
            textcoords="offset points",
        )
    ax.set(
        xlabel="optimizer step",
        ylabel="learning rate (0 = frozen)",
        title=f"Per-group LR: {run.variant}, seed {run.results.get('seed')}",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(sweep_dir: str | Path) -> Path:
    """Write ``report.md``, ``report.csv`` and the plots into ``sweep_dir``; returns report.md.

    Raises:
        FileNotFoundError: ``sweep_dir`` does not exist.
        ValueError: no job of the sweep finished (the failures are listed).
    """
    sweep_dir = Path(sweep_dir)
    runs, failures = collect(sweep_dir)
    if not runs:
        listed = "; ".join(f"{f['dir']}: {f['error']}" for f in failures) or "none found"
        raise ValueError(
            f"No finished job (results.json) under {sweep_dir}, so there is nothing to "
            f"compare. Failed jobs: {listed}"
        )
    spec = ranking(runs)
    summaries = summarise(runs, spec)
    metrics = _metrics(spec)
    key, label = spec["rank_by"], metrics.get(spec["rank_by"], (spec["rank_by"],))[0]
    monitor = str(runs[0].results.get("monitor") or "val_cer")
    plot_name = f"{key.removeprefix('test_').removeprefix('test/').replace('/', '_')}_vs_time.png"
    sign = -1 if spec.get("mode") == "max" else 1
    write_csv(summaries, sweep_dir / "report.csv", metrics)
    plot_metric_vs_time(summaries, sweep_dir / plot_name, key, label)
    has_curves = plot_learning_curves(summaries, sweep_dir / "learning_curves.png", monitor)
    lr_run = _lr_run(summaries, lambda r: _or_inf(r.results.get(key), sign))
    if lr_run is not None:
        plot_lr_schedule(lr_run, sweep_dir / "lr_schedule.png")

    machines = _distinct([machine_summary(r.results.get("machine") or {}) for r in runs])
    wall = _sweep_wall_seconds(runs)
    best = "highest" if spec.get("mode") == "max" else "lowest"
    lines = [
        f"# Strategy comparison: {sweep_dir.name}",
        "",
        f"Winner: **{summaries[0].variant}** ({best} mean {label}).",
        "",
        f"- Machine: {machines}",
        f"- Budget: {_budget(runs)}",
    ]
    notes = [r.results["report_note"] for r in runs if r.results.get("report_note")]
    if notes:
        lines.append(f"- {_distinct(notes)}")
    n_diverged = sum(1 for f in failures if f.get("diverged") is not None)
    lines.append(
        f"- Jobs: {len(runs)} finished, {len(failures)} failed"
        + (f" ({n_diverged} diverged, not ranked)" if n_diverged else "")
        + "; "
        f"training {sum(r.results['train_seconds'] for r in runs):.0f} s in all"
        + (f", sweep wall time {wall:.0f} s" if wall is not None else "")
    )
    command = _command(sweep_dir)
    if command:
        lines.append(f"- Reproduce: {command}")
    optuna = _optuna(sweep_dir, monitor)
    if optuna:
        lines.append(f"- {optuna}")
    header = ["strategy", "runs", *(label for label, _ in metrics.values())]
    lines += [
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for summary in summaries:
        cells = [summary.variant, str(len(summary.runs))]
        cells += [_cell(summary, k, fmt) for k, (_, fmt) in metrics.items()]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Mean ± sample standard deviation over the runs (seeds), ranked by {label} "
        f"({best} first); the best epoch is picked on {monitor}.",
        "",
        f"![{label} against training time]({plot_name})",
    ]
    if has_curves:
        lines += ["", f"![{monitor} per epoch](learning_curves.png)"]
    if lr_run is not None:
        lines += [
            "",
            f"![per-group learning rate](lr_schedule.png) Per-group LR of "
            f"`{lr_run.dir.relative_to(sweep_dir)}` ({lr_run.variant}).",
        ]
    if failures:
        lines += ["", "## Failed jobs (not ranked)", ""]
        lines += [
            f"- `{Path(f['dir']).relative_to(sweep_dir)}` "
            f"({' '.join(f.get('overrides', []))}): {f['error']}"
            for f in failures
        ]
    path = sweep_dir / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


class ReportCallback(Callback):
    """Hydra callback: write the report at the end of every multirun (``hydra/default.yaml``)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            path = write_report(sweep_dir)
        except Exception as err:  # the jobs' own results stay; say why there is no report
            log.error(f"No sweep report: {err}")
            print(f"freezeft: no sweep report: {err}", flush=True)
            return
        print(f"freezeft: sweep report -> {path}", flush=True)


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line: ``python -m freezeft.report <sweep dir>``."""
    parser = argparse.ArgumentParser(
        prog="python -m freezeft.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("sweep_dir", type=Path, help="a multirun dir (multirun/<date>/<time>)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.sweep_dir)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    print(path.read_text())
    print(f"-> {path}")
    return path


if __name__ == "__main__":
    main()
