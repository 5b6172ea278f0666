"""Naive transfer: every layer group trains at the optimizer's learning rate."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from typing_extensions import override

from freezeft.callbacks.base import StrategyCallback
from freezeft.groups import GroupSpec

__all__ = ["NaiveTransfer"]


class NaiveTransfer(StrategyCallback):
    """Fine-tune everything: the baseline every other strategy is compared against.

    Makes every layer group trainable and logs the group table at fit start.

    Args:
        groups: layer-group patterns, input to output (``None``: the module's
            ``layer_groups()`` or discovery).

    Example::

        trainer = Trainer(callbacks=[NaiveTransfer()])
    """

    schedules_freezing: ClassVar[bool] = True

    def __init__(self, groups: Sequence[GroupSpec] | None = None) -> None:
        super().__init__(groups)

    @override
    def trainable(self, index: int, n_groups: int, epoch: int) -> bool | None:
        return True
