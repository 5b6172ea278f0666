"""Frozen encoder: only the head trains, for the whole run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from typing_extensions import override

from freezeft.callbacks.base import HeadSpec, StrategyCallback, check_head, head_indices
from freezeft.groups import LayerGroup

__all__ = ["FrozenEncoder"]


class FrozenEncoder(StrategyCallback):
    """Train the last ``head`` layer groups only; the encoder stays bit-identical.

    Frozen groups get no gradient and no optimizer state, and no autograd graph is built
    through a frozen prefix, so each step is cheaper than full fine-tuning.

    Args:
        head: number of groups from the top, or a list of group names, that train.
        groups: layer-group patterns, input to output (``None``: ``layer_groups()`` or discovery).
        bn: ``"frozen"`` keeps the encoder's norm layers in eval mode; ``"train"`` does not.

    Raises:
        ValueError: ``head`` < 1 (in ``__init__``) or not smaller than the number of groups
            (at fit start).

    Example::

        trainer = Trainer(callbacks=[FrozenEncoder(head=1)])
    """

    schedules_freezing: ClassVar[bool] = True

    def __init__(
        self, head: HeadSpec = 1, groups: Sequence[str] | None = None, bn: str = "frozen"
    ) -> None:
        super().__init__(groups, bn)
        self.head = check_head(head, type(self).__name__)
        self._head: list[int] = []

    @override
    def check(self, groups: Sequence[LayerGroup]) -> None:
        self._head = head_indices(self.head, groups, type(self).__name__)

    @override
    def trainable(self, index: int, n_groups: int, epoch: int) -> bool | None:
        return index in self._head

    @override
    def head_size(self, n_groups: int) -> int:
        return len(self._head)
