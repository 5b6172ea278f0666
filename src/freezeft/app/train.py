"""Train and test one run (``train``), the function tests call in-process; the Hydra
main in :mod:`freezeft.run` wraps it."""

from __future__ import annotations

import importlib
import json
import logging
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from freezeft import machine
from freezeft._lightning import PACKAGE, SIGTERM_EXCEPTIONS, package_of, pl
from freezeft.app import task
from freezeft.app.build import RunParts, build_fit, build_run
from freezeft.app.config import (
    check_resume_config,
    lightning_targets,
    monitored,
    transfer_options,
)
from freezeft.app.metric_check import WatchedMetricsCheck
from freezeft.app.results import stop_before_results, strategy_label, write_json, write_skipped
from freezeft.app.run_dir import find_resume_checkpoint, hold_run_dir, run_dir_of
from freezeft.app.source import pretrained_source, source_checkpoint_path
from freezeft.callbacks.schedule_log import ScheduleLog
from freezeft.checkpoint_io import (
    AtomicCheckpointIO,
    check_checkpoint_fits,
    read_checkpoint_file,
)
from freezeft.divergence import Diverged, DivergenceCheck
from freezeft.history import History
from freezeft.interrupt import INTERRUPTED_CHECKPOINT, InterruptCheckpoint, set_rng_states

__all__ = ["train", "fit_and_test"]

log = logging.getLogger(__name__)


