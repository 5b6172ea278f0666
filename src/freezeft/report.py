"""``python -m freezeft.report <sweep dir>``: which strategy won a sweep.

Reads every job's ``results.json`` (and ``failure.json``) under a Hydra multirun dir and
writes, into that dir:

* ``report.md``: per strategy the mean ± std over seeds of test CER and WER (the scorer's
  with ``decoder=beam``), greedy CER and WER, epochs trained, best epoch,
  training seconds and trainable parameters, best (lowest mean test CER) first, with the
  machine, the budget, the command that reproduces the sweep, failed jobs and the plots;
* ``report.csv``: the same table, one row per strategy, mean and std in their own columns;
* ``cer_vs_time.png``: test CER against training time, one marker per run;
* ``learning_curves.png``: dev CER per epoch, the mean over seeds per strategy;
* ``lr_schedule.png``: the per-group learning rate, step by step, of one run.

Runs that differ in ``transfer.drop_source_layers`` or in ``decoder`` within a sweep are
reported apart (``naive drop=2``, ``naive decoder=greedy``). :class:`ReportCallback` runs
this at the end of every multirun.
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

from freezeft.history import read_decisions, read_history, read_lr_schedule
from freezeft.machine import summary as machine_summary

__all__ = ["Run", "StrategySummary", "collect", "summarise", "write_report", "ReportCallback"]

log = logging.getLogger(__name__)

#: results.json keys summarised per strategy, with how the Markdown table prints them.
METRICS = {
    "cer": ("test CER", "{:.3f}"),  # the scorer's with decoder=beam, else greedy
    "wer": ("test WER", "{:.3f}"),
    "greedy_cer": ("greedy CER", "{:.3f}"),
    "greedy_wer": ("greedy WER", "{:.3f}"),
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
    """The finished runs and the failures (``failure.json`` contents, with ``dir``)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(
            f"No sweep dir at {sweep_dir}; pass the dir a multirun wrote "
            "(multirun/<date>/<time> by default)."
        )
    runs = []
    for path in sorted(sweep_dir.rglob("results.json"), key=_job_order):
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a readable results.json ({err}).") from err
        if results.get("stage", "transfer") == "transfer":
            runs.append(Run(path.parent, results))
    failures = [
        {**json.loads(path.read_text()), "dir": str(path.parent)}
        for path in sorted(sweep_dir.rglob("failure.json"), key=_job_order)
    ]
    drops = {r.results.get("drop_source_layers") for r in runs} - {None}
    decoders = {r.results.get("decoder") for r in runs}
    for run in runs:
        run.variant = str(run.results.get("strategy") or "none")
        drop = run.results.get("drop_source_layers")
        if len(drops) > 1 and drop is not None:
            run.variant += f" drop={drop}"
        if len(decoders) > 1:  # a scorer's CER and a greedy one are different measures
            run.variant += f" decoder={run.results.get('decoder') or 'greedy'}"
    return runs, failures


def _job_order(path: Path) -> tuple:
    return tuple(int(p) if p.isdigit() else math.inf for p in path.parent.parts), str(path)


def summarise(runs: Sequence[Run]) -> list[StrategySummary]:
    """One summary per strategy, lowest mean test CER first."""
    by_variant: dict[str, list[Run]] = {}
    for run in runs:
        by_variant.setdefault(run.variant, []).append(run)
    summaries = []
    for variant, members in by_variant.items():
        summary = StrategySummary(variant, members)
        for key in METRICS:
            values = [float(r.results[key]) for r in members if r.results.get(key) is not None]
            summary.mean[key] = statistics.fmean(values) if values else math.nan
            summary.std[key] = statistics.stdev(values) if len(values) > 1 else None
        summaries.append(summary)
    return sorted(summaries, key=lambda s: (math.isnan(s.mean["cer"]), s.mean["cer"]))


