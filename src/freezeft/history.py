"""What a run's report plots: dev metrics per epoch and each param group's LR per step.

:class:`History` is a Lightning callback that writes, into its folder and after every
validation and training epoch (so an interrupted run keeps what it had):

* ``history.json``: ``{"epochs": [{"epoch": 0, "val_cer": ..., "train_loss": ...}, ...],
  "decisions": [...]}``, the decisions strategies made as they went (a callback's
  ``decisions`` list, e.g. :class:`~freezeft.callbacks.AutoFreeze`'s freezes);
* ``lr_schedule.csv``: ``step,epoch,<group>,...``, the LR each param group trained at in
  that optimizer step: after warmup factors, and 0 while the group is frozen.

The LR it records is the one the optimizer step used, warmup included, wherever it stands
in ``trainer.callbacks`` (warmup is applied inside the step, before the closure that calls
``on_before_optimizer_step``). Its records travel in checkpoints, so a resumed run's files
cover the whole run.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from typing_extensions import override

from freezeft._lightning import CALLBACK_BASES, pl
from freezeft.files import atomic_write, write_text_atomic

__all__ = ["History", "read_decisions", "read_history", "read_lr_schedule"]

HISTORY_FILE = "history.json"
LR_FILE = "lr_schedule.csv"


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

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if not trainer.is_global_zero:
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
        self._record(trainer, "train_")

    def _record(self, trainer: pl.Trainer, prefix: str) -> None:
        # Every rank reads the metrics: reading them runs the `sync_dist` reductions of the
        # epoch's logged values, collectives the other ranks must join (rank 0 alone waited
        # in one while the others were in the next callback's reduce: a gloo mismatch).
        logged = trainer.callback_metrics
        if not trainer.is_global_zero:
            return
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
        with atomic_write(self.folder / LR_FILE, newline="") as stream:
            writer = csv.DictWriter(stream, ["step", "epoch", *self.group_names], restval="")
            writer.writeheader()
            writer.writerows(self.lr_rows)


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
