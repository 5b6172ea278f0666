"""What a run's report plots: dev metrics per epoch and each param group's LR per step.

:class:`History` is a Lightning callback that writes, into its folder and after every
validation and training epoch (so an interrupted run keeps what it had):

* ``history.json``: ``{"epochs": [{"epoch": 0, "val_cer": ..., "train_loss": ...}, ...],
  "decisions": [...]}``, the decisions strategies made as they went (a callback's
  ``decisions`` list, e.g. :class:`~freezeft.callbacks.AutoFreeze`'s freezes);
* ``lr_schedule.csv``: ``step,epoch,<group>,...``, the LR each param group trained at in
  that optimizer step: after warmup factors, and 0 while the group is frozen.

The LR it records is the one the optimizer step used, warmup included, wherever it stands
in ``trainer.callbacks``: in a fit with freezeft's strategies it is the fit's
:class:`LRSchedule`, recorded at the end of every optimizer step that ran, its warmup
still applied (with a ``GradScaler`` too); without them, ``param_groups`` at
``on_before_optimizer_step``. Its records travel in checkpoints, so a resumed run's files
cover the whole run.

:class:`LRSchedule` is that table in memory, per optimizer step: each param group's
applied LR and whether it trained. Every strategy shows its fit's as
:attr:`~freezeft.callbacks.StrategyCallback.applied_lr`; ``write_csv`` writes it as
``lr_schedule.csv``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typing_extensions import override

from freezeft._lightning import CALLBACK_BASES, pl
from freezeft.files import atomic_write, write_text_atomic

__all__ = [
    "AppliedLR",
    "History",
    "LRSchedule",
    "read_decisions",
    "read_history",
    "read_lr_schedule",
]

HISTORY_FILE = "history.json"
LR_FILE = "lr_schedule.csv"


@dataclass(frozen=True)
class AppliedLR:
    """The LRs of one optimizer step.

    Args:
        step: ``trainer.global_step`` when the step ran (its index, from 0).
        epoch: the epoch it ran in.
        lr: each param group's LR in this step, by name (a freezeft fit names them by
            layer group), warmup included; 0.0 for a group that trained nothing.
        trained: each param group's: whether any of its parameters trained.
    """

    step: int
    epoch: int
    lr: dict[str, float]
    trained: dict[str, bool]

    def row(self) -> dict[str, float | int]:
        """The step as a row of ``lr_schedule.csv``: ``step``, ``epoch``, one LR per group."""
        return {"step": self.step, "epoch": self.epoch, **self.lr}


class LRSchedule:
    """The LR each param group was applied at, per optimizer step, and whether it trained:
    the table of ``lr_schedule.csv``, in memory.

    Example::

        >>> schedule = LRSchedule()
        >>> schedule.record(0, 0, [("net.0", 0.01, False), ("net.2", 0.01, True)])
        >>> schedule.record(1, 0, [("net.0", 0.01, True), ("net.2", 0.02, True)])
        >>> schedule.of("net.0"), schedule.of("net.2")
        ([0.0, 0.01], [0.01, 0.02])
        >>> schedule.trained_in("net.0")
        [False, True]
    """

    def __init__(self) -> None:
        #: one entry per optimizer step, in order
        self.steps: list[AppliedLR] = []
        #: the param groups' names, in the order they first appeared
        self.names: list[str] = []

    def record(self, step: int, epoch: int, groups: Iterable[tuple[str, float, bool]]) -> None:
        """Add one optimizer step: each param group's ``(name, lr, trained)``, the LR its
        step used (recorded as 0.0 where it trained nothing)."""
        lrs: dict[str, float] = {}
        trained: dict[str, bool] = {}
        for name, lr, trains in groups:
            if name not in self.names:
                self.names.append(name)
            lrs[name] = float(lr) if trains else 0.0
            trained[name] = bool(trains)
        self.steps.append(AppliedLR(step, epoch, lrs, trained))

    def of(self, name: str) -> list[float]:
        """Param group ``name``'s LR at every step (NaN before it joined the optimizer).

        Raises:
            KeyError: no param group has that name (the message lists them).
        """
        if name not in self.names:
            raise KeyError(f"no param group {name!r}; the groups are {self.names}")
        return [entry.lr.get(name, math.nan) for entry in self.steps]

    def trained_in(self, name: str) -> list[bool]:
        """Whether param group ``name`` trained at each step."""
        if name not in self.names:
            raise KeyError(f"no param group {name!r}; the groups are {self.names}")
        return [entry.trained.get(name, False) for entry in self.steps]

    def rows(self) -> list[dict[str, float | int]]:
        """The rows of ``lr_schedule.csv``."""
        return [entry.row() for entry in self.steps]

    def write_csv(self, path: str | Path) -> None:
        """Write the table as ``lr_schedule.csv`` (``step,epoch,<group>,...``; 0 while a
        group was frozen, empty before it joined the optimizer), atomically.

        Raises:
            freezeft.files.WriteError: the file could not be written.
        """
        _write_lr_csv(Path(path), self.names, self.rows())

    def __len__(self) -> int:
        return len(self.steps)


def _write_lr_csv(path: Path, names: list[str], rows: list[dict[str, float | int]]) -> None:
    with atomic_write(path, newline="") as stream:
        writer = csv.DictWriter(stream, ["step", "epoch", *names], restval="")
        writer.writeheader()
        writer.writerows(rows)


class History(*CALLBACK_BASES):  # type: ignore[misc]
    """Record per-epoch ``val_*``/``train_*`` metrics and per-step effective LRs.

    Args:
        folder: where ``history.json`` and ``lr_schedule.csv`` go (the run dir).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.epochs: list[dict[str, float | int]] = []
        self.lr_rows: list[dict[str, float | int]] = []
        self.group_names: list[str] = []
        self.decisions: list[dict[str, Any]] = []
        self._applied: LRSchedule | None = None  # the fit's, where freezeft's strategies run
        self._taken = 0  # its steps already in lr_rows
        self._writes = True  # rank zero's History writes (and records)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._applied, self._taken, self._writes = None, 0, trainer.is_global_zero
        for callback in trainer.callbacks:  # a strategy's: the fit's coordinator records them
            applied = getattr(getattr(callback, "coordinator", None), "applied_lr", None)
            if isinstance(applied, LRSchedule):
                self._applied = applied
                break

    def _take_applied(self) -> None:
        """The steps the fit's strategies recorded since the last call, as rows."""
        if self._applied is None or not self._writes:
            return
        for entry in self._applied.steps[self._taken :]:
            for name in entry.lr:
                if name not in self.group_names:
                    self.group_names.append(name)
            self.lr_rows.append(entry.row())
        self._taken = len(self._applied.steps)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        self._take_applied()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if not trainer.is_global_zero or self._applied is not None:
            return
        row: dict[str, float | int] = {"step": trainer.global_step, "epoch": trainer.current_epoch}
        for index, group in enumerate(optimizer.param_groups):
            name = str(group.get("name", f"pg{index + 1}"))
            if name not in self.group_names:
                self.group_names.append(name)
            training = any(p.requires_grad for p in group["params"])
            row[name] = float(group["lr"]) if training else 0.0
        self.lr_rows.append(row)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, "val_")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_applied()
        self._record(trainer, "train_")

    def _record(self, trainer: pl.Trainer, prefix: str) -> None:
        # Every rank reads the metrics: reading them runs the `sync_dist` reductions of the
        # epoch's logged values, collectives the other ranks must join (rank 0 alone waited
        # in one while the others were in the next callback's reduce: a gloo mismatch).
        logged = trainer.callback_metrics
        if not trainer.is_global_zero:
            return
        self._take_applied()
        metrics = {
            key: float(value)
            for key, value in logged.items()
            if key.startswith(prefix) and not key.endswith("_step") and value.numel() == 1
        }
        if not self.epochs or self.epochs[-1]["epoch"] != trainer.current_epoch:
            self.epochs.append({"epoch": trainer.current_epoch})
        self.epochs[-1].update(metrics)
        self.decisions = [
            {"strategy": type(callback).__name__, **decision}
            for callback in trainer.callbacks
            if callback is not self
            for decision in getattr(callback, "decisions", None) or []
            if isinstance(decision, dict)
        ]
        self.write()

    @override
    def state_dict(self) -> dict[str, Any]:
        self._take_applied()  # a checkpoint taken before this batch's end has its step
        return {"epochs": self.epochs, "lr_rows": self.lr_rows, "group_names": self.group_names}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = list(state_dict.get("epochs", []))
        self.lr_rows = list(state_dict.get("lr_rows", []))
        self.group_names = list(state_dict.get("group_names", []))

    def write(self) -> None:
        """Write both files (called after every epoch), each atomically.

        Raises:
            freezeft.files.WriteError: a file could not be written (the message names it).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        history = {"epochs": self.epochs, "decisions": self.decisions}
        write_text_atomic(self.folder / HISTORY_FILE, json.dumps(history, indent=1))
        _write_lr_csv(self.folder / LR_FILE, self.group_names, self.lr_rows)


def read_decisions(run_dir: Path) -> list[dict[str, Any]]:
    """The strategies' decisions a :class:`History` wrote in ``run_dir`` ([] if none).

    Raises:
        ValueError: ``history.json`` is there but not what :class:`History` writes (the
            message names the file and says what is wrong with it).
    """
    return _read_history_file(Path(run_dir) / HISTORY_FILE)["decisions"]


def read_history(run_dir: Path) -> list[dict[str, float]]:
    """The per-epoch metrics a :class:`History` wrote in ``run_dir`` ([] if none).

    Raises:
        ValueError: ``history.json`` is there but not what :class:`History` writes.
    """
    return _read_history_file(Path(run_dir) / HISTORY_FILE)["epochs"]


def _read_history_file(path: Path) -> dict[str, list[dict[str, Any]]]:
    if not path.exists():
        return {"epochs": [], "decisions": []}
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a readable history.json ({err})") from None
    if not text.strip():
        raise ValueError(f"{path} is not a readable history.json (it is empty)")
    try:
        history = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not a readable history.json ({err})") from None
    if not isinstance(history, dict) or not isinstance(history.get("epochs"), list):
        raise ValueError(f"{path} is not a readable history.json (no list of epochs in it)")
    epochs = history["epochs"]
    if not all(isinstance(e, dict) and isinstance(e.get("epoch"), int) for e in epochs):
        raise ValueError(f"{path} is not a readable history.json (an epoch without its number)")
    decisions = history.get("decisions") or []
    if not isinstance(decisions, list):
        raise ValueError(f"{path} is not a readable history.json (its decisions are no list)")
    return {"epochs": epochs, "decisions": [d for d in decisions if isinstance(d, dict)]}


def read_lr_schedule(run_dir: Path) -> dict[str, list[float]]:
    """``{"step": [...], "<group>": [...]}`` from ``lr_schedule.csv`` ({} if none; an empty
    cell, a group that was not in the optimizer yet, is NaN).

    Raises:
        ValueError: ``lr_schedule.csv`` is there but not what :class:`History` writes (empty,
            a row cut short, a value that is no number): the message names the file.
    """
    path = Path(run_dir) / LR_FILE
    if not path.exists():
        return {}
    try:
        with open(path, newline="") as stream:
            reader = csv.reader(stream)
            header = next(reader, None)
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path} is not a readable lr_schedule.csv ({err})") from None
    if not header or header[:2] != ["step", "epoch"]:
        raise ValueError(f"{path} is not a readable lr_schedule.csv (no step,epoch,... header)")
    schedule: dict[str, list[float]] = {key: [] for key in header}
    for number, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise ValueError(
                f"{path} is not a readable lr_schedule.csv (line {number} has {len(row)} "
                f"fields, the header {len(header)}: cut short?)"
            )
        try:
            values = [float(cell) if cell != "" else math.nan for cell in row]
        except ValueError:
            raise ValueError(
                f"{path} is not a readable lr_schedule.csv (line {number} holds something "
                "that is not a number)"
            ) from None
        for key, value in zip(header, values, strict=True):
            schedule[key].append(value)
    return schedule if rows else {}
