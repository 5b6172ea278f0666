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

import csv
import json
import logging
import math
import os
import shutil
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException

from freezeft import machine
from freezeft.cache import cached_entry, config_key, default_cache_dir
from freezeft.checkpointing import (
    INTERRUPTED_CHECKPOINT,
    AtomicCheckpointIO,
    InterruptCheckpoint,
    find_resume_checkpoint,
)
from freezeft.history import History
from freezeft.speech.transfer import transfer_weights

if TYPE_CHECKING:
    from freezeft.speech.dataset import Skipped

__all__ = ["main", "run", "pretrained_source", "refuse_local_ddp"]

log = logging.getLogger(__name__)

#: Bump when pretraining would give another model for the same settings.
PRETRAIN_VERSION = 2


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def fit_and_test(
    cfg: DictConfig,
    data_cfg: DictConfig,
    output_dir: Path,
    *,
    max_epochs: int,
    source: str | Path | None = None,
    strategy: bool = True,
    resume_from: Path | None = None,
    resumable: bool = True,
) -> dict[str, Any]:
    """Train a speech model on ``data_cfg`` and test its best checkpoint; returns the results.

    ``resume_from``: a checkpoint of this run (in ``output_dir``) to continue from.
    On SIGINT/SIGTERM a resumable checkpoint is written and the process exits with 143.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(data_cfg, _convert_="all")
    datamodule.prepare_data()
    module = instantiate(cfg.model, labels=datamodule.alphabet.labels, _convert_="all")

    report = None
    if source is not None and resume_from is None:  # a resumed run has its weights already
        report = transfer_weights(module, source, cfg.transfer.drop_source_layers)
        report.to_json(output_dir / "transfer.json")
        log.info(report.summary())

    callbacks = [instantiate(c, _convert_="all") for c in cfg.callbacks.values() if c]
    if strategy:
        chosen = {**cfg.strategy.callbacks, **cfg.strategy.get("addons", {})}
        callbacks += [instantiate(c, _convert_="all") for c in chosen.values() if c]
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=output_dir / "checkpoints",
        filename="epoch={epoch}-val_cer={val_cer:.4f}",
        auto_insert_metric_name=False,
        monitor="val_cer",
        mode="min",
    )
    # last.ckpt at every epoch end, improved or not: a killed run loses at most one epoch
    last = pl.callbacks.ModelCheckpoint(
        dirpath=output_dir / "checkpoints", filename="last", enable_version_counter=False
    )
    logger = False
    if cfg.logger:
        logger = instantiate(cfg.logger, save_dir=str(output_dir), _convert_="all")
    interrupt = InterruptCheckpoint(output_dir / "checkpoints")
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        max_epochs=max_epochs,
        callbacks=[*callbacks, History(output_dir), checkpoint, last, interrupt],
        logger=logger,
        default_root_dir=str(output_dir),
        plugins=[AtomicCheckpointIO()],
        _convert_="all",
    )
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    except SIGTERMException:
        if resumable:
            print(
                f"freezeft: interrupted; resumable checkpoint: {interrupt.saved or 'none'}. "
                f"Continue with the same overrides and resume={output_dir}",
                flush=True,
            )
        else:  # pretraining into a cache entry, which is discarded unfinished
            print("freezeft: interrupted while pretraining; nothing was cached.", flush=True)
        raise SystemExit(143) from None
    train_seconds = time.perf_counter() - start
    if trainer.received_sigterm:  # it came with training's last batch: training is complete
        _stop_before_results(output_dir)
    if resume_from is not None and Path(resume_from).name == INTERRUPTED_CHECKPOINT:
        Path(resume_from).unlink(missing_ok=True)  # done with; last.ckpt is newer
    if trainer.is_global_zero:
        _write_skipped(datamodule.skipped_rows() + module.unreadable, output_dir)
    # what trained in the last epoch (strategies log it; they leave every flag as it was)
    logged = trainer.callback_metrics.get("trainable_params")
    trainable = (
        int(logged)
        if logged is not None
        else sum(p.numel() for p in module.parameters() if p.requires_grad)
    )
    best = checkpoint.best_model_path or None
    try:
        (test_metrics,) = trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
    except SIGTERMException:
        _stop_before_results(output_dir)
    if trainer.received_sigterm:  # Lightning finishes the last test batch regardless
        _stop_before_results(output_dir)
    best_epoch = torch.load(best, map_location="cpu", weights_only=False)["epoch"] if best else None
    skipped = datamodule.skipped_rows() + module.unreadable  # with test files that failed
    if trainer.is_global_zero and module.unreadable:
        _write_skipped(skipped, output_dir)

    results = {
        "wer": test_metrics["test_wer"],
        "cer": test_metrics["test_cer"],
        "loss": test_metrics["test_loss"],
        "strategy": strategy_label(cfg) if strategy else None,
        "seed": cfg.seed,
        "epochs": trainer.current_epoch,
        "best_epoch": best_epoch,
        "train_seconds": round(train_seconds, 2),
        "trainable_params": trainable,
        "total_params": sum(p.numel() for p in module.parameters()),
        "dev_cer": float(checkpoint.best_model_score) if best else None,
        "language": getattr(datamodule.corpus, "language", None),
        "source": str(source) if source is not None else None,
        "drop_source_layers": cfg.transfer.drop_source_layers if source is not None else None,
        "best_checkpoint": best,
        "samples": module.test_samples[:1] + module.test_samples[-1:],
        "skipped_rows": dict(Counter(row.kind for _, row in skipped)),
        "skipped_batches": module.skipped_batches,
        "resumed_from": str(resume_from) if resume_from is not None else None,
        "run_dir": str(output_dir),
        "budget": {
            "max_epochs": max_epochs,
            "train_utterances": len(datamodule.dataset("train")),
            "batch_size": datamodule.batch_size,
            "n_hidden": cfg.model.get("n_hidden"),
            "source_epochs": cfg.source.max_epochs if source is not None else None,
        },
        "machine": machine.describe(),
    }
    if trainer.is_global_zero:
        write_json(output_dir / "results.json", results)
    return results


def _stop_before_results(output_dir: Path) -> None:
    """SIGINT/SIGTERM after training finished: say how to get the results, exit 143."""
    print(
        "freezeft: interrupted before the results were written; training had finished and "
        f"its checkpoints are in {output_dir / 'checkpoints'}. Run the same command with "
        f"resume={output_dir} to test again and write results.json.",
        flush=True,
    )
    raise SystemExit(143) from None


def _standard_json(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by ``None`` and, beside it in its dict,
    ``<key>_not_finite``: ``"nan"``, ``"inf"`` or ``"-inf"`` (JSON has no such numbers)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if isinstance(item, float) and not math.isfinite(item):
                out[key], out[f"{key}_not_finite"] = None, str(item)
            else:
                out[key] = _standard_json(item)
        return out
    if isinstance(value, (list, tuple)):
        return [None if isinstance(v, float) and not math.isfinite(v) else _standard_json(v)
                for v in value]  # fmt: skip
    return value


def write_json(path: Path, results: dict[str, Any]) -> None:
    """Write ``results`` as standard JSON (non-finite numbers as ``null``, see above)."""
    text = json.dumps(_standard_json(results), indent=2, ensure_ascii=False, allow_nan=False)
    path.write_text(text)


def _write_skipped(rows: list[tuple[str, Skipped]], output_dir: Path) -> None:
    """``skipped_samples.csv``: every row the data left out and why, with a summary."""
    if not rows:
        return
    with open(output_dir / "skipped_samples.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["split", "row", "wav_filename", "problem", "detail"])
        writer.writerows([split, r.source, r.path, r.kind, r.detail] for split, r in rows)
    kinds = Counter(row.kind for _, row in rows)
    log.warning(
        f"Skipped {len(rows)} rows ({', '.join(f'{n} {k}' for k, n in kinds.most_common())}); "
        f"each one with its reason: {output_dir / 'skipped_samples.csv'}"
    )


#: Config sections a resumed run must share with the run it continues.
RESUME_MUST_MATCH = ("stage", "seed", "model", "data", "strategy", "transfer", "source")


def _check_resume_config(cfg: DictConfig, run_dir: Path) -> None:
    saved_path = run_dir / ".hydra" / "config.yaml"
    if not saved_path.exists():
        log.warning(f"{run_dir} has no .hydra/config.yaml; cannot check the resumed config.")
        return
    saved = OmegaConf.load(saved_path)
    differences = []
    for section in RESUME_MUST_MATCH:
        before, now = _flat(_plain(saved.get(section))), _flat(_plain(cfg.get(section)))
        for key in sorted(set(before) | set(now)):
            if before.get(key) != now.get(key):
                differences.append(
                    f"{section}{key}: {before.get(key)!r} then, {now.get(key)!r} now"
                )
    if differences:
        raise ValueError(
            f"resume={cfg.resume}: the config differs from the run being resumed "
            f"({saved_path}): "
            + "; ".join(differences[:8])
            + ". Resume with the same overrides as the original run."
        )


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            if key in ("cache_dir", "num_workers"):  # where and how fast, not what
                continue
            flat.update(_flat(value, f"{prefix}.{key}"))
        return flat
    return {prefix: node}


def strategy_label(cfg: DictConfig) -> str:
    """The strategy's name, with any add-ons: ``freeze_then_finetune+warmup``."""
    return "+".join([cfg.strategy.name, *cfg.strategy.get("addons", {}).keys()])


