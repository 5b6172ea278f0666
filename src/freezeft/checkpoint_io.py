"""Checkpoint files: written atomically, read without running code.

* :class:`AtomicCheckpointIO` (a Trainer plugin) writes each checkpoint to a temporary
  file in the same folder and renames it into place, so a kill mid-write never leaves a
  half-written ``last.ckpt`` behind.
* :func:`read_checkpoint_file` reads any checkpoint or state-dict file weights-only, after
  :mod:`freezeft.checkpoint_safety` has refused what it must (a zip bomb) and so that a
  damaged, truncated or code-carrying file is named as such.
* :func:`check_checkpoint_fits` compares a checkpoint's tensors with a module's shapes.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from typing_extensions import override

from freezeft._lightning import (
    PACKAGE,
    fabric_of,
)
from freezeft.cache import umask
from freezeft.checkpoint_safety import code_it_imports, damage, refuse_a_zip_torch_never_writes
from freezeft.text import first_line

__all__ = ["AtomicCheckpointIO", "check_checkpoint_fits", "load_checkpoint", "read_checkpoint_file"]

log = logging.getLogger(__name__)


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
    refuse_a_zip_torch_never_writes(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as err:
        code = [] if trusted else code_it_imports(path)
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
        damaged = damage(path)
        if damaged is not None:
            raise ValueError(
                f"{path} {damaged}; use another checkpoint of the run, or write this one again."
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
            f"{type(err).__name__}: {first_line(err)}"
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
    refuse_a_zip_torch_never_writes(Path(path))
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
