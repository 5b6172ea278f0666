"""What the app (``python -m freezeft.run``) needs from a task: its model and its data.

The speech task (:mod:`freezeft.speech`) implements both protocols. Another task plugs
into the same app, configs, sweeps and reports by implementing them and naming its
classes in ``conf/model/`` and ``conf/data/``; the app imports nothing task-specific.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = ["TaskModule", "TaskData", "TransferReport"]


class TransferReport(Protocol):
    """What loading a source model reports."""

    def to_json(self, path: str | Path) -> None:
        """Write the report (``transfer.json`` in the run dir)."""

    def summary(self) -> str:
        """One line for the log."""


@runtime_checkable
class TaskModule(Protocol):
    """The LightningModule side of a task.

    ``monitor``/``monitor_mode``: the logged metric that picks the best checkpoint (and
    what the app returns to a sweeper), e.g. ``"val_cer"``/``"min"``.
    """

    monitor: str
    monitor_mode: str

    @staticmethod
    def check_transfer(**options: Any) -> None:
        """Check ``transfer.*`` options before any work (``ValueError`` naming them)."""

    def transfer_from(self, source: Path, **options: Any) -> TransferReport:
        """Load a source model's weights (``transfer.*`` of the config are ``options``)."""

    def test_results(self, metrics: dict[str, float]) -> dict[str, Any]:
        """``results.json`` entries from ``trainer.test``'s metrics (the speech task's:
        ``wer``, ``cer``, ``loss``...); a ``headline`` entry, if any, ends the run's output."""

    def skipped_samples(self) -> list[tuple[str, Any]]:
        """``(split, row)`` for samples left out while training or testing."""


@runtime_checkable
class TaskData(Protocol):
    """The LightningDataModule side of a task."""

    def model_kwargs(self) -> dict[str, Any]:
        """Arguments the model needs from the data (e.g. the alphabet's labels)."""

    def skipped_rows(self) -> list[tuple[str, Any]]:
        """``(split, row)`` for rows left out before training (``row`` has ``source``,
        ``path``, ``kind`` and ``detail``)."""

    def describe(self) -> dict[str, Any]:
        """What ``results.json`` records of the data (language, sizes, batch size)."""
