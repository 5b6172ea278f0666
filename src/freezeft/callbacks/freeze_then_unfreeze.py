"""Freeze, then unfreeze: train the head first, then everything with a lower encoder LR."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from typing_extensions import override

from freezeft._lightning import pl, rank_zero_info, rank_zero_warn
from freezeft.callbacks.base import expect_bool, expect_int, improves
from freezeft.callbacks.frozen_encoder import FrozenEncoder, HeadSpec
from freezeft.groups import GroupSpec

__all__ = ["FreezeThenUnfreeze"]


class FreezeThenUnfreeze(FrozenEncoder):
    """Two phases: phase 1 trains the head only (as :class:`FrozenEncoder`); phase 2 trains
    every group, the encoder's at ``lr * encoder_lr_scale``.

    Phase 2 starts at epoch ``unfreeze_at_epoch`` (0-based), or, with ``monitor`` set,
    after the monitored metric has not improved for ``patience`` validations. With
    ``stop_patience`` set, training stops once the metric has not improved for that many
    validations of phase 2 (early stopping per phase), and ``reset_optimizer_state`` gives
    phase 2 a fresh optimizer state: together, with ``encoder_lr_scale=1``, the two-step
    protocol of DeepSpeech's transfer-learning work (``strategy=two_step``).

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
        reset_optimizer_state: forget the optimizer's state (moments, step counts) when
            phase 2 starts.
        stop_patience: with ``monitor``, stop training after this many validations of
            phase 2 without improvement (``None``: train to ``max_epochs``).

    Raises:
        ValueError: ``unfreeze_at_epoch < 0``, ``encoder_lr_scale <= 0``, ``patience < 1``,
            ``stop_patience < 1`` or without ``monitor``,
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
        reset_optimizer_state: bool = False,
        stop_patience: int | None = None,
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
        if stop_patience is not None:
            expect_int(self, "stop_patience", stop_patience, 1)
            if not monitor:
                raise ValueError(f"{name}: `stop_patience` needs a `monitor` to follow.")
        self.reset_optimizer_state = expect_bool(
            self, "reset_optimizer_state", reset_optimizer_state
        )
        self.stop_patience = stop_patience
        self.phase2_best = math.inf if mode == "min" else -math.inf
        self.phase2_wait = 0

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
    def resets_optimizer_on_unfreeze(self) -> bool:
        return self.reset_optimizer_state

    @override
    def phase_trigger(self, epoch: int, step: int) -> dict[str, Any] | None:
        if not self.monitor:
            return None
        return {
            "on_plateau": {
                "monitor": self.monitor,
                "patience": self.patience,
                "mode": self.mode,
                "best": self.best,
            }
        }

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.monitor or trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise ValueError(
                f"{type(self).__name__}: `monitor={self.monitor!r}` was not logged; logged "
                f"metrics are {sorted(trainer.callback_metrics)}."
            )
        value = float(value)
        if self.triggered_epoch is None:
            self.best, self.wait = self._follow(value, self.best, self.wait)
            if self.wait >= self.patience:
                self.triggered_epoch = trainer.current_epoch + 1
                rank_zero_info(
                    f"{type(self).__name__}: {self.monitor} did not improve for {self.wait} "
                    f"validations; phase 2 starts at epoch {self.triggered_epoch}."
                )
        elif self.stop_patience is not None and trainer.current_epoch >= self.triggered_epoch:
            self.phase2_best, self.phase2_wait = self._follow(
                value, self.phase2_best, self.phase2_wait
            )
            if self.phase2_wait >= self.stop_patience:
                trainer.should_stop = True
                rank_zero_info(
                    f"{type(self).__name__}: {self.monitor} did not improve for "
                    f"{self.phase2_wait} validations of phase 2; training stops."
                )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        phase2 = self.phase2_epoch
        if phase2 is None or phase2 >= trainer.current_epoch:  # epochs trained
            reason = (
                f"{self.monitor} kept improving in phase 1"
                if self.monitor
                else f"unfreeze_at_epoch={self.unfreeze_at_epoch} >= max_epochs"
            )
            trained = trainer.current_epoch
            rank_zero_warn(
                f"{type(self).__name__}: phase 2 (everything trains) never started: {reason} "
                f"within the {trained} epoch{'' if trained == 1 else 's'} trained, so only the "
                "head trained. "
                + (
                    "Give it more epochs (Trainer(max_epochs=N); python -m freezeft.run: "
                    "trainer.max_epochs=N, or protocol=converge to train until dev stops "
                    "improving)."
                    if self.monitor
                    else f"Give it more than {self.unfreeze_at_epoch} epochs (Trainer(max_epochs="
                    f"N); python -m freezeft.run: trainer.max_epochs={self.unfreeze_at_epoch + 2}"
                    ") or a smaller unfreeze_at_epoch."
                )
            )

    def _follow(self, value: float, best: float, wait: int) -> tuple[float, int]:
        """The new best and the validations since it."""
        return (value, 0) if improves(value, best, self.mode) else (best, wait + 1)

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            best=self.best,
            wait=self.wait,
            triggered_epoch=self.triggered_epoch,
            phase2_best=self.phase2_best,
            phase2_wait=self.phase2_wait,
        )
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best = state_dict.get("best", self.best)
        self.wait = state_dict.get("wait", 0)
        self.triggered_epoch = state_dict.get("triggered_epoch")
        self.phase2_best = state_dict.get("phase2_best", self.phase2_best)
        self.phase2_wait = state_dict.get("phase2_wait", 0)
