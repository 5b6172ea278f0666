"""``python -m freezeft.report <sweep dir>``: which strategy won a sweep, and how sure that is.

Reads every job dir under a Hydra multirun dir (a folder with ``.hydra/``, ``results.json``
or ``failure.json``) and writes, into that dir:

* ``report.md``: one row per setting (everything the jobs' overrides vary but the seed),
  the mean ± std over its seeds of the task's test metrics, epochs trained, best epoch,
  training seconds and trainable parameters, best first; the verdict (a winner only when
  it is ahead of every other row by more than the seeds' noise, see :func:`welch_p`); the
  machine, the budget, the command that reproduces the sweep; every job with its state
  (finished, failed, diverged, interrupted and resumable, killed or still running,
  never started, unreadable), the files it could not read and the plots;
* ``report.csv``: the same table, one row per setting, mean and std in their own columns,
  then ``verdict`` and ``p_vs_best``;
* ``<metric>_vs_time.png``: the ranking test metric against training time, one marker per run;
* ``learning_curves.png``: the monitored dev metric per epoch, the mean over seeds per row;
* ``lr_schedule.png``: the per-group learning rate, step by step, of one run, one panel
  per group.

Which test metric ranks the runs, in which direction, and which columns show comes from
each run's ``results.json`` (``report``: the task's declaration, or the monitored metric's
test counterpart, e.g. ``val_acc`` -> ``test_acc``, higher is better with
``monitor_mode=max``). The speech task ranks by test CER, lower is better. Runs that
differ in a ``transfer`` option, in a key the task splits by (the speech task's
``decoder``) or in any other override but the seed are reported apart (``naive
drop_source_layers=2``, ``naive model.optimizer.lr=0.05``). A file the report cannot read
is named and left out; only a dir without any finished job is refused, as is a single
run's dir (nothing to compare). :class:`ReportCallback` runs this at the end of every
multirun.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import math
import shlex
import statistics
from collections.abc import Callable, Sequence
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
    "Job",
    "Run",
    "StrategySummary",
    "Sweep",
    "collect",
    "ranking",
    "summarise",
    "welch_p",
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

#: the significance level of the winner rule: the best row wins only when Welch's t-test
#: against every other row gives p below it
ALPHA = 0.05

# what became of a job
FINISHED = "finished"
FAILED = "failed"
DIVERGED = "diverged"
INTERRUPTED = "interrupted"
NO_RESULT = "killed or still running"
UNREADABLE = "unreadable"
OTHER_STAGE = "not a transfer run"


@dataclass
class Run:
    """One finished job: its dir, its ``results.json`` and the row it is filed under."""

    dir: Path
    results: dict[str, Any]
    variant: str = ""


@dataclass
class Job:
    """One job dir of a sweep and what became of it.

    ``state`` is one of ``finished``, ``failed``, ``diverged``, ``interrupted`` (a
    checkpoint but no result: resumable), ``killed or still running`` (no checkpoint, no
    result), ``unreadable`` (its results.json cannot be used) or ``not a transfer run``;
    ``detail`` says why (the error, the divergence, the resume command, what is unreadable);
    ``run`` is set for a finished job only.
    """

    dir: Path
    state: str
    overrides: list[str]
    detail: str = ""
    run: Run | None = None


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
        parts = self.unreadable.setdefault(str(path), [_one_line(message)])
        if left_out not in parts:
            parts.append(left_out)


@dataclass
class StrategySummary:
    """Mean and (sample) standard deviation of each metric over one row's runs, and its
    verdict against the best row (``winner``, ``tie``, ``behind``, ``untested``, ``best,
    untested`` or ``only row``) with the p-value of that comparison."""

    variant: str
    runs: list[Run]
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float | None] = field(default_factory=dict)
    verdict: str = ""
    p_vs_best: float | None = None


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
    sweep.jobs = [_job(job_dir, sweep) for job_dir in _job_dirs(sweep_dir)]
    spec = ranking(sweep.runs)
    for job in sweep.jobs:  # a run without a number to rank by cannot be ranked
        if job.run is None or _finite(job.run.results.get(spec["rank_by"])):
            continue
        path = job.dir / "results.json"
        problem = _no_value(job.run.results, spec["rank_by"])
        sweep.cannot_read(path, f"{path} {problem}", "the job's results (not ranked)")
        job.state, job.detail, job.run = UNREADABLE, f"its results.json {problem}", None
    _name_rows(sweep.runs)
    _planned_jobs(sweep)
    return sweep


def _job_dirs(sweep_dir: Path) -> list[Path]:
    """Every folder under ``sweep_dir`` that a job wrote: it has ``.hydra/`` (a job Hydra
    started), ``results.json`` or ``failure.json``."""
    found = {p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir()}
    found |= {p.parent for name in ("results.json", "failure.json") for p in sweep_dir.rglob(name)}
    return sorted(found, key=_job_order)


def _job(job_dir: Path, sweep: Sweep) -> Job:
    """What became of the job in ``job_dir``, from the files it left."""
    overrides = _overrides(job_dir, sweep)
    results_path, failure_path = job_dir / "results.json", job_dir / "failure.json"
    problem = None
    if results_path.exists():
        results, problem = _read_json(results_path)
        problem = problem or _malformed(results)
        if problem is None:
            status = results.get("status", FINISHED)
            if status == DIVERGED:
                return Job(job_dir, DIVERGED, overrides, _divergence(results.get("diverged")))
            if results.get("stage", "transfer") != "transfer":
                detail = f"stage={results['stage']}; the report compares transfer runs"
                return Job(job_dir, OTHER_STAGE, overrides, detail)
            if status == FINISHED:
                return Job(job_dir, FINISHED, overrides, run=Run(job_dir, results))
            problem = f"says its status is {json.dumps(status)}"
        sweep.cannot_read(
            results_path, f"{results_path} {problem}", "the job's results (not ranked)"
        )
    if failure_path.exists():
        failure, unreadable = _read_json(failure_path)
        if unreadable is None and isinstance(failure, dict) and failure.get("error"):
            if not overrides and isinstance(failure.get("overrides"), list):
                overrides = [str(o) for o in failure["overrides"]]
            return Job(job_dir, FAILED, overrides, _one_line(str(failure["error"])))
        if unreadable is None:
            unreadable = (
                "holds no `error`"
                if isinstance(failure, dict)
                else f"holds {_kind(failure)}, not an object with the error"
            )
        sweep.cannot_read(failure_path, f"{failure_path} {unreadable}", "why the job failed")
        return Job(job_dir, FAILED, overrides, f"why is not known: its failure.json {unreadable}")
    if problem is not None:
        return Job(job_dir, UNREADABLE, overrides, f"its results.json {problem}")
    checkpoints = sorted((job_dir / "checkpoints").glob("*.ckpt"))
    if checkpoints:
        names = ", ".join(p.name for p in checkpoints)
        return Job(
            job_dir,
            INTERRUPTED,
            overrides,
            f"stopped with a checkpoint ({names}) and no result; resume it with "
            f"`{_resume_command(job_dir, overrides)}`, then report the sweep again",
        )
    return Job(
        job_dir,
        NO_RESULT,
        overrides,
        "no results.json, failure.json or checkpoint: killed before its first checkpoint, "
        "or still running",
    )


def _read_json(path: Path) -> tuple[Any, str | None]:
    """``(content, None)``, or ``(None, why it is unreadable)``."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        return None, f"cannot be read ({err})"
    if not text.strip():
        return None, "is empty"
    try:
        return json.loads(text), None
    except ValueError as err:
        return None, f"is not valid JSON ({err})"