def _source_settings(cfg: DictConfig) -> dict[str, Any]:
    data = _plain(cfg.source.data)
    data.pop("num_workers", None)
    if isinstance(data.get("corpus"), dict):
        data["corpus"].pop("cache_dir", None)
    return {
        "data": data,
        "model": _plain(cfg.model),
        "max_epochs": cfg.source.max_epochs,
        "seed": cfg.source.seed,
        "version": PRETRAIN_VERSION,
    }


def pretrained_source(cfg: DictConfig) -> Path:
    """The source checkpoint for ``transfer.source=auto``: pretrained once, then cached.

    Keyed by the source data, model and pretraining budget, not by the run's own seed
    (``${seed}`` in the source data resolves to ``source.seed``): every job of a sweep
    over seeds shares one source model, and parallel jobs wait for the one that trains it.
    """
    source_cfg = cfg.copy()
    OmegaConf.update(source_cfg, "seed", cfg.source.seed)
    settings = _source_settings(source_cfg)
    root = Path(cfg.paths.cache_dir) if cfg.paths.cache_dir else default_cache_dir()
    entry = root / "source" / config_key(settings)

    def build(folder: Path) -> None:
        log.info(f"Pretraining the source model into {entry} (one-time, cached)...")
        # One process pretrains while the others wait on the cache lock, so it must not
        # start a multi-process strategy (DDP ranks would wait for each other forever).
        OmegaConf.update(source_cfg, "trainer.devices", 1)
        OmegaConf.update(source_cfg, "trainer.strategy", "auto", force_add=True)
        results = fit_and_test(
            source_cfg,
            source_cfg.source.data,
            folder / "run",
            max_epochs=cfg.source.max_epochs,
            strategy=False,
            resumable=False,
        )
        shutil.copy(results["best_checkpoint"], folder / "source.ckpt")
        write_json(folder / "results.json", results)
        shutil.rmtree(folder / "run" / "checkpoints")
        log.info(f"Source model: test WER {results['wer']:.4f}, CER {results['cer']:.4f}")

    return cached_entry(entry, build, settings) / "source.ckpt"


