"""Checkpoints that survive being killed: atomic writes, a checkpoint on SIGINT/SIGTERM,
and finding the newest intact checkpoint of a run to resume from.

* :class:`AtomicCheckpointIO` (a Trainer plugin) writes each checkpoint to a temporary
  file in the same folder and renames it into place, so a kill mid-write never leaves a
  half-written ``last.ckpt`` behind.
* :class:`InterruptCheckpoint` (a callback) turns Ctrl+C into Lightning's graceful stop:
  after the running batch, ``interrupted.ckpt`` is written; a second Ctrl+C aborts at
  once. Lightning itself stops the same way on SIGTERM. It also carries what a resumed run
  needs to continue exactly: RNG states, training seconds, and the plateau schedulers' step
  that Lightning skips at the end of a resumed epoch.
* :func:`find_resume_checkpoint` picks the newest checkpoint of a run dir that loads,
  warning about any newer one that does not (a truncated file from an older writer).
"""

from __future__ import annotations

import errno
import io
import logging
import os
import pickletools
import random
import shutil
import signal
import tempfile
import threading
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from typing_extensions import override

from freezeft._lightning import (
    CALLBACK_BASES,
    PACKAGE,
    SIGTERM_EXCEPTIONS,
    fabric_of,
    pl,
    rank_zero_info,
    rank_zero_warn,
)
from freezeft.cache import umask

__all__ = [
    "AtomicCheckpointIO",
    "InterruptCheckpoint",
    "INTERRUPTED_CHECKPOINT",
    "find_resume_checkpoint",
    "load_checkpoint",
    "read_checkpoint_file",
    "reroot_checkpoint_states",
    "run_dir_of",
]

log = logging.getLogger(__name__)

INTERRUPTED_CHECKPOINT = "interrupted.ckpt"