def _kind(value: Any) -> str:
    """The JSON name of ``value``'s type."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    names = {dict: "an object", list: "a list", str: "a string"}
    return next((n for t, n in names.items() if isinstance(value, t)), "a number")


def _malformed(results: Any) -> str | None:
    """Why ``results`` is not a ``results.json`` the report can use (None if it is)."""
    if not isinstance(results, dict):
        return f"holds {_kind(results)}, not an object of results"
    for key in ("report", "budget", "machine", "transfer", "diverged"):
        if results.get(key) is not None and not isinstance(results[key], dict):
            return f"has {_kind(results[key])} for `{key}`, not an object"
    report = results.get("report") or {}
    for key, kind in (("rank_by", str), ("mode", str), ("columns", dict), ("split_by", list)):
        if key in report and not isinstance(report[key], kind):
            return f"has {_kind(report[key])} for `report.{key}`"
    return None


def _no_value(results: dict[str, Any], key: str) -> str:
    """How ``results`` lacks a number for ``key``."""
    if key not in results:
        return f"has no `{key}`, the metric the runs are ranked by"
    not_finite = results.get(f"{key}_not_finite")
    shown = json.dumps(results[key]) + (f" ({not_finite})" if not_finite else "")
    return f"has `{key}`: {shown}, not a number to rank by"


def _divergence(details: Any) -> str:
    try:
        return _one_line(describe_divergence(details or {}))
    except Exception:  # details of an unexpected shape: still a diverged job
        return "diverged (its results.json does not say where)"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _finite(value: Any) -> bool:
    return _number(value) and math.isfinite(value)


def _name_rows(runs: Sequence[Run]) -> None:
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
    swept = [_swept_settings(_overrides(r.dir)) for r in runs]
    for key in sorted({k for settings in swept for k in settings}):
        if key.rsplit(".", 1)[-1] in shown:  # transfer.drop_source_layers, decoder: shown
            continue
        if len({settings.get(key) for settings in swept}) > 1:
            for run, settings in zip(runs, swept, strict=True):
                if key in settings:
                    run.variant += f" {key}={settings[key]}"


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


def _overrides(job_dir: Path, sweep: Sweep | None = None) -> list[str]:
    """The job's command-line overrides, as Hydra saved them (none if it did not)."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    try:
        overrides = OmegaConf.load(path)
        return [str(o) for o in overrides] if OmegaConf.is_list(overrides) else []
    except Exception as err:  # unreadable: the report still lists the job
        if sweep is not None:
            sweep.cannot_read(path, f"{path} is not readable ({err})", "the job's overrides")
        return []


