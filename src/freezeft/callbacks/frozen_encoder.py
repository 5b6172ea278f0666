"""Frozen encoder: only the head trains, for the whole run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from typing_extensions import override

from freezeft.callbacks.base import HeadSpec, StrategyCallback, check_head, head_indices
from freezeft.groups import GroupSpec, LayerGroup

__all__ = ["FrozenEncoder"]


class FrozenEncoder(StrategyCallback):
    """Train the last ``head`` layer groups only; the encoder stays bit-identical.

    Frozen groups get no gradient and no optimizer state, and no autograd graph is built
    through a frozen prefix, so each step is cheaper than full fine-tuning.

    Args:
        head: number of groups from the top, or a list of group names, that train.
        groups: layer-group patterns, input to output (``None``: ``layer_groups()`` or discovery).
        bn: ``"frozen"`` keeps the encoder's norm layers in eval mode; ``"train"`` does not.
        cache_frozen: compute the frozen prefix's outputs once per sample and train the head
            from them (see :mod:`freezeft.frozen_cache`; the module must support it). The
            frozen layers then run without dropout.
        cache_memory_gb: cached outputs kept in memory; more go to temporary files.

    Raises:
        ValueError: ``head`` < 1 (in ``__init__``) or not smaller than the number of groups
            (at fit start).

    Example::

        trainer = Trainer(callbacks=[FrozenEncoder(head=1)])
    """

    schedules_freezing: ClassVar[bool] = True

    def __init__(
        self,
        head: HeadSpec = 1,
        groups: Sequence[GroupSpec] | None = None,
        bn: str = "frozen",
        cache_frozen: bool = False,
        cache_memory_gb: float = 2.0,
    ) -> None:
        super().__init__(groups, bn)
        self.head = check_head(head, type(self).__name__)
        if cache_memory_gb < 0:
            raise ValueError(f"Expected `cache_memory_gb` >= 0, but got {cache_memory_gb}.")
        self.cache_frozen = bool(cache_frozen)
        self.cache_memory_gb = cache_memory_gb
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
