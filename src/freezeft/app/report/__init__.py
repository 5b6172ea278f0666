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

A damaged file is never a crash or a hang: a ``results.json`` that is a FIFO, a link to
``/dev/zero``, over 16 MiB or nested thousands of levels deep is named with why, like one
that is not JSON; values whose squares overflow a float are summarised (a statistic that
is itself beyond the float range shows as ``n/a``). What the jobs' files say (strategy
names, overrides, errors, paths) is escaped in ``report.md`` so it cannot change its
layout; ``report.csv`` keeps it exactly. Ctrl+C or SIGTERM while the report is written is
one line (exit code 130 or 143), leaves no temporary file and the previous report.md.

One idea per module: :mod:`~freezeft.app.report.markdown` (escaping for report.md),
:mod:`~freezeft.app.report.jobs` (one job dir and what became of it),
:mod:`~freezeft.app.report.sweep` (:func:`collect`: every job of a sweep),
:mod:`~freezeft.app.report.rows` (rows, ranking, :func:`summarise`),
:mod:`~freezeft.app.report.verdict` (the winner rule and its wording),
:mod:`~freezeft.app.report.welch` (:func:`welch_p`), :mod:`~freezeft.app.report.plots`,
:mod:`~freezeft.app.report.write` (:func:`write_report`: report.md, report.csv, the plots),
:mod:`~freezeft.app.report.callback` (:class:`ReportCallback`) and
:mod:`~freezeft.app.report.cli` (:func:`main`).
"""

from __future__ import annotations

from freezeft.app.report.callback import ReportCallback
from freezeft.app.report.cli import main as main  # the command line; not in __all__, as before
from freezeft.app.report.jobs import Job, Run
from freezeft.app.report.rows import StrategySummary, ranking, summarise
from freezeft.app.report.sweep import Sweep, collect
from freezeft.app.report.welch import welch_p
from freezeft.app.report.write import write_report

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
