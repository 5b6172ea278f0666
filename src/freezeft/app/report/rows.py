"""The rows of a sweep's table: which row each run is filed under, what ranks the rows,
and each row's mean and standard deviation over its runs."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from freezeft.app.report.jobs import Run, finite, read_overrides
from freezeft.app.report.verdict import judge
from freezeft.app.report.welch import mean, stdev

#: results.json keys every task's runs are summarised by, after the task's own columns.
RUN_METRICS = {
    "epochs": ("epochs", "{:.1f}"),
    "best_epoch": ("best epoch", "{:.1f}"),
    "train_seconds": ("training s", "{:.0f}"),
    "trainable_params": ("trainable params", "{:,.0f}"),
}


@dataclass
class StrategySummary:
    """Mean and (sample) standard deviation of each metric over one row's runs (NaN: no run
    has a number for it; a deviation of ``inf``: too large for a float), and its
    verdict against the best row (``winner``, ``tie``, ``behind``, ``untested``, ``best,
    untested`` or ``only row``) with the p-value of that comparison."""

    variant: str
    runs: list[Run]
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float | None] = field(default_factory=dict)
    verdict: str = ""
    p_vs_best: float | None = None


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


def name_rows(runs: Sequence[Run]) -> None:
    """File each run under its row: its strategy, then every setting that varies between
    the runs but the seed (a transfer option, a key the task splits by, an override)."""
    for run in runs:
        run.variant = str(run.results.get("strategy") or "none")
    shown: set[str] = set()
    for key, value_of in _setting_keys(runs).items():
        # a run without the setting (scratch has no transfer) does not make it vary
        values = {json.dumps(value_of(r), sort_keys=True) for r in runs} - {"null"}
        if len(values) > 1:  # runs of different settings are different measures
            shown.add(key)
            for run in runs:
                if value_of(run) is not None:
                    run.variant += f" {key}={value_of(run)}"
    # any other swept override (model.lr=0.1,0.01, an Optuna trial's parameters) makes runs
    # different measures too: only the seed is averaged over
    swept = [_swept_settings(read_overrides(r.dir)) for r in runs]
    for key in sorted({k for settings in swept for k in settings}):
        if key.rsplit(".", 1)[-1] in shown:  # transfer.drop_source_layers, decoder: shown
            continue
        if len({settings.get(key) for settings in swept}) > 1:
            for run, settings in zip(runs, swept, strict=True):
                if key in settings:
                    run.variant += f" {key}={settings[key]}"


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


#: overrides that name what the report already shows, or that do not change a result
_NOT_SETTINGS = ("seed", "strategy", "addons", "resume", "cpu_threads", "paths.")


def _swept_settings(overrides: Sequence[str]) -> dict[str, str]:
    """The overrides that set something other than the seed and the strategy, as
    ``{key: value}``."""
    settings = {}
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key.startswith(("hydra.", *_NOT_SETTINGS)) and not key.startswith("strategy."):
            continue
        settings[key] = value
    return settings


def metric_columns(spec: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The table's columns: the task's test metrics, then what every run has."""
    columns = {key: (str(label), "{:.3f}") for key, label in spec["columns"].items()}
    columns.setdefault(spec["rank_by"], (spec["rank_by"], "{:.3f}"))  # always shown
    return {**columns, **RUN_METRICS}


def summarise(runs: Sequence[Run], spec: dict[str, Any] | None = None) -> list[StrategySummary]:
    """One summary per row, the best mean of the ranking metric first, each with its
    verdict against the best (``spec``: the runs' :func:`ranking`, computed if not given)."""
    spec = spec or ranking(runs)
    by_variant: dict[str, list[Run]] = {}
    for run in runs:
        by_variant.setdefault(run.variant, []).append(run)
    summaries = []
    for variant, members in by_variant.items():
        summary = StrategySummary(variant, members)
        for key in metric_columns(spec):
            values = [float(r.results[key]) for r in members if finite(r.results.get(key))]
            summary.mean[key] = mean(values) if values else math.nan
            summary.std[key] = stdev(values) if len(values) > 1 else None
        summaries.append(summary)
    key, sign = spec["rank_by"], (-1 if spec.get("mode") == "max" else 1)
    summaries.sort(key=lambda s: (math.isnan(s.mean[key]), sign * s.mean[key]))
    judge(summaries, key)
    return summaries
