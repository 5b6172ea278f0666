"""Naive transfer: every layer group trains at the optimizer's learning rate."""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
from typing_extensions import override

from freezeft.callbacks.base import StrategyCallback

__all__ = ["NaiveTransfer"]


class NaiveTransfer(StrategyCallback):
    """Fine-tune everything: the baseline every other strategy is compared against.

    Makes every parameter trainable at fit start and logs the layer-group table.

    Args:
        groups: layer-group patterns, input to output (``None``: the module's
            ``layer_groups()`` or discovery); used for the logged table.

    Example::

        trainer = Trainer(callbacks=[NaiveTransfer()])
    """

    def __init__(self, groups: Sequence[str] | None = None) -> None:
        super().__init__(groups)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            for group in self.groups:
                for param in group.params.values():
                    param.requires_grad_(True)
