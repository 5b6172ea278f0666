"""A checkpoint on Ctrl+C, and what a resumed run needs to continue exactly.

:class:`InterruptCheckpoint` (a callback) turns Ctrl+C into Lightning's graceful stop:
after the running batch, ``interrupted.ckpt`` is written; a second Ctrl+C aborts at once.
Lightning itself stops the same way on SIGTERM. It also carries what a resumed run needs to
continue exactly: RNG states, training seconds, and the plateau schedulers' step that
Lightning skips at the end of a resumed epoch.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from typing_extensions import override

from freezeft._lightning import (
    CALLBACK_BASES,
    SIGTERM_EXCEPTIONS,
    pl,
    rank_zero_info,
    rank_zero_warn,
)
from freezeft.files import EXIT_CTRL_C, EXIT_SIGTERM

__all__ = [
    "INTERRUPTED_CHECKPOINT",
    "InterruptCheckpoint",
    "reroot_checkpoint_states",
    "rng_states",
    "set_rng_states",
]

log = logging.getLogger(__name__)

INTERRUPTED_CHECKPOINT = "interrupted.ckpt"


class InterruptCheckpoint(*CALLBACK_BASES):  # type: ignore[misc]
    """Write ``<dirpath>/interrupted.ckpt`` when training stops on SIGINT or SIGTERM.

    The checkpoint is taken between batches (Lightning raises its ``SIGTERMException``
    after a batch has finished), so resuming from it continues exactly where training
    stopped. Ctrl+C (SIGINT) is routed to the same graceful stop while training runs.
    Every checkpoint also carries the RNG states (torch, CUDA, NumPy, Python) of rank 0,
    restored when training starts again, so dropout draws the masks it would have drawn.

    Lightning never steps a ``ReduceLROnPlateau`` (epoch interval) at the end of the epoch
    it resumed in, and writes end-of-epoch checkpoints before that epoch's step, so without
    help a resumed run is one LR reduction behind. This callback makes that step itself,
    with the monitored value of the epoch: from its validation when the resumed run ran it,
    else the value saved in the checkpoint (the validation had finished before the stop).

    A run dir that was moved or copied keeps its best checkpoint: Lightning's
    ``ModelCheckpoint`` forgets the best score when its folder changed but keeps the old
    best path (another dir's file). Before the callbacks load their state, every
    ``ModelCheckpoint`` state recorded for another folder is re-rooted into ``dirpath``
    (paths and scores), and the move is logged.

    Args:
        dirpath: the run's checkpoint folder.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self.saved: Path | None = None
        #: the stop came from Ctrl+C (SIGINT), not SIGTERM
        self.ctrl_c = False
        self._previous_sigint: Any = None
        self._rng_to_restore: dict[str, Any] | None = None
        self._mid_validation = False
        #: training seconds of the run before this process resumed it (from the checkpoint)
        self.seconds_before = 0.0
        #: the plateau schedulers' monitored values when the checkpoint was written
        self._monitored_before: dict[str, float] = {}
        self._trainer: pl.Trainer | None = None  # what state_dict() reads them from now
        self._started: float | None = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None
        # resumed from an end-of-epoch checkpoint, written before that epoch's plateau step
        for config in _plateau_configs(trainer):
            if config.scheduler.last_epoch < trainer.current_epoch // config.frequency:
                self._step_plateau(trainer, pl_module, config, trainer.current_epoch - 1)
        if _in_main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._mid_validation:
            # Stopped inside the validation after a training epoch: resume re-runs that whole
            # validation (not its rest, whose metrics would lack the batches already seen),
            # then goes on with the next epoch. Lightning re-enters a validation it stopped
            # in when its progress says "batch 0 started, none processed".
            progress = checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]
            fresh = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
            progress.update(total=dict(fresh), current=dict(fresh), is_last_batch=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": rng_states(),
            "train_seconds": self.train_seconds(),
            "monitored": dict(self._monitored),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng_to_restore = state_dict.get("rng")
        self.seconds_before = float(state_dict.get("train_seconds", 0.0))
        self._monitored_before = dict(state_dict.get("monitored", {}))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # runs before any callback loads its state: ModelCheckpoint then finds its own folder
        moved = reroot_checkpoint_states(checkpoint, self.dirpath)
        if moved:
            rank_zero_info(
                f"freezeft: this run was moved or copied from {moved} to {self.dirpath.parent}; "
                "its best and last checkpoints are re-rooted there (the best is tested from "
                "this run dir)."
            )

    @property
    def _monitored(self) -> dict[str, float]:
        """The values the plateau schedulers monitor, as logged now."""
        if self._trainer is None:
            return {}
        metrics = self._trainer.callback_metrics
        monitors = [c.monitor for c in _plateau_configs(self._trainer)]
        return {key: float(metrics[key]) for key in monitors if key in metrics}

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fit_loop = trainer.fit_loop
        # Lightning steps plateau schedulers after this hook, except in a resumed epoch
        if not fit_loop.restarting or not fit_loop.epoch_loop._num_ready_batches_reached():
            return
        for config in _plateau_configs(trainer):
            if (trainer.current_epoch + 1) % config.frequency == 0:
                self._step_plateau(trainer, pl_module, config, trainer.current_epoch)

    def _step_plateau(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, config: Any, epoch: int
    ) -> None:
        """The plateau step Lightning skipped for ``epoch``, on that epoch's value."""
        value = trainer.callback_metrics.get(config.monitor)
        if value is None:
            value = self._monitored_before.get(config.monitor)
        if value is None:
            rank_zero_warn(
                f"freezeft: the run resumed after epoch {epoch}'s validation, but its "
                f"`{config.monitor}` is not in the checkpoint: the ReduceLROnPlateau step of "
                "that epoch is skipped, as Lightning does."
            )
            return
        pl_module.lr_scheduler_step(config.scheduler, value)

    @property
    def exit_code(self) -> int:
        """The exit code of a process this stopped: 130 for Ctrl+C, else 143 (SIGTERM)."""
        return EXIT_CTRL_C if self.ctrl_c else EXIT_SIGTERM

    def train_seconds(self) -> float:
        """Seconds the run has trained so far, the processes before a resume included."""
        now = time.perf_counter() - self._started if self._started is not None else 0.0
        return self.seconds_before + now

    def _on_sigint(self, signum: int, frame: Any) -> None:
        # the first Ctrl+C stops after this batch (via Lightning's SIGTERM path); a second
        # one restores the default handler's behaviour: stop now
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.ctrl_c = True
        log.warning("Ctrl+C: stopping after this batch with a checkpoint (Ctrl+C again: now).")
        os.kill(os.getpid(), signal.SIGTERM)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint()

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Ctrl+C while testing (scorer tuning included) also stops at the next check
        if _in_main_thread() and self._previous_sigint is None:
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore_sigint()
        if trainer.state.fn != "fit":  # TrainerFn.FITTING, a str enum
            return
        if not isinstance(exception, (*SIGTERM_EXCEPTIONS, KeyboardInterrupt)):
            return
        path = self.dirpath / INTERRUPTED_CHECKPOINT
        self._mid_validation = trainer.validating
        try:
            trainer.save_checkpoint(path)
        finally:
            self._mid_validation = False
        self.saved = path
        log.warning(f"Interrupted: wrote a resumable checkpoint to {path}")

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and _in_main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None


#: ``ModelCheckpoint`` state entries that hold a checkpoint path (or paths, as dict keys)
_PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")


def reroot_checkpoint_states(checkpoint: dict[str, Any], dirpath: str | Path) -> str | None:
    """Point every ``ModelCheckpoint`` state in ``checkpoint`` that was recorded for another
    folder at ``dirpath`` instead, in place; returns the run dir it came from (else None).

    A path under the recorded folder maps to the same name under ``dirpath``; the scores
    stay with their files.
    """
    new = os.path.realpath(dirpath)
    moved_from = None
    for state in (checkpoint.get("callbacks") or {}).values():
        if not isinstance(state, dict) or not {"dirpath", "best_model_path"} <= state.keys():
            continue
        old = state["dirpath"]
        if not isinstance(old, str) or old == new:
            continue

        def moved(path: Any, old: str = old) -> Any:
            if isinstance(path, str) and path.startswith(old + os.sep):
                return os.path.join(new, path[len(old) + 1 :])
            return path

        for key in _PATH_KEYS:
            if key in state:
                state[key] = moved(state[key])
        if isinstance(state.get("best_k_models"), dict):
            state["best_k_models"] = {moved(k): v for k, v in state["best_k_models"].items()}
        state["dirpath"] = new
        moved_from = str(Path(old).parent)
    return moved_from


def _plateau_configs(trainer: pl.Trainer) -> list[Any]:
    """The trainer's ``ReduceLROnPlateau`` schedulers stepped per epoch on a metric, as
    Lightning steps them (automatic optimization only)."""
    if not trainer.lightning_module.automatic_optimization:
        return []
    return [
        c
        for c in trainer.lr_scheduler_configs
        if c.reduce_on_plateau and c.interval == "epoch" and c.monitor
    ]


def rng_states() -> dict[str, Any]:
    """The states of torch's, NumPy's and Python's global RNGs (and CUDA's, if in use), as
    plain values and tensors (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {  # plain types and tensors: loadable with weights_only=True
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Put the global RNGs back as :func:`rng_states` found them."""
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