def fit_and_test(
    cfg: DictConfig,
    data: Any,
    output_dir: Path,
    *,
    max_epochs: int,
    source: str | Path | None = None,
    with_strategies: bool = True,
    resume_from: Path | None = None,
    resumable: bool = True,
    parts: RunParts | None = None,
) -> dict[str, Any]:
    """Train the task's model on ``data`` and test its best checkpoint; returns the results.

    ``parts``: the objects :func:`~freezeft.app.build.build_run` built and checked (else
    they are built here from ``data``, a data config or a built data object, and ``cfg``).
    ``resume_from``: a checkpoint of this run (in ``output_dir``) to continue from.
    On SIGINT/SIGTERM a resumable checkpoint is written and the process exits with 130
    (Ctrl+C) or 143 (SIGTERM).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    if parts is None:
        parts = build_fit(cfg, data, with_strategies=with_strategies)
    datamodule, module = parts.data, parts.model
    if hasattr(datamodule, "prepare_data"):
        datamodule.prepare_data()
    pl.seed_everything(cfg.seed, workers=True)  # the seed DataLoader workers derive theirs from
    set_rng_states(parts.rng)  # the RNGs as just after the model was built, whatever ran since
    package = package_of(module)

    if resume_from is not None:  # a checkpoint of another model size: one line, not
        check_checkpoint_fits(module, resume_from)  # Lightning's size-mismatch traceback
    options = transfer_options(cfg)
    if source is not None and resume_from is None:  # a resumed run has its weights already
        report = task.transfer(module, Path(source), options)
        report.to_json(output_dir / "transfer.json")
        log.info(report.summary())

    def build(node: Any, **kwargs: Any) -> Any:  # Lightning's classes of the module's package
        return instantiate(lightning_targets(node, package), **kwargs, _convert_="all")

    callbacks = [build(c) for c in cfg.callbacks.values() if c]
    callbacks += list(parts.strategies.values())
    monitor, monitor_mode = monitored(cfg)
    lightning = importlib.import_module(package)
    checkpoint = lightning.callbacks.ModelCheckpoint(
        dirpath=output_dir / "checkpoints",
        # the monitored value in the name, unless its name would make a folder (val/acc)
        filename=f"epoch={{epoch}}-{monitor}={{{monitor}:.4f}}" if "/" not in monitor else None,
        auto_insert_metric_name=False,
        monitor=monitor,
        mode=monitor_mode,
    )
    # last.ckpt at every epoch end, improved or not: a killed run loses at most one epoch
    last = lightning.callbacks.ModelCheckpoint(
        dirpath=output_dir / "checkpoints", filename="last", enable_version_counter=False
    )
    logger = False
    if cfg.logger:
        logger = build(cfg.logger, save_dir=str(output_dir))
    interrupt = InterruptCheckpoint(output_dir / "checkpoints")
    # atomic checkpoint writes, where the module's Lightning is the one freezeft imports
    plugins = [AtomicCheckpointIO()] if package == PACKAGE else []
    trainer = build(
        cfg.trainer,
        max_epochs=max_epochs,
        callbacks=[
            *callbacks,
            History(output_dir),
            ScheduleLog(output_dir / "schedule.yaml"),
            DivergenceCheck(),
            WatchedMetricsCheck(monitor),  # before any epoch is spent on an unlogged metric
            checkpoint,
            last,
            interrupt,
        ],
        logger=logger,
        default_root_dir=str(output_dir),
        plugins=plugins,
    )
    start = time.perf_counter()
    try:
        # weights only: a checkpoint never runs code (freezeft's own need nothing more)
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    except Diverged as err:
        if trainer.is_global_zero:
            _write_diverged(cfg, output_dir, err, with_strategies=with_strategies)
        raise
    except SIGTERM_EXCEPTIONS:
        if resumable:
            print(
                f"freezeft: interrupted; resumable checkpoint: {interrupt.saved or 'none'}. "
                f"Continue with the same overrides and resume={output_dir}",
                flush=True,
            )
        else:  # pretraining into a cache entry, which is discarded unfinished
            print("freezeft: interrupted while pretraining; nothing was cached.", flush=True)
        raise SystemExit(interrupt.exit_code) from None
    # a resumed run counts the seconds its earlier processes trained, too
    train_seconds = time.perf_counter() - start + interrupt.seconds_before
    if trainer.received_sigterm:  # it came with training's last batch: training is complete
        stop_before_results(output_dir, interrupt.exit_code)
    if resume_from is not None and Path(resume_from).name == INTERRUPTED_CHECKPOINT:
        Path(resume_from).unlink(missing_ok=True)  # done with; last.ckpt is newer
    skipped = task.skipped(datamodule, module)
    if trainer.is_global_zero:
        write_skipped(skipped, output_dir)
    # what trained in the last epoch (strategies log it; they leave every flag as it was)
    logged = trainer.callback_metrics.get("trainable_params")
    trainable = (
        int(logged)
        if logged is not None
        else sum(p.numel() for p in module.parameters() if p.requires_grad)
    )
    best = _this_runs_best(checkpoint, output_dir)
    # read as weights only first: a file that would run code is refused in freezeft's words
    best_epoch = read_checkpoint_file(best)["epoch"] if best else None
    log.info(
        f"Testing the best checkpoint, checkpoints/{Path(best).name} (epoch {best_epoch})"
        if best
        else "Testing the last weights (no best checkpoint was saved)"
    )
    try:
        (test_metrics,) = trainer.test(  # not verbose: the run's last line has the results
            module, datamodule=datamodule, ckpt_path=best or None, weights_only=True, verbose=False
        )
    except SIGTERM_EXCEPTIONS:
        stop_before_results(output_dir, interrupt.exit_code)
    if trainer.received_sigterm:  # Lightning finishes the last test batch regardless
        stop_before_results(output_dir, interrupt.exit_code)
    before = len(skipped)
    skipped = task.skipped(datamodule, module)  # with test files that failed to decode
    if trainer.is_global_zero and len(skipped) > before:
        write_skipped(skipped, output_dir)

    tested = task.test_results(module, test_metrics)
    results = {
        **tested,
        "status": "finished",
        "strategy": strategy_label(cfg) if with_strategies else None,
        "seed": cfg.seed,
        "epochs": trainer.current_epoch,
        "best_epoch": best_epoch,
        "train_seconds": round(train_seconds, 2),
        "trainable_params": trainable,
        "total_params": sum(p.numel() for p in module.parameters()),
        "monitor": monitor,
        "monitor_mode": monitor_mode,
        task.dev_key(monitor): (
            float(checkpoint.best_model_score)
            if best and checkpoint.best_model_score is not None
            else None
        ),
        "report": task.report_spec(module, monitor, monitor_mode, tested),
        "source": str(source) if source is not None else None,
        "transfer": options if source is not None else None,
        "best_checkpoint": best,
        "skipped_rows": dict(Counter(row.kind for _, row in skipped)),
        "resumed_from": str(resume_from) if resume_from is not None else None,
        "run_dir": str(output_dir),
        "budget": {
            "max_epochs": max_epochs,
            "protocol": cfg.get("protocol"),  # fixed budget or to convergence
            **task.describe(datamodule, module),  # what the data and model say of themselves
            "source_epochs": (
                cfg.source.max_epochs
                if source is not None and cfg.transfer.get("source") == "auto"
                else None
            ),
        },
        "machine": machine.describe(),
    }
    if trainer.is_global_zero:
        write_json(output_dir / "results.json", results)
    return results


def _write_diverged(
    cfg: DictConfig, output_dir: Path, err: Diverged, *, with_strategies: bool = True
) -> None:
    """``results.json`` of a run that diverged: where, and what it was; no metrics."""
    monitor, monitor_mode = monitored(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        output_dir / "results.json",
        {
            "status": "diverged",
            "diverged": err.details,
            "stage": cfg.stage,
            "strategy": strategy_label(cfg) if with_strategies else None,
            "seed": cfg.seed,
            "monitor": monitor,
            "monitor_mode": monitor_mode,
            "run_dir": str(output_dir),
            "budget": {"max_epochs": cfg.trainer.max_epochs, "protocol": cfg.get("protocol")},
        },
    )


def _refuse_resuming_a_diverged_run(target: Path) -> None:
    results = run_dir_of(target) / "results.json"
    try:
        diverged = json.loads(results.read_text()).get("status") == "diverged"
    except (OSError, ValueError):
        return
    if diverged:
        raise ValueError(
            f"resume={target}: that run diverged ({results} says so and why); its "
            "checkpoints hold a model from before the divergence at best, and resuming "
            "would diverge again. Start a new run with a lower learning rate (or warmup, "
            "or gradient clipping)."
        )


def _this_runs_best(checkpoint: Any, output_dir: Path) -> str | None:
    """The best checkpoint ``checkpoint`` (the monitored ModelCheckpoint) recorded, which
    must be a file of this run dir: a run tests its own best model, never another dir's."""
    best = checkpoint.best_model_path or None
    if best is None:
        return None
    folder = (output_dir / "checkpoints").resolve()
    if not Path(best).resolve().is_relative_to(folder) or not Path(best).is_file():
        raise ValueError(
            f"The best checkpoint recorded for {output_dir} is {best}, which is not a file in "
            f"{folder}; testing it would test another run's model. Resume the run dir that "
            "holds it, or start this run again."
        )
    return best