def _cell(summary: StrategySummary, key: str) -> str:
    fmt = METRICS[key][1]
    mean, std = summary.mean[key], summary.std[key]
    if math.isnan(mean):
        return "–"
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if std is not None else "")


def _decoding(runs: list[Run]) -> str:
    """What test CER/WER were decoded with: the scorer (its words) or greedy."""
    scorers = [r.results.get("scorer") for r in runs if r.results.get("scorer")]
    if not scorers:
        return "greedy (test CER/WER = greedy CER/WER)"
    words = _distinct([f"{s['words']} words from {s['source']}" for s in scorers])
    return (
        f"test CER/WER with the scorer ({words}; lm_weight and word_score tuned on dev per "
        "run), greedy CER/WER without it"
    )


def _distinct(values: Sequence[Any]) -> str:
    unique = []
    for value in values:
        if value not in unique:
            unique.append(value)
    return " / ".join(str(v) for v in unique)


def _budget(runs: Sequence[Run]) -> str:
    budgets = [r.results.get("budget") or {} for r in runs]
    protocols = [b.get("protocol") for b in budgets if b.get("protocol")]
    parts = [
        (f"protocol {_distinct(protocols)}, " if protocols else "")
        + f"max_epochs={_distinct([b.get('max_epochs') for b in budgets])} per job on "
        f"{_distinct([b.get('train_utterances') for b in budgets])} training utterances "
        f"({_distinct([r.results.get('language') for r in runs])}), batch "
        f"{_distinct([b.get('batch_size') for b in budgets])}, n_hidden "
        f"{_distinct([b.get('n_hidden') for b in budgets])}"
    ]
    sources = [b.get("source_epochs") for b in budgets if b.get("source_epochs") is not None]
    if sources:
        parts.append(f"source model pretrained once (max_epochs={_distinct(sources)}), shared")
    seeds = sorted({r.results.get("seed") for r in runs}, key=str)
    parts.append(f"seeds {', '.join(map(str, seeds))}")
    return "; ".join(parts)


def _command(sweep_dir: Path) -> str | None:
    path = sweep_dir / "multirun.yaml"
    if not path.exists():
        return None
    overrides = OmegaConf.load(path).hydra.overrides
    launch = [
        o
        for o in overrides.hydra
        if not str(o).startswith(("hydra.sweep.", "hydra.run.", "hydra.mode"))
    ]
    return "python -m freezeft.run -m " + " ".join(
        shlex.quote(str(o)) for o in [*launch, *overrides.task]
    )


def _optuna(sweep_dir: Path) -> str | None:
    path = sweep_dir / "optimization_results.yaml"
    if not path.exists():
        return None
    best = OmegaConf.load(path)
    if "best_value" not in best:
        return None
    params = ", ".join(f"`{k}={v}`" for k, v in best.best_params.items())
    return f"Optuna: best dev CER {best.best_value:.4f} with {params}"


def _sweep_wall_seconds(runs: Sequence[Run]) -> float | None:
    starts = [(r.dir / ".hydra").stat().st_mtime for r in runs if (r.dir / ".hydra").exists()]
    ends = [(r.dir / "results.json").stat().st_mtime for r in runs]
    return max(ends) - min(starts) if starts and ends else None


