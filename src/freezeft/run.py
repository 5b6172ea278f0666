"""``python -m freezeft.run``: one Hydra-composed transfer-learning run.

Stages:

* ``stage=transfer`` (default): build the target corpus, load the source model
  (``transfer.source``: ``auto`` pretrains one once and caches it, a path loads a
  checkpoint, ``null`` trains from scratch), apply ``drop_source_layers``, train with the
  chosen strategy, test the best checkpoint of this run, write ``results.json``.
* ``stage=pretrain``: train and test a model on the source corpus (``source.data``).

In a multirun (``-m``), a job that fails writes ``failure.json`` and the sweep goes on;
``freezeft.report`` then summarises the sweep (see ``docs/sweeps.md``).
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
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig

import freezeft.conf  # noqa: F401  (registers the configs' resolvers)
from freezeft import task
from freezeft._lightning import MISCONFIGURATION_EXCEPTIONS
from freezeft.app.config import refuse_local_ddp, threads_per_job
from freezeft.app.train import train
from freezeft.checkpointing import run_dir_of
from freezeft.files import disk_full_message, write_text_atomic

__all__ = ["main"]

log = logging.getLogger(__name__)


def _is_user_error(err: BaseException) -> bool:
    """What a user can cause and fix gets one message, no traceback, exit code 1: an
    ``OSError`` (paths, permissions, a full disk), or a ``ValueError`` that freezeft raised
    about their data, config or checkpoint. Anything else is a bug and keeps its traceback.
    """
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__  # a config's object refused its arguments: judge that error
    if isinstance(err, (OSError, *MISCONFIGURATION_EXCEPTIONS)):  # Lightning's config errors
        return True
    if not isinstance(err, ValueError):
        return False
    frame = err.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and Path(frame.tb_frame.f_code.co_filename).is_relative_to(_PACKAGE)


_PACKAGE = Path(__file__).parent


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
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun:
        refuse_local_ddp(cfg, hydra_cfg.launcher._target_)
    threads = threads_per_job(cfg, hydra_cfg)
    if threads:
        torch.set_num_threads(threads)
    try:
        results = train(cfg, output_dir)
    except Exception as err:
        if not multirun:
            full = _disk_full(err, cfg, output_dir)
            if not (full or _is_user_error(err)) or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            log.error(full or f"{type(err).__name__}: {err}")  # the run's log keeps it too
            print(
                f"freezeft: error: {full or err}\n(HYDRA_FULL_ERROR=1 shows the traceback)",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(1) from None
        log.exception(f"Job {hydra_cfg.job.num} failed; the sweep goes on.")
        failure = {
            "job": hydra_cfg.job.num,
            "overrides": list(hydra_cfg.overrides.task),
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(),
        }
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(output_dir / "failure.json", json.dumps(failure, indent=2))
        except OSError as unwritten:  # a full disk: the sweep still goes on
            log.error(f"failure.json was not written: {unwritten}")
        print(f"freezeft: job {hydra_cfg.job.num} failed: {failure['error']}", flush=True)
        return math.nan
    print(
        f"freezeft {results['stage']}: strategy={results['strategy']} seed={results['seed']} "
        f"{results.get('headline', 'tested')} "
        f"({results['train_seconds']:.0f}s training) -> {results['run_dir']}/results.json",
        flush=True,
    )
    best = results.get(task.dev_key(results["monitor"]))  # the dev score
    return float(best) if best is not None else math.nan


if __name__ == "__main__":
    main()
