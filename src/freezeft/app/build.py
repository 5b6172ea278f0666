"""Every object of a run, built once from its config and checked before any work.

:func:`build_run` makes the run's strategies, its data, its model and (when
``transfer.source=auto`` may pretrain) its source data, checks those very objects (the
strategies against the model's layer groups, resolved here once and handed on; the task's
transfer options) and returns them for :func:`freezeft.app.train.fit_and_test` to train.
Nothing is synthesised, pretrained or trained before the checks pass, and what a run does
(pretrain a source model or not; which strategies) is decided here, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from freezeft._lightning import pl
from freezeft.app import task
from freezeft.app.config import check_config, transfer_options
from freezeft.app.source import source_config
from freezeft.frozen_cache import PrefixCachable
from freezeft.groups import resolve_groups
from freezeft.interrupt import rng_states

__all__ = ["RunParts", "build_run", "build_fit", "pretrains_source", "strategy_configs"]


@dataclass
class RunParts:
    """What one fit trains, built once.

    Attributes:
        data: the LightningDataModule (or any object the model's config takes data from).
        model: the LightningModule, built after seeding with the run's seed.
        strategies: the strategy callbacks by config key (``strategy.callbacks.X``,
            ``addons.X``); empty for a pretraining.
        rng: the RNG states just after the model was built: the fit starts from them, so
            what ran in between (a source pretraining) changes nothing.
        source_data: the source data, when ``transfer.source=auto`` may pretrain on it.
    """

    data: Any
    model: Any
    strategies: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    source_data: Any = None


def pretrains_source(cfg: DictConfig) -> bool:
    """Whether the run starts from ``transfer.source=auto``'s source model (the released
    one, or one pretrained on ``source.data``): the one place this is decided."""
    return (
        cfg.stage != "pretrain"
        and cfg.transfer.get("source") == "auto"
        and not cfg.strategy.get("from_scratch")
    )


def strategy_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """The chosen strategy's callbacks and the add-ons, by config key, merged once."""
    return {
        **{f"strategy.callbacks.{k}": c for k, c in (cfg.strategy.callbacks or {}).items() if c},
        **{f"addons.{k}": c for k, c in (cfg.strategy.get("addons") or {}).items() if c},
    }


def build_fit(cfg: DictConfig, data: Any, *, with_strategies: bool) -> RunParts:
    """The model for ``data`` (after seeding with ``cfg.seed``) and, ``with_strategies``,
    the strategies: the objects one fit trains."""
    strategies = (
        {key: instantiate(c, _convert_="all") for key, c in strategy_configs(cfg).items()}
        if with_strategies
        else {}
    )
    pl.seed_everything(cfg.seed, workers=True)
    if isinstance(data, DictConfig):
        data = instantiate(data, _convert_="all")
    model = instantiate(cfg.model, **task.model_kwargs(data), _convert_="all")
    if not any(c.__name__ == "LightningModule" for c in type(model).__mro__):
        raise TypeError(
            f"{type(model).__name__} (model._target_) is not a LightningModule; the app "
            "trains LightningModules (of pytorch_lightning or lightning.pytorch)."
        )
    return RunParts(data=data, model=model, strategies=strategies, rng=rng_states())


def build_run(cfg: DictConfig) -> RunParts:
    """Check ``cfg``'s values, build the run's objects once and check them.

    Raises:
        ValueError: a value out of range, a strategy that does not fit the model's groups,
            transfer options the task refuses, ``transfer.source=auto`` without
            ``source.data``; each naming its config key. Errors of the objects' own
            constructors come through Hydra, naming the key too.
    """
    check_config(cfg)
    pretrain = cfg.stage == "pretrain"
    needs_source = pretrain or pretrains_source(cfg)
    if needs_source and OmegaConf.select(cfg, "source.data") is None:
        raise ValueError(
            f"{'stage=pretrain' if pretrain else 'transfer.source=auto'} "
            "pretrains a source model on `source.data`, which this config does not set. "
            "Give transfer.source=PATH (a Lightning .ckpt or a state-dict file of a model "
            "with the same parameter names), or +data@source.data=NAME (a data config of "
            "yours, e.g. the source task's)."
        )
    # The task's own classes check their values (one validator per value); building them
    # is cheap: no corpus is synthesised, no data read but a DeepSpeech alphabet file.
    parts = build_fit(cfg, cfg.source.data if pretrain else cfg.data, with_strategies=not pretrain)
    if not pretrain and needs_source:
        parts.source_data = instantiate(source_config(cfg).source.data, _convert_="all")
    for key, strategy in parts.strategies.items():
        memory = strategy.frozen_cache_memory_gb()
        if memory is not None and not isinstance(parts.model, PrefixCachable):
            raise ValueError(
                f"{type(strategy).__name__}(cache_frozen=True) needs the model to implement "
                "freezeft.frozen_cache.PrefixCachable (sample_keys, forward_prefix, "
                "forward_from_prefix, prefix_is_deterministic) and to call cached_forward() "
                f"in its training_step; {type(parts.model).__name__} (model._target_) does "
                f"not. Implement it, or drop {key}.cache_frozen=true."
            )
    _check_against_groups(parts.model, parts.strategies)
    try:
        task.check_transfer(type(parts.model), transfer_options(cfg))
    except (TypeError, ValueError) as err:
        raise ValueError(f"transfer: {err}") from None
    return parts


def _check_against_groups(model: Any, strategies: dict[str, Any]) -> None:
    """Each strategy's arguments against the model's layer groups (a head or ``n_frozen``
    too large), before any data or source model is made; the groups are handed to the
    strategies, so the fit does not resolve them again. A model whose groups exist only
    once it is configured (``configure_model``) is checked at fit start instead."""
    if not strategies:
        return
    patterns = next((s.patterns for s in strategies.values() if s.patterns is not None), None)
    try:
        groups = resolve_groups(model, patterns)
    except ValueError:
        return  # the fit resolves them again and names the problem
    for key, strategy in strategies.items():
        try:
            strategy.check(groups)
        except ValueError as err:
            raise ValueError(f"{err} (config: {key})") from None
        strategy.resolved_groups = groups
