"""The schedule a fit followed, written as it goes: ``schedule.yaml``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from typing_extensions import override

from freezeft._lightning import CALLBACK_BASES, pl
from freezeft.callbacks.base import StrategyCallback
from freezeft.schedule import write_schedule

__all__ = ["ScheduleLog"]

HEADER = (
    "# The freezing schedule this fit followed (freezeft). Replay it with\n"
    "# freezeft.callbacks.Schedule(path) or: python -m freezeft.run strategy=schedule "
    "strategy.path=<this file>\n"
)


class ScheduleLog(*CALLBACK_BASES):  # type: ignore[misc]
    """Write the fit's realised schedule (groups, and each phase's start, trained groups,
    LR multipliers, optimizer reset and trigger) to ``path``, atomically, at fit start and
    whenever a phase starts; a resumed fit's file keeps the phases before the resume.

    Args:
        path: the file to write (``schedule.yaml``).

    Example::

        trainer = Trainer(callbacks=[GradualUnfreeze(), ScheduleLog("schedule.yaml")])
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._written: Any = None

    def _write(self, trainer: pl.Trainer) -> None:
        strategies = [c for c in trainer.callbacks if isinstance(c, StrategyCallback)]
        if not strategies or not trainer.is_global_zero:
            return
        schedule = strategies[0].realised_schedule()
        if not schedule.get("phases") or schedule == self._written:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_schedule(self.path, schedule, HEADER)
        self._written = schedule

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:  # fmt: skip
        self._write(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer)
