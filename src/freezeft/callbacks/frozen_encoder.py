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
        self._head = head_indices(self.head, groups, type(self).__name__)

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


def head_indices(head: HeadSpec, groups: Sequence[LayerGroup], owner: str) -> list[int]:
    """Indices of the head groups; validates ``head`` against the resolved groups."""
    n = len(groups)
    if n < 2:
        raise ValueError(
            f"{owner}: the module has a single layer group ({[g.name for g in groups]}), so "
            "there is no encoder to freeze. Pass at least two groups, input to output, as "
            "`groups=[...]`, or define `layer_groups()` on the LightningModule."
        )
    if isinstance(head, int):
        if head >= n:
            raise ValueError(
                f"{owner}: `head={head}` leaves no encoder group to freeze: the module has "
                f"{n} layer groups ({[g.name for g in groups]}); use a head smaller than {n}."
            )
        return list(range(n - head, n))
    names = [g.name for g in groups]
    unknown = [h for h in head if h not in names]
    if unknown:
        raise ValueError(
            f"{owner}: head groups {unknown} are not layer groups; available: {names}."
        )
    if len(set(head)) >= n:
        raise ValueError(
            f"{owner}: `head` names every layer group; leave at least one encoder group."
        )
    return sorted(names.index(h) for h in head)


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