class AtomicCheckpointIO(fabric_of(PACKAGE).plugins.io.torch_io.TorchCheckpointIO):  # type: ignore[misc]
    """``torch.save`` to a temporary sibling file, flushed to disk, then renamed into place."""

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                "AtomicCheckpointIO does not take `storage_options`; "
                f"got {storage_options!r} for {path}."
            )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it 0600: teammates read runs
            with os.fdopen(handle, "wb") as stream:
                torch.save(checkpoint, stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:  # torch reports a full disk as RuntimeError
            Path(tmp).unlink(missing_ok=True)
            previous = (
                f"the previous {path.name} is intact" if path.exists() else "nothing was lost"
            )
            free = shutil.disk_usage(path.parent).free
            if getattr(err, "errno", None) == errno.ENOSPC or free < 64 * 2**20:
                reason = f"no space left on {path.parent} ({free / 2**20:.0f} MiB free)"
            else:
                reason = f"{type(err).__name__}: {err}".splitlines()[0]
            raise OSError(
                getattr(err, "errno", None) or errno.EIO,
                f"could not write the checkpoint {path}: {reason}; {previous}",
            ) from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


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
            _set_rng_states(self._rng_to_restore)
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
            "rng": _get_rng_states(),
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

    def train_seconds(self) -> float:
        """Seconds the run has trained so far, the processes before a resume included."""
        now = time.perf_counter() - self._started if self._started is not None else 0.0
        return self.seconds_before + now

    def _on_sigint(self, signum: int, frame: Any) -> None:
        # the first Ctrl+C stops after this batch (via Lightning's SIGTERM path); a second
        # one restores the default handler's behaviour: stop now
        signal.signal(signal.SIGINT, signal.default_int_handler)
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


def _get_rng_states() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {  # plain types and tensors: loadable with weights_only=True
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def read_checkpoint_file(path: str | Path, *, trusted: bool = False) -> Any:
    """What ``torch.save`` wrote to ``path``, loaded on the CPU as weights only; errors name
    the file.

    A checkpoint that needs code to load (a pickle with objects torch does not allow in a
    weights-only load) is refused, so a downloaded or tampered file cannot run anything.
    ``trusted=True`` loads it anyway: only for a file whose origin you trust.

    Raises:
        FileNotFoundError: ``path`` does not exist (IsADirectoryError: it is a folder).
        ValueError: the file is not readable (truncated, another format), or it needs code
            to load.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(str(p.relative_to(path)) for p in path.rglob("*.ckpt"))[:5]
        raise IsADirectoryError(
            errno.EISDIR,
            f"{path} is a folder, not a checkpoint file; give a .ckpt file"
            + (f", e.g. one of {found}" if found else ""),
        )
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as err:
        if not trusted and _calls_code(path):
            raise ValueError(
                f"{path} was refused: loading it would run code it carries (it names "
                "callables a weights-only load does not allow). freezeft loads checkpoints as "
                "weights only, and its own checkpoints never need more. If you trust where "
                "the file came from, re-save its tensors (torch.load with "
                "weights_only=False, then torch.save of the state dict), or, for python -m "
                "freezeft.transcribe, pass --trust-checkpoint."
            ) from None
        raise ValueError(
            f"{path} is not a readable checkpoint (truncated or not written by torch.save): "
            f"{type(err).__name__}: {_first_line(err)}"
        ) from None
    return checkpoint


def load_checkpoint(path: str | Path, *, trusted: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint, read by :func:`read_checkpoint_file`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a (complete) Lightning checkpoint, or it needs code to load.
    """
    checkpoint = read_checkpoint_file(path, trusted=trusted)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (it has no `state_dict`).")
    return checkpoint


#: pickle opcodes that import or call something: what a weights-only load refuses
_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX"}


def _calls_code(path: Path) -> bool:
    """Whether the file is a pickle (bare, or a torch.save zip's data.pkl) that imports or
    calls something, read without running it."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                data = archive.read(name)
        else:
            data = path.read_bytes()
    except Exception:  # unreadable
        return False
    if not data.startswith(b"\x80"):  # every pickle torch writes opens with its protocol
        return False
    # torch's legacy format is several pickles in a row (magic number, protocol, system
    # info, then the objects), followed by raw tensor data
    stream = io.BytesIO(data)
    for _ in range(8):
        try:
            if any(op.name in _CODE_OPCODES for op, _, _ in pickletools.genops(stream)):
                return True
        except Exception:  # no (further) pickle: tensor bytes, truncated, another format
            return False
        if stream.tell() >= len(data):
            return False
    return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run_dir_of(target: str | Path) -> Path:
    """The run dir a ``resume=`` target names: the target itself, or for a ``.ckpt`` file
    the run dir holding its ``checkpoints/`` folder (else the file's folder)."""
    target = Path(target)
    if not target.is_file():
        return target
    return target.parent.parent if target.parent.name == "checkpoints" else target.parent


def find_resume_checkpoint(target: str | Path) -> tuple[Path, Path]:
    """``(run dir, checkpoint)`` to resume ``target``: a run dir or a ``.ckpt`` in one.

    For a run dir, its ``checkpoints/*.ckpt`` are tried newest first; one that does not
    load is skipped with a warning, so a truncated last checkpoint falls back to the
    previous good one.

    Raises:
        FileNotFoundError: ``target`` does not exist or holds no checkpoint.
        ValueError: ``target`` is a file that is not a checkpoint, or none of the run's
            checkpoints loads.
    """
    target = Path(target)
    if target.is_file():
        load_checkpoint(target)
        return run_dir_of(target), target
    if not target.is_dir():
        raise FileNotFoundError(
            f"Cannot resume {target}: no such run dir or checkpoint. Pass `resume=` a run dir "
            "(outputs/<date>/<time>) or a .ckpt file."
        )
    candidates = sorted(
        (target / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    if not candidates and any(target.glob("*.ckpt")):
        raise FileNotFoundError(
            f"Cannot resume {target}: it is a folder of checkpoints, not a run dir (a run "
            f"dir holds checkpoints/, .hydra/ and its logs). Pass the run dir "
            f"({target.parent}, if this is its checkpoints/ folder) or one .ckpt file."
        )
    if not candidates:
        raise FileNotFoundError(
            f"Cannot resume {target}: {target / 'checkpoints'} holds no .ckpt file "
            "(the run stopped before its first checkpoint; start it again instead)."
        )
    problems = []
    for candidate in candidates:
        try:
            load_checkpoint(candidate)
        except ValueError as err:
            problems.append(str(err))
            continue
        for problem in problems:
            warnings.warn(f"Skipping a bad checkpoint: {problem}; using {candidate}.", stacklevel=2)
        return target, candidate
    raise ValueError(f"No checkpoint of {target} loads: " + "; ".join(problems))