def _resume_command(job_dir: Path, overrides: Sequence[str]) -> str:
    """The command that resumes the job: its overrides plus ``resume=<its dir>``, with the
    ``--config-dir`` it ran with (and the folder it ran from, where it matters)."""
    config_dirs, cwd = [], None
    try:
        runtime = OmegaConf.load(job_dir / ".hydra" / "hydra.yaml").hydra.runtime
        config_dirs = [
            str(source.path)
            for source in runtime.get("config_sources", [])
            if source.get("provider") == "command-line"
        ]
        cwd = runtime.get("cwd")
    except Exception:  # no hydra.yaml: the overrides alone
        pass
    words = ["python", "-m", "freezeft.run"]
    words += [w for d in config_dirs for w in ("--config-dir", d)]
    words += [str(o) for o in overrides if not str(o).startswith("resume=")]
    words.append(f"resume={job_dir.resolve()}")
    command = " ".join(shlex.quote(w) for w in words)
    return f"cd {shlex.quote(str(cwd))} && {command}" if cwd else command


def _planned_jobs(sweep: Sweep) -> None:
    """How many jobs the sweep's ``multirun.yaml`` planned, and those that never started
    (their overrides where Hydra's basic sweeper tells, else ``None``)."""
    path = sweep.dir / "multirun.yaml"
    if not path.is_file():
        return
    try:
        hydra_cfg = OmegaConf.load(path).hydra
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
    columns = {key: (str(label), "{:.3f}") for key, label in spec["columns"].items()}
    columns.setdefault(spec["rank_by"], (spec["rank_by"], "{:.3f}"))  # always shown
    return {**columns, **RUN_METRICS}


def _job_order(job_dir: Path) -> tuple:
    return tuple(int(p) if p.isdigit() else math.inf for p in job_dir.parts), str(job_dir)


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
        for key in _metrics(spec):
            values = [float(r.results[key]) for r in members if _finite(r.results.get(key))]
            summary.mean[key] = statistics.fmean(values) if values else math.nan
            summary.std[key] = statistics.stdev(values) if len(values) > 1 else None
        summaries.append(summary)
    key, sign = spec["rank_by"], (-1 if spec.get("mode") == "max" else 1)
    summaries.sort(key=lambda s: (math.isnan(s.mean[key]), sign * s.mean[key]))
    _judge(summaries, key)
    return summaries


def _values(summary: StrategySummary, key: str) -> list[float]:
    return [float(r.results[key]) for r in summary.runs if _finite(r.results.get(key))]


