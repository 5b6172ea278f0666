"""Gradual unfreezing (ULMFiT): one more group trains every few epochs, top down."""

from __future__ import annotations

from collections.abc import Sequence

from typing_extensions import override

from freezeft.callbacks.base import expect_int
from freezeft.callbacks.frozen_encoder import FrozenEncoder, HeadSpec
from freezeft.groups import GroupSpec

__all__ = ["GradualUnfreeze"]


class GradualUnfreeze(FrozenEncoder):
    """Start with the head; every ``every_n_epochs`` epochs the next group down joins.

    Args:
        head: number of groups from the top, or a list of group names, trained from epoch 0.
        every_n_epochs: epochs between two unfreezes.
        groups: layer-group patterns, input to output.
        bn: ``"frozen"`` keeps frozen groups' norm layers in eval mode; ``"train"`` does not.
        cache_frozen: train from cached outputs of the frozen layers while groups are frozen
            (:mod:`freezeft.frozen_cache`); dropped when a group is unfrozen.
        cache_memory_gb: cached outputs kept in memory; more go to temporary files.

    Raises:
        ValueError: ``every_n_epochs < 1`` or a bad ``head``.

    Example::

        trainer = Trainer(callbacks=[GradualUnfreeze(head=1, every_n_epochs=2)])
    """

    def __init__(
        self,
        head: HeadSpec = 1,
        every_n_epochs: int = 1,
        groups: Sequence[GroupSpec] | None = None,
        bn: str = "frozen",
        cache_frozen: bool = False,
        cache_memory_gb: float = 2.0,
    ) -> None:
        super().__init__(head, groups, bn, cache_frozen, cache_memory_gb)
        self.every_n_epochs = expect_int(self, "every_n_epochs", every_n_epochs, 1)

    @override
    def trainable(self, index: int, n_groups: int, epoch: int) -> bool | None:
        if index in self._head:
            return True
        # groups holding only parameters the user froze (LoRA's embeddings) take no turn
        encoder_top_down = [
            i
            for i in reversed(range(n_groups))
            if i not in self._head and (self.plan is None or self.plan.has_own_params(i))
        ]
        return index in encoder_top_down[: epoch // self.every_n_epochs]