def train(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Run the configured stage into ``output_dir``; returns the results.

    The run dir it trains into (``output_dir``, or the one ``resume=`` names) is held for
    the run's life (:func:`~freezeft.app.run_dir.hold_run_dir`): a second resume of it,
    or a second run into it, is refused while this one trains.
    """
    parts = build_run(cfg)
    with ExitStack() as held:
        resume_from = None
        started = cfg  # the config the run started with: it names the source
        if cfg.get("resume"):
            _refuse_resuming_a_diverged_run(Path(cfg.resume))
            run_dir = run_dir_of(cfg.resume)
            if (run_dir / ".hydra" / "config.yaml").is_file():  # before picking its newest
                held.enter_context(hold_run_dir(run_dir, resume=str(cfg.resume)))
            output_dir, resume_from = find_resume_checkpoint(cfg.resume)
            started = check_resume_config(cfg, output_dir)
            log.info(f"Resuming {output_dir} from {resume_from}")
        else:
            held.enter_context(hold_run_dir(output_dir))
        return _train(cfg, output_dir, started, resume_from, parts)


def _train(
    cfg: DictConfig,
    output_dir: Path,
    started: DictConfig,
    resume_from: Path | None,
    parts: RunParts,
) -> dict[str, Any]:
    pretrain = cfg.stage == "pretrain"
    source = None
    if not pretrain and not cfg.strategy.get("from_scratch"):
        source = started.transfer.source
        if source == "auto" and resume_from is not None:  # its weights are in the checkpoint
            source = source_checkpoint_path(started)
        elif source == "auto":
            try:
                source = pretrained_source(cfg, fit_and_test, source_data=parts.source_data)
            except Diverged as err:  # its results.json went with the unfinished cache entry
                details = {**err.details, "during": "while pretraining the source model "
                           "(transfer.source=auto, on source.data)"}  # fmt: skip
                diverged = Diverged(details)
                _write_diverged(cfg, output_dir, diverged)
                raise diverged from None
    results = fit_and_test(
        cfg,
        cfg.source.data if pretrain else cfg.data,
        output_dir,
        max_epochs=cfg.source.max_epochs if pretrain else cfg.trainer.max_epochs,
        source=source,
        with_strategies=not pretrain,
        resume_from=resume_from,
        parts=parts,
    )
    results["stage"] = cfg.stage
    return results