def _judge(summaries: Sequence[StrategySummary], key: str) -> None:
    """The winner rule: each row is tested against the best row with :func:`welch_p` on
    ``key``; the best is the ``winner`` only when every other row is ``behind`` (p below
    :data:`ALPHA`); a row at p at or above it ``tie``s with the best; a comparison with a
    row of one run cannot be made (``untested``)."""
    if not summaries:
        return
    best, others = summaries[0], summaries[1:]
    if not others:
        best.verdict = "only row"
        return
    for summary in others:
        summary.p_vs_best = welch_p(_values(best, key), _values(summary, key))
        if summary.p_vs_best is None:
            summary.verdict = "untested"
        else:
            summary.verdict = "behind" if summary.p_vs_best < ALPHA else "tie"
    verdicts = {s.verdict for s in others}
    if verdicts == {"behind"}:
        best.verdict = "winner"
    else:
        best.verdict = "tie" if "tie" in verdicts else "best, untested"


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """The two-sided p-value of Welch's t-test that ``a`` and ``b`` have the same mean
    (None when either has fewer than two values: its noise is unknown).

    Welch's test assumes neither equal variances nor equal run counts, and its
    t-distribution with few degrees of freedom is what makes two seeds per row say
    little. Standard library only: the t-distribution's tail is a regularised
    incomplete beta function.

    Example::

        >>> round(welch_p([0.80, 0.82], [0.70, 0.66]), 3)
        0.055
    """
    if len(a) < 2 or len(b) < 2:
        return None
    mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
    var_a, var_b = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se2 = var_a + var_b
    if se2 == 0:  # no noise at all: equal or different for sure
        return 1.0 if mean_a == mean_b else 0.0
    t = abs(mean_a - mean_b) / math.sqrt(se2)
    df = se2**2 / (var_a**2 / (len(a) - 1) + var_b**2 / (len(b) - 1))
    return _incomplete_beta(df / 2, 0.5, df / (df + t * t))


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), by its continued fraction
    (Lentz's method, as in Numerical Recipes' ``betai``)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1 - math.exp(log_front) * _beta_fraction(b, a, 1 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny = 1e-300

    def nonzero(value: float) -> float:
        return value if abs(value) > tiny else tiny

    c, d = 1.0, 1 / nonzero(1 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 / nonzero(1 + numerator * d)
            c = nonzero(1 + numerator / c)
            h *= d * c
        if abs(d * c - 1) < 1e-14:
            break
    return h


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _or_inf(value: Any, sign: int) -> float:
    """``sign * value`` to sort by (best first), a missing value last."""
    return sign * float(value) if _finite(value) else math.inf


def _cell(summary: StrategySummary, key: str, fmt: str) -> str:
    mean, std = summary.mean[key], summary.std[key]
    if math.isnan(mean):
        return "–"
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if std is not None else "")


def _runs(count: int) -> str:
    return f"{count} run" + ("s" if count != 1 else "")


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _verdict_cell(summary: StrategySummary) -> str:
    if summary.p_vs_best is not None:
        return f"{summary.verdict} ({_p(summary.p_vs_best)})"
    if summary.verdict == "untested":
        return "untested (a single run on one side)"
    return f"**{summary.verdict}**" if summary.verdict == "winner" else summary.verdict


def _distinct(values: Sequence[Any]) -> str:
    unique = []
    for value in values:
        if value not in unique:
            unique.append(value)
    return " / ".join(str(v) for v in unique)


def _more_seeds(runs: Sequence[Run]) -> str:
    """``seed=0,1,2``: the seeds the runs used and two more (at least three in all)."""
    seeds = sorted({s for r in runs if isinstance(s := r.results.get("seed"), int)})
    target, extra = max(3, len(seeds) + 2), 0
    while len(seeds) < target:
        if extra not in seeds:
            seeds.append(extra)
        extra += 1
    return "seed=" + ",".join(map(str, sorted(seeds)))


def _verdict_line(
    summaries: Sequence[StrategySummary], runs: Sequence[Run], label: str, best_word: str
) -> str:
    """The report's first line: the winner, the rows that tie, or why there is none."""
    best = summaries[0]
    if best.verdict == "only row":
        return (
            f"One setting only: **{best.variant}** ({_runs(len(best.runs))}); "
            "there is nothing to compare it with."
        )
    ties = [s for s in summaries[1:] if s.verdict == "tie"]
    untested = [s.variant for s in summaries[1:] if s.verdict == "untested"]
    if best.verdict == "winner":
        closest = max(summaries[1:], key=lambda s: s.p_vs_best or 0.0)
        return (
            f"Winner: **{best.variant}** ({best_word} mean {label}), ahead of every other row "
            f"by more than the seeds' noise (Welch's t-test, {_p(closest.p_vs_best or 0.0)} "
            f"against the closest, {closest.variant})."
        )
    if ties:
        names = ", ".join(f"**{s.variant}**" for s in [best, *ties])
        parts = [
            f"Winner: none. The top rows tie: {names}. {best.variant} has the {best_word} "
            f"mean {label}, but the difference is within the seeds' noise (Welch's t-test "
            f"p ≥ {ALPHA})."
        ]
    elif len(best.runs) < 2:
        parts = [
            f"Winner: none. **{best.variant}** is best by a single run ({best_word} {label}); "
            "a single run cannot tell a difference from seed noise."
        ]
        untested = []  # every row is: said already
    else:
        parts = [
            f"Winner: none. **{best.variant}** has the {best_word} mean {label} and is ahead "
            "by more than the seeds' noise of every row it could be tested against."
        ]
    if untested:
        parts.append(
            f"{', '.join(untested)} {'has' if len(untested) == 1 else 'have'} a single run, "
            "which cannot be told from noise."
        )
    parts.append(f"Rerun with more seeds ({_more_seeds(runs)}) to tell.")
    return " ".join(parts)


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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric_vs_time(
    summaries: Sequence[StrategySummary], path: Path, key: str, label: str
) -> None:
    """A test metric against training seconds, one marker shape and colour per row."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, summary in enumerate(summaries):
        timed = [r for r in summary.runs if _finite(r.results.get("train_seconds"))]
        ax.scatter(
            [r.results["train_seconds"] for r in timed],
            [r.results[key] for r in timed],
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
                if _finite(row.get(monitor)):
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


def _lr_run(
    summaries: Sequence[StrategySummary],
    order: Any,
    schedule_of: Callable[[Path], dict[str, list[float]]] = read_lr_schedule,
    decisions_of: Callable[[Path], list[dict[str, Any]]] = read_decisions,
) -> Run | None:
    """The best run with strategy decisions (AutoFreeze's freezes), else the best run of the
    best row whose groups train at different LRs, else the best with a schedule."""

    def curves(run: Run) -> set[tuple[float, ...]]:
        schedule = schedule_of(run.dir)
        return {tuple(v) for k, v in schedule.items() if k not in ("step", "epoch")}

    ordered = [run for summary in summaries for run in sorted(summary.runs, key=order)]
    for run in ordered:
        if decisions_of(run.dir) and curves(run):
            return run
    return next((r for r in ordered if len(curves(r)) > 1), None) or next(
        (r for r in ordered if curves(r)), None
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
    decisions = [d for d in decisions if _number(d.get("step"))]
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
        ax.set_title(name, fontsize=8, loc="left", pad=2)
        ax.yaxis.set_major_locator(MaxNLocator(3) if top > 0 else FixedLocator([0]))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        for decision in decisions:  # e.g. AutoFreeze: which group froze when
            ax.axvline(decision["step"], color="0.4", linestyle=":", linewidth=1)
            if decision.get("group") == name:
                ax.annotate(
                    f"{decision.get('strategy', '')}: froze",
                    (decision["step"], 0),
                    fontsize=6,
                    xytext=(2, 4),
                    textcoords="offset points",
                )
    axes[-1, 0].set_xlabel("optimizer step")
    fig.supylabel("learning rate (0 = frozen)", fontsize=8)
    fig.suptitle(
        title or f"Per-group LR: {run.variant}, seed {run.results.get('seed')}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    metrics = _metrics(spec)
    key, label = spec["rank_by"], metrics[spec["rank_by"]][0]
    monitor = str(runs[0].results.get("monitor") or "val_cer")
    plot_name = f"{key.removeprefix('test_').removeprefix('test/').replace('/', '_')}_vs_time.png"
    sign = -1 if spec.get("mode") == "max" else 1

    @functools.cache  # each file is read, and named if unreadable, once
    def history(run_dir: Path) -> list[dict[str, Any]]:
        try:
            return read_history(run_dir)
        except ValueError as err:
            sweep.cannot_read(run_dir / "history.json", str(err), "the learning curves")
            return []

    @functools.cache
    def schedule(run_dir: Path) -> dict[str, list[float]]:
        try:
            return read_lr_schedule(run_dir)
        except ValueError as err:
            sweep.cannot_read(run_dir / "lr_schedule.csv", str(err), "the LR plot")
            return {}

    @functools.cache
    def decisions(run_dir: Path) -> list[dict[str, Any]]:
        try:
            return read_decisions(run_dir)
        except ValueError as err:
            sweep.cannot_read(run_dir / "history.json", str(err), "the LR plot's decisions")
            return []

    write_csv(summaries, sweep_dir / "report.csv", metrics)
    plot_metric_vs_time(summaries, sweep_dir / plot_name, key, label)
    has_curves = plot_learning_curves(
        summaries, sweep_dir / "learning_curves.png", monitor, history
    )
    lr_run = _lr_run(summaries, lambda r: _or_inf(r.results.get(key), sign), schedule, decisions)
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
        r.results["train_seconds"] for r in runs if _finite(r.results.get("train_seconds"))
    )
    total = len(sweep.jobs) + len(sweep.not_started)
    lines = [
        f"# Strategy comparison: {name}",
        "",
        _verdict_line(summaries, runs, label, best_word),
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
        lines.append("| " + " | ".join([*cells, _verdict_cell(summary)]) + " |")
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
    except (OSError, ValueError) as err:  # a missing dir, one run's dir, no finished job
        parser.exit(2, f"error: {err}\n")
    print(path.read_text())
    print(f"-> {path}")
    return path


if __name__ == "__main__":
    main()
