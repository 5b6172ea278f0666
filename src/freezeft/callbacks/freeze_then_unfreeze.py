"""Freeze, then unfreeze: train the head first, then everything with a lower encoder LR."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info
from typing_extensions import override

from freezeft.callbacks.base import expect_int
from freezeft.callbacks.frozen_encoder import FrozenEncoder, HeadSpec
from freezeft.groups import GroupSpec

__all__ = ["FreezeThenUnfreeze"]


class FreezeThenUnfreeze(FrozenEncoder):
    """Two phases: phase 1 trains the head only (as :class:`FrozenEncoder`); phase 2 trains
    every group, the encoder's at ``lr * encoder_lr_scale``.

    Phase 2 starts at epoch ``unfreeze_at_epoch`` (0-based), or, with ``monitor`` set,
    after the monitored metric has not improved for ``patience`` validations.

    Args:
        head: number of groups from the top, or a list of group names, trained in phase 1.
        unfreeze_at_epoch: the first epoch of phase 2.
        encoder_lr_scale: LR multiplier of the encoder groups (in phase 2).
        groups: layer-group patterns, input to output.
        bn: ``"frozen"`` keeps frozen groups' norm layers in eval mode; ``"train"`` does not.
        monitor: a logged metric (e.g. ``"val_cer"``) that triggers phase 2 instead of the epoch.
        patience: validations without improvement before the metric trigger fires.
        mode: ``"min"`` or ``"max"``: which direction of ``monitor`` is better.
        cache_frozen: train from cached outputs of the frozen layers in phase 1
            (:mod:`freezeft.frozen_cache`); dropped when a group is unfrozen.
        cache_memory_gb: cached outputs kept in memory; more go to temporary files.

    Raises:
        ValueError: ``unfreeze_at_epoch < 0``, ``encoder_lr_scale <= 0``, ``patience < 1``,
            an unknown ``mode``, or a bad ``head``.

    Example::

        trainer = Trainer(callbacks=[FreezeThenUnfreeze(head=1, unfreeze_at_epoch=3)])
    """

    def __init__(
        self,
        head: HeadSpec = 1,
        unfreeze_at_epoch: int = 3,
        encoder_lr_scale: float = 0.1,
        groups: Sequence[GroupSpec] | None = None,
        bn: str = "frozen",
        monitor: str | None = None,
        patience: int = 1,
        mode: str = "min",
        cache_frozen: bool = False,
        cache_memory_gb: float = 2.0,
    ) -> None:
        super().__init__(head, groups, bn, cache_frozen, cache_memory_gb)
        name = type(self).__name__
        expect_int(self, "unfreeze_at_epoch", unfreeze_at_epoch, 0)
        expect_int(self, "patience", patience, 1)
        if not encoder_lr_scale > 0:
            raise ValueError(
                f"{name}: expected `encoder_lr_scale` > 0, but got {encoder_lr_scale!r}."
            )
        if mode not in ("min", "max"):
            raise ValueError(f"{name}: expected `mode` 'min' or 'max', but got {mode!r}.")
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.encoder_lr_scale = float(encoder_lr_scale)
        self.monitor = monitor
        self.patience = patience
        self.mode = mode
        self.best = math.inf if mode == "min" else -math.inf
        self.wait = 0
        self.triggered_epoch: int | None = None  # the metric trigger's phase-2 epoch

    @property
    def phase2_epoch(self) -> int | None:
        """The first epoch of phase 2, if known yet."""
        return self.triggered_epoch if self.monitor else self.unfreeze_at_epoch

    @override
    def trainable(self, index: int, n_groups: int, epoch: int) -> bool | None:
        start = self.phase2_epoch
        return (start is not None and epoch >= start) or index in self._head

    @override
    def lr_scale(self, index: int, n_groups: int) -> float:
        return 1.0 if index in self._head else self.encoder_lr_scale

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.monitor or self.triggered_epoch is not None or trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise ValueError(
                f"{type(self).__name__}: `monitor={self.monitor!r}` was not logged; logged "
                f"metrics are {sorted(trainer.callback_metrics)}."
            )
        value = float(value)
        improved = value < self.best if self.mode == "min" else value > self.best
        if improved:
            self.best, self.wait = value, 0
        else:
            self.wait += 1
        if self.wait >= self.patience:
            self.triggered_epoch = trainer.current_epoch + 1
            rank_zero_info(
                f"{type(self).__name__}: {self.monitor} did not improve for {self.wait} "
                f"validations; phase 2 starts at epoch {self.triggered_epoch}."
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(best=self.best, wait=self.wait, triggered_epoch=self.triggered_epoch)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best = state_dict.get("best", self.best)
        self.wait = state_dict.get("wait", 0)
        self.triggered_epoch = state_dict.get("triggered_epoch")
