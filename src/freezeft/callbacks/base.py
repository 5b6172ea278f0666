"""The common base of freezeft's strategy callbacks: layer groups resolved at fit start."""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info
from typing_extensions import override

from freezeft.groups import LayerGroup, format_group_table, resolve_groups

__all__ = ["StrategyCallback"]


class StrategyCallback(pl.Callback):
    """Resolves the module's layer groups at fit start and logs the group table.

    Args:
        groups: fnmatch patterns on qualified module names, input to output; ``None``
            uses the module's ``layer_groups()`` or discovery (see :mod:`freezeft.groups`).
    """

    #: How many of the last groups count as the head in the logged table.
    head_size: int = 0

    def __init__(self, groups: Sequence[str] | None = None) -> None:
        if groups is not None:
            if isinstance(groups, str) or not all(isinstance(g, str) for g in groups):
                raise ValueError(
                    f"Expected `groups` to be a list of module-name patterns, but got {groups!r}."
                )
            if not groups:
                raise ValueError("Expected `groups` to name at least one group, but got [].")
        self.patterns = list(groups) if groups is not None else None
        self.groups: list[LayerGroup] = []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.groups = resolve_groups(pl_module, self.patterns)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank_zero_info(
            f"{type(self).__name__}: layer groups\n"
            + format_group_table(self.groups, head=self.head_size)
        )
