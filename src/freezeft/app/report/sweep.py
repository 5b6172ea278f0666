"""A sweep: every job dir under a multirun dir, what became of each, and the jobs it planned."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from freezeft.app.report.jobs import (
    UNREADABLE,
    Job,
    Run,
    finite,
    read_job,
    read_yaml,
)
from freezeft.app.report.rows import name_rows, ranking
from freezeft.text import joined_lines

log = logging.getLogger(__name__)


@dataclass
class Sweep:
    """Every job found under ``dir``, the files that could not be read (path -> why) and,
    when its ``multirun.yaml`` tells, the jobs the sweep planned but never started."""

    dir: Path
    jobs: list[Job] = field(default_factory=list)
    unreadable: dict[str, list[str]] = field(default_factory=dict)
    planned: int | None = None
    not_started: list[list[str] | None] = field(default_factory=list)

    @property
    def runs(self) -> list[Run]:
        return [job.run for job in self.jobs if job.run is not None]

    def cannot_read(self, path: Path | str, message: str, left_out: str) -> None:
        """Note that ``path`` could not be read (``message``) and what it left out."""
        parts = self.unreadable.setdefault(str(path), [joined_lines(message)])
        if left_out not in parts:
            parts.append(left_out)


def collect(sweep_dir: str | Path) -> Sweep:
    """Every job under ``sweep_dir`` with its state; the finished ones carry their run.

    A run whose ``results.json`` says it diverged is a job in state ``diverged``, never a
    run: its NaN metrics are not averaged in. A ``results.json`` that is not JSON, not an
    object, or has no number for the ranking metric makes its job ``unreadable``; it is
    named in :attr:`Sweep.unreadable` and nothing else is held up.

    Raises:
        FileNotFoundError: ``sweep_dir`` does not exist.
        ValueError: ``sweep_dir`` is a single run's dir, or its runs rank by different
            metrics (jobs of different tasks in one dir).
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(
            f"No sweep dir at {sweep_dir}; pass the dir a multirun wrote "
            "(multirun/<date>/<time> by default)."
        )
    marks = [n for n in (".hydra", "results.json", "failure.json") if (sweep_dir / n).exists()]
    if marks:
        raise ValueError(
            f"{sweep_dir.resolve()} is a single run's dir (it holds {' and '.join(marks)}), "
            "not a sweep: there is nothing to compare it with (its results.json, "
            "history.json and lr_schedule.csv say how it went). Pass the multirun dir that "
            "holds several jobs (multirun/<date>/<time>), or a folder of several run dirs."
        )
    sweep = Sweep(sweep_dir)
    sweep.jobs = [read_job(job_dir, sweep) for job_dir in _job_dirs(sweep_dir)]
    spec = ranking(sweep.runs)
    for job in sweep.jobs:  # a run without a number to rank by cannot be ranked
        if job.run is None or finite(job.run.results.get(spec["rank_by"])):
            continue
        path = job.dir / "results.json"
        problem = _no_value(job.run.results, spec["rank_by"])
        sweep.cannot_read(path, f"{path} {problem}", "the job's results (not ranked)")
        job.state, job.detail, job.run = UNREADABLE, f"its results.json {problem}", None
    name_rows(sweep.runs)
    _planned_jobs(sweep)
    return sweep


def _job_dirs(sweep_dir: Path) -> list[Path]:
    """Every folder under ``sweep_dir`` that a job wrote: it has ``.hydra/`` (a job Hydra
    started), ``results.json`` or ``failure.json``."""
    found = {p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir()}
    found |= {p.parent for name in ("results.json", "failure.json") for p in sweep_dir.rglob(name)}
    return sorted(found, key=_job_order)


def _job_order(job_dir: Path) -> tuple:
    return tuple(int(p) if p.isdigit() else math.inf for p in job_dir.parts), str(job_dir)


def _no_value(results: dict[str, Any], key: str) -> str:
    """How ``results`` lacks a number for ``key``."""
    if key not in results:
        return f"has no `{key}`, the metric the runs are ranked by"
    not_finite = results.get(f"{key}_not_finite")
    shown = json.dumps(results[key])
    shown = (shown if len(shown) <= 40 else f"{shown[:20]}...({len(shown)} characters)") + (
        f" ({not_finite})" if not_finite else ""
    )
    return f"has `{key}`: {shown}, not a number to rank by"


def _planned_jobs(sweep: Sweep) -> None:
    """How many jobs the sweep's ``multirun.yaml`` planned, and those that never started
    (their overrides where Hydra's basic sweeper tells, else ``None``)."""
    path = sweep.dir / "multirun.yaml"
    if not path.exists():
        return
    try:
        hydra_cfg = read_yaml(path).hydra
    except Exception as err:
        sweep.cannot_read(path, f"{path} is not readable ({err})", "the planned jobs")
        return
    planned: list[list[str]] | None = None
    try:
        target = str(hydra_cfg.sweeper._target_)
        if "optuna" in target.lower():
            count = int(hydra_cfg.sweeper.n_trials)
        elif target.endswith("BasicSweeper"):
            from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
            from hydra.core.override_parser.overrides_parser import OverridesParser

            params = hydra_cfg.sweeper.get("params") or {}
            arguments = [f"{k}={v}" for k, v in params.items()]
            arguments += [str(o) for o in hydra_cfg.overrides.task]
            parsed = OverridesParser.create().parse_overrides(arguments)
            planned = BasicSweeper.split_arguments(parsed, None)[0]
            count = len(planned)
        else:  # another sweeper: it knows how many, the report does not
            return
    except Exception as err:
        log.debug(f"The jobs {path} planned are not known: {err}")
        return
    sweep.planned = count
    missing = count - len(sweep.jobs)
    if missing <= 0:
        return
    sweep.not_started = [None] * missing
    if planned is not None:
        seen = [sorted(job.overrides) for job in sweep.jobs]
        unseen = []
        for overrides in planned:
            if sorted(overrides) in seen:
                seen.remove(sorted(overrides))
            else:
                unseen.append(list(overrides))
        if len(unseen) == missing:
            sweep.not_started = list(unseen)
