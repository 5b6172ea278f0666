"""Gradual unfreezing (ULMFiT): one more group trains every few epochs, top down."""

from __future__ import annotations

from collections.abc import Sequence

from typing_extensions import override

from freezeft._lightning import pl, rank_zero_warn
from freezeft.callbacks.base import expect_int, run_length
from freezeft.callbacks.frozen_encoder import FrozenEncoder, HeadSpec
from freezeft.groups import GroupSpec

__all__ = ["GradualUnfreeze"]


class GradualUnfreeze(FrozenEncoder):
    """Start with the head; every ``every_n_epochs`` epochs the next group down joins.

    When training starts, a warning names the groups that would never train if the run
    (``trainer.max_epochs``, or fewer epochs by ``max_steps``) ends before their turn.

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
        return index in self.thaw_order(n_groups)[: epoch // self.every_n_epochs]

    def thaw_order(self, n_groups: int) -> list[int]:
        """The groups below the head in the order they join: the ``k``-th (from 1) trains
        from epoch ``k * every_n_epochs``. Groups holding only parameters the user froze
        (LoRA's embeddings) take no turn."""
        return [
            i
            for i in reversed(range(n_groups))
            if i not in self._head and (self.plan is None or self.plan.has_own_params(i))
        ]

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        length = run_length(trainer)
        order = self.thaw_order(len(self.groups))
        needed = len(order) * self.every_n_epochs + 1  # the last group trains one epoch
        if length.epochs is None or not order or length.epochs >= needed:
            return
        never = [
            self.groups[i].name
            for k, i in enumerate(order, start=1)
            if k * self.every_n_epochs >= length.epochs
        ]
        limited = length.steps is not None and trainer.max_steps == length.steps
        raise_steps = " (and trainer.max_steps to match)" if limited else ""
        rank_zero_warn(
            f"{type(self).__name__}: thawing its {len(order)} groups below the head, one every "
            f"{self.every_n_epochs} epoch(s), needs {needed} epochs before the last one trains, "
            f"but this run has {length.epochs} ({length.limits}), so {never} never train. "
            f"Set trainer.max_epochs >= {needed}{raise_steps}, a smaller `every_n_epochs`, "
            "or more groups in `head`."
        )
