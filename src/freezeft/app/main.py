"""The Hydra app behind ``python -m freezeft.run``: one Hydra-composed transfer-learning run.

Stages:

* ``stage=transfer`` (default): build the target corpus, load the source model
  (``transfer.source``: ``auto`` pretrains one once and caches it, a path loads a
  checkpoint, ``null`` trains from scratch), apply ``drop_source_layers``, train with the
  chosen strategy, test the best checkpoint of this run, write ``results.json``.
* ``stage=pretrain``: train and test a model on the source corpus (``source.data``).
* ``stage=schedule``: print the model's layer groups and write a starter ``schedule.yaml``
  to edit and run with ``strategy=schedule strategy.path=FILE``.

In a multirun (``-m``), a job that fails writes ``failure.json`` and the sweep goes on;
``freezeft.app.report`` then summarises the sweep (see ``docs/sweeps.md``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import traceback
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import freezeft.conf  # noqa: F401  (registers the configs' resolvers)
from freezeft._lightning import pl
from freezeft.app import task
from freezeft.app.config import check_config, refuse_local_ddp, threads_per_job
from freezeft.app.console import quiet_console
from freezeft.app.errors import is_user_error, one_line
from freezeft.app.run_dir import run_dir_of
from freezeft.app.starter import write_starter_schedule
from freezeft.app.train import train
from freezeft.extras import missing_extra
from freezeft.files import EXIT_CTRL_C, EXIT_SIGTERM, disk_full_message, write_text_atomic

__all__ = ["main", "cli"]

log = logging.getLogger(__name__)

#: set by :func:`cli` (and inherited by the processes a run starts): "1" when the user
#: asked for tracebacks with HYDRA_FULL_ERROR=1
TRACEBACKS = "FREEZEFT_TRACEBACKS"

_is_user_error = is_user_error  # the name tests and older code use


def _wants_tracebacks() -> bool:
    return os.environ.get(TRACEBACKS, os.environ.get("HYDRA_FULL_ERROR", "0")) == "1"


def _to_run_log(message: str) -> None:
    """Write ``message`` into the run's ``run.log`` only (the console gets it once, on
    stderr, from the caller)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _disk_full(err: BaseException, cfg: DictConfig, output_dir: Path) -> str | None:
    """A full disk (``ENOSPC`` from anywhere: a results file, Lightning's CSV logger, a
    checkpoint, a cache) in one line with the folder, the file and how to go on."""
    full = disk_full_message(err, output_dir)
    if full is None:
        return None
    run_dir = run_dir_of(cfg.resume) if cfg.get("resume") else output_dir
    if any((run_dir / "checkpoints").glob("*.ckpt")):
        return f"{full}; free space and resume with resume={run_dir}"
    return f"{full}; free space and run the same command again"


