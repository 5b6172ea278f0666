"""Freeze the bottom N layer groups for the whole run; the rest train.

The protocol of the layer-freezing transfer studies on DeepSpeech (e.g. Eberhard and Zesch,
2021: "freeze the first N layers" of an English model fine-tuned to German). With
``n_frozen=0`` everything trains (naive transfer); with all groups but the head frozen it is
:class:`~freezeft.callbacks.FrozenEncoder`.
"""

from __future__ import annotations

from collections.abc import Sequence

from typing_extensions import override

from freezeft.callbacks.base import expect_int
from freezeft.callbacks.frozen_encoder import FrozenEncoder
from freezeft.groups import GroupSpec, LayerGroup

__all__ = ["FreezeBottom"]


class FreezeBottom(FrozenEncoder):
    """Keep the first ``n_frozen`` layer groups (from the input side) frozen; train the rest.

    Groups whose every parameter you froze before fit (LoRA's embeddings) are not counted.

    Frozen groups stay bit-identical to the source model, get no gradient and no optimizer
    state; a re-initialised output layer trains with the groups above the frozen ones.

    Args:
        n_frozen: groups frozen from the input side (0: none, as naive transfer); at least
            one group must stay trainable.
        groups: layer-group patterns, input to output (``None``: ``layer_groups()`` or discovery).
        bn: ``"frozen"`` keeps the frozen groups' norm layers in eval mode; ``"train"`` does not.
        cache_frozen: compute the frozen groups' outputs once per sample (see
            :mod:`freezeft.frozen_cache`; the module must support it). They then run without
            dropout.
        cache_memory_gb: cached outputs kept in memory; more go to temporary files.

    Raises:
        ValueError: ``n_frozen`` < 0 (in ``__init__``), or not smaller than the number of
            groups (at fit start).

    Example::

        trainer = Trainer(callbacks=[FreezeBottom(n_frozen=2)])
    """

    def __init__(
        self,
        n_frozen: int = 2,
        groups: Sequence[GroupSpec] | None = None,
        bn: str = "frozen",
        cache_frozen: bool = False,
        cache_memory_gb: float = 2.0,
    ) -> None:
        super().__init__(1, groups, bn, cache_frozen, cache_memory_gb)
        self.n_frozen = expect_int(self, "n_frozen", n_frozen, 0)

    @override
    def check(self, groups: Sequence[LayerGroup]) -> None:
        n = len(groups)
        counted = self.counted_groups(groups)
        if self.n_frozen >= len(counted):
            yours = [g.name for i, g in enumerate(groups) if i not in counted]
            uncounted = (
                f"; {yours} hold only parameters you froze before fit and are not counted"
                if yours
                else ""
            )
            raise ValueError(
                f"FreezeBottom: `n_frozen={self.n_frozen}` leaves no group to train: the module "
                f"has {len(counted)} layer groups that can train "
                f"({[groups[i].name for i in counted]}){uncounted}; use n_frozen < "
                f"{len(counted)}."
            )
        # what trains: all above the first n_frozen groups that can train
        start = counted[self.n_frozen - 1] + 1 if self.n_frozen else 0
        self._head = list(range(start, n))