def write_csv(summaries: Sequence[StrategySummary], path: Path) -> None:
    """``report.csv``: strategy, runs, then ``<metric>_mean`` and ``<metric>_std``."""
    columns = ["strategy", "runs"] + [f"{k}_{s}" for k in METRICS for s in ("mean", "std")]
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(columns)
        for summary in summaries:
            row: list[Any] = [summary.variant, len(summary.runs)]
            for key in METRICS:
                std = summary.std[key]
                row += [repr(summary.mean[key]), "" if std is None else repr(std)]
            writer.writerow(row)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cer_vs_time(summaries: Sequence[StrategySummary], path: Path) -> None:
    """Test CER against training seconds, one marker shape and colour per strategy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, summary in enumerate(summaries):
        ax.scatter(
            [r.results["train_seconds"] for r in summary.runs],
            [r.results["cer"] for r in summary.runs],
            marker=MARKERS[i % len(MARKERS)],
            color=f"C{i % 10}",
            label=summary.variant,
            s=45,
        )
    ax.set(xlabel="training time (s)", ylabel="test CER", title="Test CER against training time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_learning_curves(summaries: Sequence[StrategySummary], path: Path) -> bool:
    """Dev CER per epoch, the mean over each strategy's runs; False if no run has history."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    drawn = False
    for i, summary in enumerate(summaries):
        per_epoch: dict[int, list[float]] = {}
        for run in summary.runs:
            for row in read_history(run.dir):
                if "val_cer" in row:
                    per_epoch.setdefault(int(row["epoch"]), []).append(row["val_cer"])
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
    ax.set(xlabel="epoch", ylabel="dev CER (mean over seeds)", title="Dev CER per epoch")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def _lr_run(summaries: Sequence[StrategySummary]) -> Run | None:
    """The best run with strategy decisions (AutoFreeze's freezes), else the best run of the
    best strategy whose groups train at different LRs, else the best."""
    for summary in summaries:
        for run in sorted(summary.runs, key=lambda r: r.results["cer"]):
            if read_decisions(run.dir):
                return run
    fallback = None
    for summary in summaries:
        for run in sorted(summary.runs, key=lambda r: r.results["cer"]):
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
    summaries = summarise(runs)
    write_csv(summaries, sweep_dir / "report.csv")
    plot_cer_vs_time(summaries, sweep_dir / "cer_vs_time.png")
    has_curves = plot_learning_curves(summaries, sweep_dir / "learning_curves.png")
    lr_run = _lr_run(summaries)
    if lr_run is not None:
        plot_lr_schedule(lr_run, sweep_dir / "lr_schedule.png")

    machines = _distinct([machine_summary(r.results.get("machine") or {}) for r in runs])
    wall = _sweep_wall_seconds(runs)
    lines = [
        f"# Strategy comparison: {sweep_dir.name}",
        "",
        f"Winner: **{summaries[0].variant}** (lowest mean test CER).",
        "",
        f"- Machine: {machines}",
        f"- Budget: {_budget(runs)}",
        f"- Decoding: {_decoding(runs)}",
        f"- Jobs: {len(runs)} finished, {len(failures)} failed; "
        f"training {sum(r.results['train_seconds'] for r in runs):.0f} s in all"
        + (f", sweep wall time {wall:.0f} s" if wall is not None else ""),
    ]
    command = _command(sweep_dir)
    if command:
        lines.append(f"- Reproduce: `{command}`")
    optuna = _optuna(sweep_dir)
    if optuna:
        lines.append(f"- {optuna}")
    header = ["strategy", "runs", *(label for label, _ in METRICS.values())]
    lines += [
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for summary in summaries:
        cells = [summary.variant, str(len(summary.runs))] + [_cell(summary, k) for k in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Mean ± sample standard deviation over the runs (seeds). Test metrics are on voices "
        "never heard in training; the best epoch is picked on dev CER.",
        "",
        "![test CER against training time](cer_vs_time.png)",
    ]
    if has_curves:
        lines += ["", "![dev CER per epoch](learning_curves.png)"]
    if lr_run is not None:
        lines += [
            "",
            f"![per-group learning rate](lr_schedule.png) Per-group LR of "
            f"`{lr_run.dir.relative_to(sweep_dir)}` ({lr_run.variant}).",
        ]
    if failures:
        lines += ["", "## Failed jobs", ""]
        lines += [
            f"- `{Path(f['dir']).relative_to(sweep_dir)}` "
            f"({' '.join(f.get('overrides', []))}): {f['error']}"
            for f in failures
        ]
    path = sweep_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
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
