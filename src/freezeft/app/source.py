"""``transfer.source=auto``: a source model pretrained once per settings, then cached."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from freezeft.app.config import _plain
from freezeft.app.results import write_json
from freezeft.cache import cached_entry, config_key, default_cache_dir

__all__ = ["pretrained_source"]

log = logging.getLogger(__name__)

#: Bump when pretraining would give another model for the same settings.
PRETRAIN_VERSION = 2


def _source_settings(cfg: DictConfig) -> dict[str, Any]:
    data = _plain(cfg.source.data)
    data.pop("num_workers", None)
    if isinstance(data.get("corpus"), dict):
        data["corpus"].pop("cache_dir", None)
    model = _plain(cfg.model)
    for key in cfg.source.get("model") or {}:  # what pretraining sets for itself
        model.pop(key, None)
    return {
        "data": data,
        "model": model,
        "max_epochs": cfg.source.max_epochs,
        "seed": cfg.source.seed,
        "version": PRETRAIN_VERSION,
    }


def pretrained_source(cfg: DictConfig, fit_and_test: Callable[..., dict[str, Any]]) -> Path:
    """The source checkpoint for ``transfer.source=auto``: pretrained once, then cached.

    Keyed by the source data, model and pretraining budget, not by the run's own seed
    (``${seed}`` in the source data resolves to ``source.seed``): every job of a sweep
    over seeds shares one source model, and parallel jobs wait for the one that trains it.
    ``fit_and_test`` is :func:`freezeft.app.train.fit_and_test` (passed in: it calls this).
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
        for key, value in (cfg.source.get("model") or {}).items():  # e.g. the speech task's
            OmegaConf.update(source_cfg, f"model.{key}", value)  # greedy decoder
        OmegaConf.update(source_cfg, "trainer.strategy", "auto", force_add=True)
        results = fit_and_test(
            source_cfg,
            source_cfg.source.data,
            folder / "run",
            max_epochs=cfg.source.max_epochs,
            with_strategies=False,
            resumable=False,
        )
        shutil.copy(results["best_checkpoint"], folder / "source.ckpt")
        write_json(folder / "results.json", results)
        shutil.rmtree(folder / "run" / "checkpoints")
        log.info(f"Source model: {results.get('headline', 'tested')}")

    return cached_entry(entry, build, settings) / "source.ckpt"
