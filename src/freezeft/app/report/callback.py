"""The Hydra callback that writes the report at the end of every multirun."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from freezeft.app.report.cli import interrupted
from freezeft.app.report.jobs import FINISHED
from freezeft.app.report.sweep import collect
from freezeft.app.report.write import NothingFinished, write_report
from freezeft.files import Terminated, signals_raise

log = logging.getLogger(__name__)


class ReportCallback(Callback):
    """Hydra callback: write the report at the end of every multirun (``hydra/default.yaml``).

    A report that fails is one line (the jobs' results stay); Ctrl+C or SIGTERM while it is
    written is one line too, with the command that writes it, and the sweep exits with 130
    (Ctrl+C) or 143 (SIGTERM), leaving no temporary file and report.md as it was.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        with signals_raise():  # whatever the jobs' training left set: cleanup runs, then one line
            try:
                path = write_report(sweep_dir)
            except (KeyboardInterrupt, Terminated) as stop:
                raise interrupted(
                    stop, sweep_dir, f"write it with `python -m freezeft.report {sweep_dir}`"
                ) from None
            except NothingFinished as err:  # the jobs and their reasons are listed below
                log.error(f"No sweep report: {err.summary}")
                print(f"freezeft: no sweep report: {err.summary}", flush=True)
                path = None
            except Exception as err:  # the jobs' own results stay; say why there is no report
                log.error(f"No sweep report: {err}")
                print(f"freezeft: no sweep report: {err}", flush=True)
                path = None
        if path is not None:
            print(f"freezeft: sweep report -> {path}", flush=True)
        _exit_unless_every_job_finished(sweep_dir)


def _exit_unless_every_job_finished(sweep_dir: Path) -> None:
    """A sweep exits 0 only when every job it planned finished: otherwise each other job is
    listed with its one-line reason on stderr, and the process exits with code 1 (the
    report of the finished ones is written already)."""
    try:
        sweep = collect(sweep_dir)
    except Exception as err:  # no job dir at all, an unreadable sweep dir
        print(f"freezeft: the sweep's jobs cannot be read: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    others = [job for job in sweep.jobs if job.state != FINISHED]
    never = len(sweep.not_started)
    if not others and not never and sweep.jobs:
        return
    total = len(sweep.jobs) + never
    finished = total - len(others) - never
    print(
        f"freezeft: {total - finished} of the sweep's {total} jobs did not finish "
        f"({finished} finished); exit code 1:",
        file=sys.stderr,
        flush=True,
    )
    for job in others:
        print(f"  job {job.dir.name}: {job.state}: {job.detail}", file=sys.stderr, flush=True)
    if never:
        print(f"  {never} job(s) never started", file=sys.stderr, flush=True)
    raise SystemExit(1)
