"""Frozen encoder: only the head trains, for the whole run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from typing_extensions import override

from freezeft.callbacks.base import StrategyCallback, expect_bool
from freezeft.groups import GroupSpec, LayerGroup

__all__ = ["FrozenEncoder", "HeadSpec"]

#: The head: how many groups from the top, or their names.
HeadSpec = int | Sequence[str]


class FrozenEncoder(StrategyCallback):
    """Train the last ``head`` layer groups only; the encoder stays bit-identical.

    Frozen groups get no gradient and no optimizer state, and no autograd graph is built
    through a frozen prefix, so each step is cheaper than full fine-tuning.

    Groups whose every parameter you froze before fit (a LoRA base model's embeddings,
    norm and ``lm_head``) are not counted: ``head=1`` on a LoRA model is the top layer's
    adapters.

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
        if isinstance(cache_memory_gb, bool) or not isinstance(cache_memory_gb, (int, float)):
            raise ValueError(
                f"Expected `cache_memory_gb` to be a number, but got {cache_memory_gb!r}."
            )
        if cache_memory_gb < 0:
            raise ValueError(f"Expected `cache_memory_gb` >= 0, but got {cache_memory_gb}.")
        self.cache_frozen = expect_bool(self, "cache_frozen", cache_frozen)
        self.cache_memory_gb = cache_memory_gb
        self._head: list[int] = []

    @override
    def check(self, groups: Sequence[LayerGroup]) -> None:
        self._head = head_indices(
            self.head, groups, type(self).__name__, self.counted_groups(groups)
        )

    @override
    def trainable(self, index: int, n_groups: int, epoch: int) -> bool | None:
        return index in self._head

    @override
    def head_size(self, n_groups: int) -> int:
        return len(self._head)

    @override
    def head_groups(self, n_groups: int) -> list[int]:
        return list(self._head)

    @override
    def frozen_cache_memory_gb(self) -> float | None:
        return float(self.cache_memory_gb) if self.cache_frozen else None


def head_indices(
    head: HeadSpec,
    groups: Sequence[LayerGroup],
    owner: str,
    counted: Sequence[int] | None = None,
) -> list[int]:
    """Indices of the head groups; validates ``head`` against the resolved groups.

    Args:
        head: how many groups from the top, or their names.
        groups: the resolved groups.
        owner: the strategy's name, for messages.
        counted: the groups that count (those with parameters the user left trainable);
            ``None``: all. An int ``head`` is the last ``head`` of them.
    """
    n = len(groups)
    names = [g.name for g in groups]
    if n < 2:
        raise ValueError(
            f"{owner}: the module has a single layer group ({names}), so "
            "there is no encoder to freeze. Pass at least two groups, input to output, as "
            "`groups=[...]`, or define `layer_groups()` on the LightningModule."
        )
    counted = list(range(n)) if counted is None else sorted(counted)
    yours = [names[i] for i in range(n) if i not in counted]
    uncounted = (
        f"; {yours} hold only parameters you froze before fit and are not counted" if yours else ""
    )
    if not counted:
        raise ValueError(
            f"{owner}: no layer group holds a parameter that can train: you froze every "
            f"parameter before fit ({names}). Leave the parameters to train with "
            "requires_grad=True."
        )
    if isinstance(head, int):
        if head >= len(counted):
            raise ValueError(
                f"{owner}: `head={head}` leaves no encoder group to freeze: the module has "
                f"{len(counted)} layer groups that can train "
                f"({[names[i] for i in counted]}){uncounted}; use a head smaller than "
                f"{len(counted)}."
            )
        return counted[len(counted) - head :]
    unknown = [h for h in head if h not in names]
    if unknown:
        raise ValueError(
            f"{owner}: head groups {unknown} are not layer groups; available: {names}."
        )
    chosen = sorted({names.index(h) for h in head})
    if not set(chosen) & set(counted):
        raise ValueError(
            f"{owner}: `head={list(head)}` names only groups whose every parameter you "
            "froze before fit, so nothing would train at epoch 0. Name groups that can "
            f"train ({[names[i] for i in counted]}), or give `head=1` (it counts only those)."
        )
    if set(counted) <= set(chosen) or len(set(head)) >= n:
        raise ValueError(
            f"{owner}: `head` names every layer group that can train; leave at least one "
            "encoder group."
        )
    return chosen


def check_head(head: HeadSpec, owner: str) -> HeadSpec:
    """Validate ``head`` in ``__init__``: a positive int or a non-empty list of names."""
    if isinstance(head, bool) or not isinstance(head, (int, list, tuple)):
        raise ValueError(
            f"{owner}: expected `head` to be an int or a list of group names, but got {head!r}."
        )
    if isinstance(head, int):
        if head < 1:
            raise ValueError(f"{owner}: expected `head` >= 1, but got {head}.")
        return head
    if not head or not all(isinstance(h, str) for h in head):
        raise ValueError(f"{owner}: expected `head` to list group names, but got {head!r}.")
    return list(head)