def _lightning_logs_to_hydra() -> None:
    """Send Lightning's messages (and freezeft's, which speak through Lightning's rank-zero
    logger) to the handlers Hydra set up: the console and ``run.log``. Lightning imported
    before Hydra configured logging gave its loggers a console handler of their own and
    stopped them propagating, so they missed ``run.log`` and would print twice."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logger = logging.getLogger(name)
        if not logger.propagate:
            logger.handlers = [h for h in logger.handlers if type(h) is not logging.StreamHandler]
            logger.propagate = True


@hydra.main(version_base="1.3", config_path="pkg://freezeft.conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the best dev score of the model's ``monitor`` (the speech
    model's: dev CER), what a sweeper optimises; never a test score.

    In a multirun a failing job is logged to ``failure.json`` in its dir and returns NaN
    (Optuna counts the trial as failed), so the other jobs still run.
    """
    _lightning_logs_to_hydra()
    quiet_console()
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        logging.getLogger("freezeft").setLevel(logging.WARNING)  # DDP: rank 0 tells the run
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun:
        refuse_local_ddp(cfg, hydra_cfg.launcher._target_)
    threads = threads_per_job(cfg, hydra_cfg)
    if threads:
        torch.set_num_threads(threads)
    try:
        if cfg.stage == "schedule":  # the model's groups and a starter schedule, no training
            check_config(cfg)
            path = write_starter_schedule(cfg, output_dir)
            print(f"freezeft schedule: wrote a starter schedule to {path}", flush=True)
            return math.nan
        results = train(cfg, output_dir)
    except SystemExit as stop:
        if multirun and stop.code in (EXIT_CTRL_C, EXIT_SIGTERM):  # the sweep stops here
            sweep_dir = Path(hydra_cfg.sweep.dir)
            print(
                f"freezeft: the sweep was interrupted in job {hydra_cfg.job.num}; the jobs "
                f"after it did not run. `python -m freezeft.report {sweep_dir}` lists every "
                "job with its state and the command that resumes an interrupted one.",
                file=sys.stderr,
                flush=True,
            )
        raise
    except Exception as err:
        if not multirun:
            message = _disk_full(err, cfg, output_dir) or one_line(err)
            if message is None or _wants_tracebacks():
                raise
            _to_run_log(f"{message} (HYDRA_FULL_ERROR=1 shows the traceback)")
            print(f"freezeft: error: {message}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        _to_run_log(f"Job {hydra_cfg.job.num} failed; the sweep goes on.\n{traceback.format_exc()}")
        failure = {
            "job": hydra_cfg.job.num,
            "overrides": list(hydra_cfg.overrides.task),
            "error": one_line(err) or f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(),
        }
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(output_dir / "failure.json", json.dumps(failure, indent=2))
        except OSError as unwritten:  # a full disk: the sweep still goes on
            log.error(f"failure.json was not written: {unwritten}")
        print(
            f"freezeft: job {hydra_cfg.job.num} failed (the sweep goes on): {failure['error']}",
            file=sys.stderr,
            flush=True,
        )
        return math.nan
    strategy = f"strategy={results['strategy']} " if results.get("strategy") else ""
    if getattr(pl.utilities.rank_zero.rank_zero_only, "rank", 0) != 0:  # DDP: ranks > 0 are quiet
        best = results.get(task.dev_key(results["monitor"]))
        return float(best) if best is not None else math.nan
    print(
        f"freezeft {results['stage']}: {strategy}seed={results['seed']} "
        f"{results.get('headline', 'tested')} "
        f"({results['train_seconds']:.0f}s training) -> {results['run_dir']}/results.json",
        flush=True,
    )
    best = results.get(task.dev_key(results["monitor"]))  # the dev score
    return float(best) if best is not None else math.nan


#: overrides that need a plugin or a package an extra installs: (key, value prefix, module)
_NEEDS = [
    ("hydra/launcher", "joblib", "hydra_plugins.hydra_joblib_launcher"),
    ("hydra/launcher", "submitit", "hydra_plugins.hydra_submitit_launcher"),
    ("cluster", "slurm", "hydra_plugins.hydra_submitit_launcher"),
    ("hydra/sweeper", "optuna", "hydra_plugins.hydra_optuna_sweeper"),
    ("hparams_search", "", "hydra_plugins.hydra_optuna_sweeper"),
    ("logger", "tensorboard", "tensorboard"),
]


def _missing_plugin(argv: list[str]) -> str | None:
    """The one line for an override whose plugin or package is not installed, before
    anything is composed or written."""
    from importlib.util import find_spec

    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        for needs_key, prefix, module in _NEEDS:
            if key != needs_key or not value.startswith(prefix) or value == "null":
                continue
            try:
                found = find_spec(module) is not None
            except ModuleNotFoundError:  # its parent package is missing too
                found = False
            if not found:
                return missing_extra(ModuleNotFoundError(name=module))
    return None


def cli() -> None:
    """``python -m freezeft.run``: the Hydra app, every user error in one line on stderr
    with exit code 1 (``HYDRA_FULL_ERROR=1`` shows tracebacks)."""
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl+C: KeyboardInterrupt again
    message = _missing_plugin(sys.argv[1:])
    if message is None:
        os.environ.setdefault(TRACEBACKS, "1" if _wants_tracebacks() else "0")
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors; they are told here
        try:
            main()
            return
        except KeyboardInterrupt:  # before training (it stops training in its own words)
            print("freezeft: interrupted", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_CTRL_C) from None
        except Exception as err:
            message = None if _wants_tracebacks() else one_line(err)
            if message is None:
                raise
    print(f"freezeft: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)
