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
import json
import logging
import os
import pickletools
import random
import shutil
import signal
import socket
import tempfile
import threading
import time
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
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
from freezeft.files import write_text_atomic

__all__ = [
    "AtomicCheckpointIO",
    "InterruptCheckpoint",
    "INTERRUPTED_CHECKPOINT",
    "check_checkpoint_fits",
    "find_resume_checkpoint",
    "hold_run_dir",
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

    A checkpoint that needs code to load (a pickle that imports callables torch does not
    allow in a weights-only load) is refused, so a downloaded or tampered file cannot run
    anything. ``trusted=True`` loads it anyway: only for a file whose origin you trust.
    A zip that ``torch.save`` cannot have written (compressed entries, sizes that do not add
    up: a zip bomb unpacks to far more memory than the file's size) is refused before
    anything is loaded; a damaged one (a tensor's record missing or cut short) says which.

    Raises:
        FileNotFoundError: ``path`` does not exist (IsADirectoryError: it is a folder).
        ValueError: the file is not readable (truncated, damaged, another format), it is not
            a zip torch.save writes, or it needs code to load.
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
    _refuse_a_zip_torch_never_writes(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as err:
        code = [] if trusted else _code_it_imports(path)
        if code:
            named = ", ".join(code[:3]) + (f" and {len(code) - 3} more" if len(code) > 3 else "")
            raise ValueError(
                f"{path} was refused: loading it would run code it carries (it imports "
                f"{named}, which a weights-only load does not allow). freezeft loads "
                "checkpoints as weights only, and its own checkpoints never need more. If you "
                "trust where the file came from, re-save its tensors (torch.load with "
                "weights_only=False, then torch.save of the state dict), or, for python -m "
                "freezeft.transcribe, pass --trust-checkpoint."
            ) from None
        damage = _damage(path)
        if damage is not None:
            raise ValueError(
                f"{path} {damage}; use another checkpoint of the run, or write this one again."
            ) from None
        head = _head(path)
        if not head.startswith((b"PK", b"\x80")):  # neither a zip nor a pickle
            begins = f"it begins with {head!r}" if head else "it is empty"
            raise ValueError(
                f"{path} is not a readable checkpoint: torch.save writes a zip archive (or a "
                f"pickle, in its legacy format), and this file is neither ({begins}); give "
                "a checkpoint torch.save or Lightning wrote."
            ) from None
        raise ValueError(
            f"{path} is not a readable checkpoint (truncated or not written by torch.save): "
            f"{type(err).__name__}: {_first_line(err)}"
        ) from None
    return checkpoint


def _head(path: Path) -> bytes:
    try:
        with path.open("rb") as stream:
            return stream.read(16)
    except OSError:
        return b""


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


def check_checkpoint_fits(module: torch.nn.Module, path: str | Path) -> None:
    """Refuse a Lightning checkpoint whose tensors have other shapes than ``module``'s of
    the same names (a checkpoint of another model size): before Lightning's load, which
    would stop with a ``size mismatch`` traceback.

    The tensors are mapped, not read (``mmap``), where the file allows it.

    Raises:
        ValueError: naming the file, the first mismatched tensors and both shapes.
    """
    _refuse_a_zip_torch_never_writes(Path(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy format (no mmap): the plain read, with its errors in words
        checkpoint = load_checkpoint(path)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a Lightning checkpoint (it has no `state_dict`).")
    own = module.state_dict()
    mismatched = [
        f"{name} is {tuple(tensor.shape)} there, {tuple(own[name].shape)} here"
        for name, tensor in state.items()
        if isinstance(tensor, torch.Tensor)
        and isinstance(own.get(name), torch.Tensor)
        and not isinstance(own[name], torch.nn.parameter.UninitializedTensorMixin)
        and tensor.shape != own[name].shape
    ]
    if mismatched:
        more = f"; and {len(mismatched) - 3} more" if len(mismatched) > 3 else ""
        raise ValueError(
            f"{path} does not fit this run's model: {'; '.join(mismatched[:3])}{more}. The "
            "checkpoint was made with other settings (another model size?) than its run dir "
            "records in .hydra/config.yaml: resume with a checkpoint this run wrote, or start "
            "a new run with the settings the checkpoint was made with."
        )


def _refuse_a_zip_torch_never_writes(path: Path) -> None:
    """Refuse, from its directory alone, a zip whose entries could unpack to more than the
    file holds: torch.save stores every entry uncompressed, each once."""
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (OSError, zipfile.BadZipFile, ValueError):  # torch.load says what is wrong
        return
    size = path.stat().st_size
    compressed = [e for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if compressed:
        largest = max(compressed, key=lambda e: e.file_size)
        others = f"; {len(compressed) - 1} more of its entries are" if compressed[1:] else ""
        raise ValueError(
            f"{path} was refused before loading: its entry {largest.filename} is compressed "
            f"({largest.compress_size:,} bytes that unpack to {largest.file_size:,}{others}), "
            "which torch.save never writes: a compressed checkpoint can unpack to more than "
            "the memory holds (a zip bomb). Use the checkpoint as torch.save wrote it."
        )
    declared = sum(e.file_size for e in entries)
    uneven = [e for e in entries if e.file_size != e.compress_size]
    beyond = [e for e in entries if e.header_offset + e.compress_size > size]
    if uneven or beyond or declared > size:
        first = (uneven or beyond or entries)[0]
        raise ValueError(
            f"{path} was refused before loading: its zip directory declares "
            f"{declared:,} bytes of entries in a file of {size:,} bytes (e.g. "
            f"{first.filename}: {first.file_size:,} bytes), which torch.save never writes: "
            "the entries overlap or the directory was altered. Use the checkpoint as torch.save "
            "wrote it."
        )


def _allowed_globals() -> set[str]:
    """What torch's weights-only unpickler imports: its own list and the user's
    ``torch.serialization.add_safe_globals``."""
    from torch import _weights_only_unpickler as unpickler

    try:
        return set(unpickler._get_allowed_globals()) | set(unpickler._get_user_allowed_globals())
    except AttributeError:  # another torch: what torch.save writes for tensors, at least
        return {
            "collections.OrderedDict",
            "torch._utils._rebuild_tensor_v2",
            "torch._utils._rebuild_parameter",
            *(f"torch.{t.__name__}" for t in torch._storage_classes),
        }


class _PickleFacts:
    """What a pickle imports and which tensor records it points at, read without running
    it: ``imports`` (``module.name``), ``records`` ((tensor name or None, record key,
    storage type, elements)) and whether it was read to its end (``complete``)."""

    def __init__(self) -> None:
        self.imports: list[str] = []
        self.records: list[tuple[str | None, str, str, int]] = []
        self.complete = False


_STRING_OPS = {
    "UNICODE",
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
}
_INT_OPS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}
#: opcodes that close a MARK
_MARK_CLOSERS = {"TUPLE", "LIST", "DICT", "APPENDS", "SETITEMS", "ADDITEMS", "FROZENSET", "OBJ"}
_MARK_CLOSERS |= {"INST", "POP_MARK"}
_OTHER = object()  # a value the walk does not follow (a container, a call's result)


def _global_name(module: str, name: str) -> str:
    from torch._utils import IMPORT_MAPPING, NAME_MAPPING  # protocol 2's Python 2 names

    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _read_pickle(stream: Any, facts: _PickleFacts) -> bool:
    """Walk one pickle of ``stream`` into ``facts``; False where it ends before its STOP.

    Only what names a callable or a tensor record is followed: the strings, numbers and
    imports pushed, the tuples built of them, and the memo of those.
    """
    memo: dict[Any, Any] = {}
    marks: list[list[Any]] = []
    pushed: list[Any] = [_OTHER, _OTHER]  # the last two values pushed (STACK_GLOBAL's)
    top: Any = _OTHER
    last_string: str | None = None
    tensor_name: str | None = None  # the dict key a tensor being rebuilt is stored under
    try:
        for op, arg, _ in pickletools.genops(stream):
            kind = op.name
            value: Any = _OTHER
            if kind == "STOP":
                return True
            if kind in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo[len(memo) if kind == "MEMOIZE" else arg] = top
                continue
            if kind == "MARK":
                marks.append([])
                top = _OTHER
                continue
            if kind in _STRING_OPS:
                value = arg.decode("latin-1") if isinstance(arg, bytes) else arg
            elif kind in _INT_OPS:
                value = arg
            elif kind in ("GET", "BINGET", "LONG_BINGET"):
                value = memo.get(arg, _OTHER)
            elif kind in ("GLOBAL", "INST", "STACK_GLOBAL"):
                if kind == "STACK_GLOBAL":
                    module, name = pushed
                    known = isinstance(module, str) and isinstance(name, str)
                    full = f"{module}.{name}" if known else "<a global it names indirectly>"
                else:
                    module, _, name = arg.partition(" ")
                    full = _global_name(module, name)
                facts.imports.append(full)
                value = ("global", full) if kind != "INST" else _OTHER
            elif kind == "BINPERSID" and isinstance(top, tuple) and len(top) >= 5:
                tag, storage, key, _location, numel = top[:5]
                if tag == "storage" and isinstance(key, str) and isinstance(numel, int):
                    storage = storage[1] if isinstance(storage, tuple) else "?"
                    facts.records.append((tensor_name, key, storage.split(".")[-1], numel))
            if kind in _MARK_CLOSERS:
                items = marks.pop() if marks else []
                if kind == "TUPLE":
                    value = tuple(items)
            if isinstance(value, str):
                last_string = value
            elif isinstance(value, tuple) and value[:1] == ("global",):
                if value[1].startswith(("torch._utils._rebuild_", "torch._tensor._rebuild_")):
                    tensor_name = last_string
            top = value
            pushed = [pushed[1], value]
            if marks and kind not in _MARK_CLOSERS:
                marks[-1].append(value)
    except Exception:  # cut short, or bytes that are no pickle
        return False
    return False


def _pickle_facts(path: Path) -> _PickleFacts | None:
    """The facts of the file's pickle (a torch.save zip's data.pkl, or a bare or legacy
    torch.save file), or None where it holds no pickle."""
    facts = _PickleFacts()
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return None
                with archive.open(name) as stream:
                    if stream.peek(1)[:1] != b"\x80":
                        return None
                    facts.complete = _read_pickle(stream, facts)
            return facts
        with path.open("rb") as stream:
            # torch's legacy format is several pickles in a row (magic number, protocol,
            # system info, the objects, their storages' keys), followed by raw tensor data
            for _ in range(5):
                if stream.peek(1)[:1] != b"\x80":  # every pickle torch writes opens so
                    break
                facts.complete = _read_pickle(stream, facts)
                if not facts.complete:
                    break
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError):
        pass  # what was read is what it shows
    return facts if facts.imports or facts.records or facts.complete else None


def _code_it_imports(path: Path) -> list[str]:
    """The callables the file's pickle imports that a weights-only load refuses (empty for
    a file that is no pickle or imports nothing else), read without running it."""
    facts = _pickle_facts(path)
    if facts is None:
        return []
    allowed = _allowed_globals()
    return list(dict.fromkeys(name for name in facts.imports if name not in allowed))


def _damage(path: Path) -> str | None:
    """What is missing from a torch.save zip, or cut short in it; None if nothing is found."""
    try:
        if not zipfile.is_zipfile(path):
            with path.open("rb") as stream:
                if stream.read(4) == b"PK\x03\x04":
                    return (
                        f"is truncated: it ends after {path.stat().st_size:,} bytes, before "
                        "the zip directory torch.save writes last (a killed write, or a copy "
                        "cut short)"
                    )
            return None
        damaged = "is damaged (cut short or altered after torch.save wrote it): "
        with zipfile.ZipFile(path) as archive:
            entries = {e.filename: e for e in archive.infolist()}
        pickle = next((n for n in entries if n.endswith("data.pkl")), None)
        if pickle is None:
            return damaged + "it holds no data.pkl, the record of its objects"
        facts = _pickle_facts(path)
        if facts is None or not facts.complete:
            return damaged + f"its {pickle}, the record of its objects, ends early"
        prefix = pickle[: -len("data.pkl")]
        for tensor, key, storage, numel in facts.records:
            what = f"the tensor `{tensor}`'s record data/{key}" if tensor else f"record data/{key}"
            entry = entries.get(f"{prefix}data/{key}")
            if entry is None:
                return damaged + f"{what} is missing"
            try:
                dtype = torch.serialization.StorageType(storage).dtype
                expected = numel * torch.empty((), dtype=dtype).element_size()
            except Exception:  # a storage type this torch does not know: sizes unchecked
                continue
            if entry.file_size != expected:
                return damaged + (
                    f"{what} holds {entry.file_size:,} bytes, not the {expected:,} of its "
                    f"{numel:,} {str(dtype).removeprefix('torch.')} values"
                )
        with zipfile.ZipFile(path) as archive:
            corrupt = archive.testzip()  # streams every entry against its checksum
        if corrupt is not None:
            return damaged + f"its entry {corrupt} fails its checksum"
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError) as err:
        return f"is damaged: its zip cannot be read ({type(err).__name__}: {_first_line(err)})"
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


#: in a run dir: the lock its training process holds, and who holds it (JSON)
RUN_LOCK = ".run.lock"
RUN_LOCK_HOLDER = ".run.lock.json"
#: where a process learns its rank before torch.distributed starts (Lightning's, SLURM's)
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def _launching_process() -> bool:
    """Whether this process is rank 0 (or no distributed run): the one that holds the lock;
    the processes Lightning starts for the other ranks train into the same run dir."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) != 0:
            return False
    return True


@contextmanager
def hold_run_dir(run_dir: str | Path, *, resume: str | None = None) -> Iterator[None]:
    """Hold ``run_dir``'s lock (``.run.lock``, non-blocking) while training into it: a
    second process that would train into the same dir, a second ``resume=`` of it or a run
    given the same ``hydra.run.dir``, is refused instead of interleaving its checkpoints and
    logs with the first's. The holder's pid is recorded in ``.run.lock.json``. Only rank 0
    of a distributed run takes the lock. A process that dies releases it (an OS lock).

    Example::

        with hold_run_dir(output_dir):
            trainer.fit(module, datamodule=data)

    Raises:
        ValueError: another process holds the lock, naming its pid and what to do.
    """
    run_dir = Path(run_dir)
    if not _launching_process():
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / RUN_LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ValueError(_busy(run_dir, resume)) from None
    holder = run_dir / RUN_LOCK_HOLDER
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
        write_text_atomic(holder, json.dumps(record))
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


def _busy(run_dir: Path, resume: str | None) -> str:
    """Who holds ``run_dir``'s lock, and what to do, in one line."""
    try:
        record = json.loads((run_dir / RUN_LOCK_HOLDER).read_text())
        pid, host, since = int(record["pid"]), str(record["host"]), str(record["since"])
    except (OSError, ValueError, KeyError, TypeError):
        who, kill = "another process (it has not recorded its pid yet)", ""
    else:
        where = "" if host == socket.gethostname() else f" on {host}"
        who, kill = f"process {pid}{where} (since {since})", f"kill {pid}{where}; "
    if resume is not None:
        return (
            f"resume={resume}: {run_dir} is in use: {who} trains into it now, and a second "
            "resume would interleave their checkpoints and logs. Wait for it to finish, or "
            f"stop it ({kill}it then writes a resumable checkpoint), and resume again."
        )
    stop = f" or stop it ({kill.removesuffix('; ')})" if kill else ""
    return (
        f"{run_dir} is in use: {who} trains into it now, and a second run there would "
        "interleave their checkpoints and logs. Give this run its own dir (leave "
        f"hydra.run.dir to Hydra), or wait for that one to finish{stop}."
    )


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
