"""Run dirs: the lock a training process holds on its run dir, and finding the newest
intact checkpoint of a run to resume from (``resume=<run dir>``).

:func:`find_resume_checkpoint` picks the newest checkpoint of a run dir that loads,
warning about any newer one that does not (a truncated file from an older writer).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from freezeft.checkpoint_io import load_checkpoint
from freezeft.files import write_text_atomic

__all__ = ["find_resume_checkpoint", "hold_run_dir", "run_dir_of"]

log = logging.getLogger(__name__)


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
