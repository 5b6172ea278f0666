"""Discriminative learning rates: lower layers learn more slowly."""

from __future__ import annotations

from collections.abc import Sequence

from typing_extensions import override

from freezeft.callbacks.base import StrategyCallback
from freezeft.groups import GroupSpec, LayerGroup

__all__ = ["DiscriminativeLR"]


class DiscriminativeLR(StrategyCallback):
    """Group ``k`` from the top (the head is ``k = 0``) trains at ``lr * decay**k``.

    ``k`` counts only the groups that can train: one whose every parameter you froze
    before fit (a LoRA base model's ``lm_head``) takes no depth.

    Combines with any freezing schedule and with :class:`LRWarmup`; the scales go into the
    optimizer's and schedulers' base LRs, so the user's scheduler shapes every group alike.

    Args:
        decay: the per-group factor, > 0 (usually below 1).
        groups: layer-group patterns, input to output.

    Raises:
        ValueError: ``decay <= 0``.

    Example::

        trainer = Trainer(callbacks=[FreezeThenUnfreeze(), DiscriminativeLR(decay=0.5)])
    """

    def __init__(self, decay: float = 0.5, groups: Sequence[GroupSpec] | None = None) -> None:
        super().__init__(groups)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not decay > 0:
            raise ValueError(f"{type(self).__name__}: expected `decay` > 0, but got {decay!r}.")
        self.decay = float(decay)
        self._counted: list[int] | None = None

    @override
    def check(self, groups: Sequence[LayerGroup]) -> None:
        self._counted = self.counted_groups(groups)

    @override
    def lr_scale(self, index: int, n_groups: int) -> float:
        counted = self._counted if self._counted is not None else range(n_groups)
        return self.decay ** sum(1 for i in counted if i > index)
