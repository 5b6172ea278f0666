"""``transfer.source=auto``: a source model pretrained once per settings, then cached."""

from __future__ import annotations

import logging
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from freezeft.app.config import _plain
from freezeft.app.release import matching_release
from freezeft.app.results import write_json
from freezeft.cache import cached_entry, config_key, default_cache_dir

__all__ = ["pretrained_source", "source_checkpoint_path", "source_config", "source_settings"]

log = logging.getLogger(__name__)

#: Bump when pretraining would give another model for the same settings.
PRETRAIN_VERSION = 3  # 3: per-utterance decibel floor in the speech features (issue 33)


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


def _entry(cfg: DictConfig) -> tuple[Path, DictConfig, dict[str, Any]]:
    """The cache entry of ``cfg``'s source model, the config that pretrains it, its key."""
    source_cfg = cfg.copy()
    OmegaConf.update(source_cfg, "seed", cfg.source.seed)
    settings = _source_settings(source_cfg)
    root = Path(cfg.paths.cache_dir) if cfg.paths.cache_dir else default_cache_dir()
    return root / "source" / config_key(settings), source_cfg, settings


def source_settings(cfg: DictConfig) -> dict[str, Any]:
    """What ``cfg``'s source model is pretrained with: the key of its cache entry, and what
    a released source model must have been made with to stand in for it."""
    return _entry(cfg)[2]


def source_checkpoint_path(cfg: DictConfig) -> Path:
    """Where ``transfer.source=auto`` keeps ``cfg``'s source checkpoint, built or not (a
    resumed run names the source it started from without pretraining it again): the
    released one where it matches, else the cache entry's."""
    entry, _, settings = _entry(cfg)
    released, _ = matching_release(cfg, settings)
    return released or entry / "source.ckpt"


def source_config(cfg: DictConfig) -> DictConfig:
    """The config ``transfer.source=auto`` pretrains with: ``cfg`` with ``seed`` set to
    ``source.seed`` (so ``source.data`` resolves as the pretraining will use it)."""
    return _entry(cfg)[1]


def pretrained_source(
    cfg: DictConfig,
    fit_and_test: Callable[..., dict[str, Any]],
    *,
    use_release: bool = True,
    source_data: Any = None,
) -> Path:
    """The source checkpoint for ``transfer.source=auto``: the released source model of the
    task (``source.release``) where it was made with these very source settings, else
    pretrained once, then cached.

    Keyed by the source data, model and pretraining budget, not by the run's own seed
    (``${seed}`` in the source data resolves to ``source.seed``): every job of a sweep
    over seeds shares one source model, and parallel jobs wait for the one that trains it.
    ``fit_and_test`` is :func:`freezeft.app.train.fit_and_test` (passed in: it calls this).
    A cached entry whose ``source.ckpt`` is truncated or damaged is named in a warning and
    pretrained again. ``source_data``: the source data already built from
    :func:`source_config`'s ``source.data`` (else it is built here, if pretraining).
    """
    entry, source_cfg, settings = _entry(cfg)
    released, why_not = matching_release(cfg, settings) if use_release else (None, None)
    if released is not None:
        log.info(
            f"transfer.source=auto: the released source model {released} (made with these "
            "source settings; no pretraining)."
        )
        return released

    def build(folder: Path) -> None:
        size = OmegaConf.select(source_cfg, "source.data.corpus.n_train", default=None)
        what = f"{size:,} source utterances" if isinstance(size, int) else "the source data"
        if why_not:
            log.info(f"transfer.source=auto: not the released source model: {why_not}.")
        log.info(
            f"transfer.source=auto: pretraining the source model first, on {what} for "
            f"{cfg.source.max_epochs} epoch{'' if cfg.source.max_epochs == 1 else 's'}. "
            f"This happens once: the model is cached in "
            f"{entry} for every later run with the same source settings. To start from "
            "your own model instead: transfer.source=PATH.ckpt (or null: from scratch)."
        )
        # One process pretrains while the others wait on the cache lock, so it must not
        # start a multi-process strategy (DDP ranks would wait for each other forever).
        OmegaConf.update(source_cfg, "trainer.devices", 1)
        for key, value in (cfg.source.get("model") or {}).items():  # e.g. the speech task's
            OmegaConf.update(source_cfg, f"model.{key}", value, force_add=True)  # greedy decoder
        OmegaConf.update(source_cfg, "trainer.strategy", "auto", force_add=True)
        results = fit_and_test(
            source_cfg,
            source_data if source_data is not None else source_cfg.source.data,
            folder / "run",
            max_epochs=cfg.source.max_epochs,
            with_strategies=False,
            resumable=False,
        )
        shutil.copy(results["best_checkpoint"], folder / "source.ckpt")
        write_json(folder / "results.json", results)
        shutil.rmtree(folder / "run" / "checkpoints")
        log.info(f"Source model: {results.get('headline', 'tested')}")

    return cached_entry(entry, build, settings, check=_checkpoint_intact) / "source.ckpt"


def _checkpoint_intact(entry: Path) -> str | None:
    """What is wrong with the entry's ``source.ckpt``, or ``None``: cheaply, without loading
    its tensors (a truncated zip lacks its directory; the pickle's checksum is checked).
    Entries built before entries recorded their files' sizes are checked this way too."""
    path = entry / "source.ckpt"
    if not path.is_file():
        return "source.ckpt is missing"
    try:
        with zipfile.ZipFile(path) as archive:
            pickle = next(name for name in archive.namelist() if name.endswith("data.pkl"))
            archive.read(pickle)  # raises on a checksum mismatch
    except Exception as err:  # zipfile's errors for a cut or altered file vary
        return f"source.ckpt is truncated or damaged ({type(err).__name__}: {err})"
    return None
