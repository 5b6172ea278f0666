"""The report's plots: a test metric against training time, the learning curves and one
run's per-group learning rate (matplotlib, loaded when a plot is drawn)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from freezeft.app.report.jobs import Run, finite
from freezeft.app.report.rows import StrategySummary
from freezeft.app.report.welch import mean
from freezeft.files import atomic_write
from freezeft.history import read_decisions, read_history, read_lr_schedule
from freezeft.text import is_number

MARKERS = "os^Dv<>PX*ph"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def discard_figures() -> None:
    """Close every figure (those of a plot that failed half-way)."""
    _pyplot().close("all")


def _plain(value: Any) -> str:
    """``value`` as matplotlib shows it as it is: a ``$`` escaped (a pair of them would be
    mathtext, and a strategy named ``a$\\frac$`` would stop the plot with a parse error)."""
    return str(value).replace("$", r"\$")


def _save(fig: Any, path: Path, dpi: int) -> None:
    """``fig`` as a PNG at ``path``, written atomically (an interrupted report leaves the
    previous plot, never half of one)."""
    with atomic_write(path, "wb") as stream:
        fig.savefig(stream, format="png", dpi=dpi)


def plot_metric_vs_time(
    summaries: Sequence[StrategySummary], path: Path, key: str, label: str
) -> None:
    """A test metric against training seconds, one marker shape and colour per row."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, summary in enumerate(summaries):
        timed = [r for r in summary.runs if finite(r.results.get("train_seconds"))]
        ax.scatter(
            [r.results["train_seconds"] for r in timed],
            [r.results[key] for r in timed],
            marker=MARKERS[i % len(MARKERS)],
            color=f"C{i % 10}",
            label=_plain(summary.variant),
            s=45,
        )
    label = _plain(label)
    ax.set(xlabel="training time (s)", ylabel=label, title=f"{label} against training time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path, 120)
    plt.close(fig)


def plot_learning_curves(
    summaries: Sequence[StrategySummary],
    path: Path,
    monitor: str,
    read: Callable[[Path], list[dict[str, Any]]] = read_history,
) -> bool:
    """The monitored dev metric per epoch, the mean over each row's runs; False if no run
    has history (``read``: a run dir's epochs, :func:`~freezeft.history.read_history`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    drawn = False
    for i, summary in enumerate(summaries):
        per_epoch: dict[int, list[float]] = {}
        for run in summary.runs:
            for row in read(run.dir):
                if finite(row.get(monitor)) and finite(row.get("epoch")):
                    per_epoch.setdefault(int(row["epoch"]), []).append(row[monitor])
        if not per_epoch:
            continue
        epochs = sorted(per_epoch)
        ax.plot(
            epochs,
            [mean(per_epoch[e]) for e in epochs],
            marker=MARKERS[i % len(MARKERS)],
            color=f"C{i % 10}",
            label=_plain(summary.variant),
            markersize=4,
        )
        drawn = True
    monitor = _plain(monitor)
    ax.set(xlabel="epoch", ylabel=f"{monitor} (mean over seeds)", title=f"{monitor} per epoch")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
        fig.tight_layout()
        _save(fig, path, 120)
    plt.close(fig)
    return drawn


def lr_plot_run(
    summaries: Sequence[StrategySummary],
    order: Any,
    schedule_of: Callable[[Path], dict[str, list[float]]] = read_lr_schedule,
    decisions_of: Callable[[Path], list[dict[str, Any]]] = read_decisions,
) -> Run | None:
    """The run whose plot shows the most, best rows first: one with strategy decisions
    (AutoFreeze's freezes), else one in which a group changes between frozen and training
    (a thaw, a freeze), else one whose groups train at different LRs, else any with a
    schedule."""

    def curves(run: Run) -> set[tuple[float, ...]]:
        schedule = schedule_of(run.dir)
        return {tuple(v) for k, v in schedule.items() if k not in ("step", "epoch")}

    def changes(run: Run) -> bool:
        return any(
            any(v == 0 for v in curve) and any(v > 0 for v in curve) for curve in curves(run)
        )

    ordered = [run for summary in summaries for run in sorted(summary.runs, key=order)]
    for run in ordered:
        if decisions_of(run.dir) and curves(run):
            return run
    return (
        next((r for r in ordered if changes(r)), None)
        or next((r for r in ordered if len(curves(r)) > 1), None)
        or next((r for r in ordered if curves(r)), None)
    )


def plot_lr_schedule(
    run: Run,
    path: Path,
    title: str | None = None,
    schedule: dict[str, list[float]] | None = None,
    decisions: Sequence[dict[str, Any]] | None = None,
) -> None:
    """Each param group's LR per optimizer step (0 while frozen) for one run: one small
    panel per group, all on the same steps, so a frozen group (a flat line at 0) never
    hides another."""
    plt = _pyplot()
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator

    schedule = read_lr_schedule(run.dir) if schedule is None else schedule
    decisions = read_decisions(run.dir) if decisions is None else decisions
    decisions = [d for d in decisions if is_number(d.get("step"))]
    groups = [k for k in schedule if k not in ("step", "epoch")]
    fig, axes = plt.subplots(
        len(groups), 1, sharex=True, squeeze=False, figsize=(6.4, 0.8 + 1.0 * len(groups))
    )
    for i, (ax, name) in enumerate(zip(axes[:, 0], groups, strict=True)):
        values = schedule[name]
        ax.plot(schedule["step"], values, color=f"C{i % 10}", linewidth=1.2)
        top = max((v for v in values if math.isfinite(v)), default=0.0)
        ax.set_ylim(0, top * 1.15 if top > 0 else 1)
        if top <= 0:
            ax.text(0.5, 0.5, "frozen (LR 0) throughout", transform=ax.transAxes,
                    ha="center", va="center", fontsize=8, color="0.35")  # fmt: skip
        ax.set_title(_plain(name), fontsize=8, loc="left", pad=2)
        ax.yaxis.set_major_locator(MaxNLocator(3) if top > 0 else FixedLocator([0]))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        for decision in decisions:  # e.g. AutoFreeze: which group froze when
            ax.axvline(decision["step"], color="0.4", linestyle=":", linewidth=1)
            if decision.get("group") == name:
                ax.annotate(
                    _plain(f"{decision.get('strategy', '')}: froze"),
                    (decision["step"], 0),
                    fontsize=6,
                    xytext=(2, 4),
                    textcoords="offset points",
                )
    axes[-1, 0].set_xlabel("optimizer step")
    fig.supylabel("learning rate (0 = frozen)", fontsize=8)
    fig.suptitle(
        _plain(title or f"Per-group LR: {run.variant}, seed {run.results.get('seed')}"),
        fontsize=9,
    )
    fig.tight_layout()
    _save(fig, path, 110)
    plt.close(fig)