#: Keys checked before any work starts: (allowed types, test, what is allowed).
CHECKS: dict[str, tuple[tuple[type, ...], Any, str]] = {
    "stage": ((str,), lambda v: v in ("transfer", "pretrain"), "'transfer' or 'pretrain'"),
    "seed": ((int,), lambda v: v >= 0, "an integer >= 0"),
    "cpu_threads": ((int, type(None)), lambda v: v is None or v >= 1, "null or an integer >= 1"),
    "trainer.max_epochs": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "source.max_epochs": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "transfer.drop_source_layers": ((int,), lambda v: 0 <= v <= 5, "an integer in 0..5"),
    "data.batch_size": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "model.n_hidden": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "data.on_bad_sample": ((str,), lambda v: v in ("skip", "error"), "'skip' or 'error'"),
    "data.num_workers": (
        (int, str),
        lambda v: v == "auto" or (isinstance(v, int) and v >= 0),
        "'auto' or an integer >= 0",
    ),  # fmt: skip
}


def check_config(cfg: DictConfig) -> None:
    """Fail before any work on a value of the wrong type or out of range, naming the key.

    Also builds the strategy's callbacks, whose own checks name their arguments.
    """
    problems = []
    for key, (types, test, allowed) in CHECKS.items():
        value = OmegaConf.select(cfg, key, default="<absent>")
        if value == "<absent>":
            continue
        ok = isinstance(value, types) and not isinstance(value, bool) and test(value)
        if not ok:
            problems.append(f"`{key}={value!r}`: expected {allowed}")
    if problems:
        raise ValueError("Invalid config value(s): " + "; ".join(problems) + ".")
    chosen = {**cfg.strategy.callbacks, **cfg.strategy.get("addons", {})}
    targets = [
        c._target_
        for part in (cfg.strategy.callbacks, cfg.strategy.get("addons", {}))
        for c in part.values()
        if c
    ]
    twice = sorted({t.rsplit(".", 1)[-1] for t in targets if targets.count(t) > 1})
    if twice:
        raise ValueError(
            f"The strategy and its add-ons include {', '.join(twice)} twice (an add-on that "
            f"the chosen `strategy` already has, e.g. strategy=warmup addons=[warmup]); drop "
            "it from `addons`."
        )
    for callback in chosen.values():
        if callback:
            instantiate(callback, _convert_="all")


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Run the configured stage into ``output_dir``; returns the results."""
    check_config(cfg)
    resume_from = None
    if cfg.get("resume"):
        output_dir, resume_from = find_resume_checkpoint(cfg.resume)
        _check_resume_config(cfg, output_dir)
        log.info(f"Resuming {output_dir} from {resume_from}")
    if cfg.stage == "pretrain":
        results = fit_and_test(
            cfg,
            cfg.source.data,
            output_dir,
            max_epochs=cfg.source.max_epochs,
            strategy=False,
            resume_from=resume_from,
        )
        results["stage"] = "pretrain"
        return results
    source = None if cfg.strategy.get("from_scratch") else cfg.transfer.source
    if source == "auto":
        source = pretrained_source(cfg)
    results = fit_and_test(
        cfg,
        cfg.data,
        output_dir,
        max_epochs=cfg.trainer.max_epochs,
        source=source,
        resume_from=resume_from,
    )
    results["stage"] = "transfer"
    return results


def refuse_local_ddp(cfg: DictConfig, launcher: str) -> None:
    """Refuse a multi-process trainer in a sweep whose jobs all run on this machine.

    Lightning starts DDP ranks by re-running the command line, which in a multirun would
    start the whole sweep again in every rank. A cluster launcher (submitit) gives each
    rank its own task instead.
    """
    strategy = str(cfg.trainer.get("strategy", "auto"))
    devices = cfg.trainer.get("devices", 1)
    several = "ddp" in strategy or (isinstance(devices, int) and devices > 1)
    if several and "submitit" not in launcher:
        raise ValueError(
            f"`trainer.strategy={strategy}` with `trainer.devices={devices}` cannot run in a "
            f"local multirun (launcher {launcher.rsplit('.', 1)[-1]}): Lightning starts DDP "
            "ranks by re-running the command line, which would start the sweep again in "
            "every rank. Sweep single-device jobs (trainer=cpu or trainer=gpu, in parallel "
            "with hydra/launcher=joblib), run the DDP job on its own without -m, or sweep "
            "on a cluster with hydra/launcher=submitit_slurm (one task per device; see "
            "docs/sweeps.md)."
        )


def _threads_per_job(cfg: DictConfig, hydra_cfg: Any) -> int | None:
    """``cpu_threads``, or the machine's cores shared among a joblib launcher's jobs."""
    if cfg.get("cpu_threads"):
        return int(cfg.cpu_threads)
    if "joblib" not in hydra_cfg.launcher._target_:
        return None
    cores = machine.usable_cores()
    n_jobs = int(hydra_cfg.launcher.get("n_jobs") or -1)
    parallel = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib's -1: all cores
    return max(1, cores // parallel)


# conf/hydra/default.yaml names run dirs with the process id: two runs started in the same
# second never share one.
OmegaConf.register_new_resolver("freezeft.pid", lambda: str(os.getpid()), replace=True)


def _is_user_error(err: BaseException) -> bool:
    """What a user can cause and fix gets one message, no traceback, exit code 1: an
    ``OSError`` (paths, permissions, a full disk), or a ``ValueError`` that freezeft raised
    about their data, config or checkpoint. Anything else is a bug and keeps its traceback.
    """
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__  # a config's object refused its arguments: judge that error
    if isinstance(err, (OSError, MisconfigurationException)):  # Lightning's config errors
        return True
    if not isinstance(err, ValueError):
        return False
    frame = err.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and Path(frame.tb_frame.f_code.co_filename).is_relative_to(_PACKAGE)


_PACKAGE = Path(__file__).parent


@hydra.main(version_base="1.3", config_path="pkg://freezeft.conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the best dev CER (what a sweeper minimises, never test).

    In a multirun a failing job is logged to ``failure.json`` in its dir and returns NaN
    (Optuna counts the trial as failed), so the other jobs still run.
    """
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun:
        refuse_local_ddp(cfg, hydra_cfg.launcher._target_)
    threads = _threads_per_job(cfg, hydra_cfg)
    if threads:
        torch.set_num_threads(threads)
    try:
        results = run(cfg, output_dir)
    except Exception as err:
        if not multirun:
            if not _is_user_error(err) or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            log.error(f"{type(err).__name__}: {err}")  # the run's log keeps it too
            print(
                f"freezeft: error: {err}\n(HYDRA_FULL_ERROR=1 shows the traceback)",
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
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "failure.json").write_text(json.dumps(failure, indent=2))
        print(f"freezeft: job {hydra_cfg.job.num} failed: {failure['error']}", flush=True)
        return math.nan
    print(
        f"freezeft {results['stage']}: strategy={results['strategy']} seed={results['seed']} "
        f"test WER {results['wer']:.4f} CER {results['cer']:.4f} "
        f"({results['train_seconds']:.0f}s training) -> {results['run_dir']}/results.json",
        flush=True,
    )
    return float(results["dev_cer"]) if results["dev_cer"] is not None else math.nan


if __name__ == "__main__":
    main()
