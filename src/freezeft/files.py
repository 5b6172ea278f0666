"""Files freezeft writes about a run or a cache: written atomically, their errors in words.

:func:`atomic_write` (a stream) and :func:`write_text_atomic` write to a temporary file in
the target's folder, flush it to disk and rename it into place, so a kill or a full disk
leaves the previous file (or none), never a half-written or empty one. A write that fails
raises :class:`WriteError`, whose message is one line naming the file; for a full disk it
reads ``no space left on <folder> (N MiB free) while writing <file>``.

Example::

    write_text_atomic(run_dir / "results.json", json.dumps(results))
    with atomic_write(run_dir / "rows.csv", newline="") as stream:
        csv.writer(stream).writerows(rows)
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = [
    "WriteError",
    "atomic_write",
    "write_text_atomic",
    "write_bytes",
    "describe_write_error",
    "disk_full_message",
    "is_disk_full",
    "umask",
]

#: free space below which an error that gives no reason (torch reports a full disk as a
#: RuntimeError) is taken for a full disk
NEARLY_FULL = 64 * 2**20


class WriteError(OSError):
    """A write that failed: ``str()`` is one line that names :attr:`path` and says why.

    Args:
        code: the ``errno`` (``errno.ENOSPC`` for a full disk).
        message: the line.
        path: the file that could not be written.
    """

    def __init__(self, code: int, message: str, path: str | Path | None = None) -> None:
        super().__init__(code, message)
        self.path = Path(path) if path is not None else None

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[Any, ...]:  # pickles (a sweep's job) with its path
        return type(self), (self.errno, self.strerror, self.path)


def umask() -> int:
    """The process' umask (files are made ``0o666 & ~umask()``, folders ``0o777 & ~umask()``)."""
    current = os.umask(0o022)
    os.umask(current)
    return current


def free_bytes(folder: str | Path) -> int | None:
    """Free space on the file system that holds ``folder`` (its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_disk_full(err: BaseException, folder: str | Path | None = None) -> bool:
    """Whether ``err`` means the disk (or the user's quota) is full. An error without an
    errno (torch's RuntimeError) counts when ``folder`` has less than 64 MiB free."""
    code = getattr(err, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return True
    if code is None and folder is not None:
        free = free_bytes(folder)
        return free is not None and free < NEARLY_FULL
    return False


def no_space_left(path: str | Path, folder: str | Path | None = None) -> str:
    """``no space left on <folder> (N MiB free) while writing <path>``."""
    folder = Path(folder) if folder is not None else Path(path).parent
    free = free_bytes(folder)
    room = f" ({free / 2**20:.0f} MiB free)" if free is not None else ""
    return f"no space left on {folder}{room} while writing {path}"


def describe_write_error(err: BaseException, path: str | Path) -> str:
    """One line for a failed write of ``path``: for a full disk ``no space left on
    <folder> (N MiB free) while writing <path>``, else ``could not write <path>: <why>``."""
    if is_disk_full(err, Path(path).parent):
        return no_space_left(path)
    why = getattr(err, "strerror", None) or str(err).strip() or type(err).__name__
    return f"could not write {path}: {why.splitlines()[0]}"


def write_error(err: BaseException, path: str | Path, note: str = "") -> WriteError:
    """``err`` (an ``OSError``, or torch's ``RuntimeError``) as a :class:`WriteError` of
    ``path``; ``note`` is appended after a semicolon."""
    message = describe_write_error(err, path) + (f"; {note}" if note else "")
    code = errno.ENOSPC if is_disk_full(err, Path(path).parent) else None
    return WriteError(code or getattr(err, "errno", None) or errno.EIO, message, path)


def written_path(err: BaseException) -> Path | None:
    """The file a failed write was writing: the error's own path or file name, else the
    innermost open file in its traceback (an ``OSError`` from ``close()`` names none)."""
    if isinstance(err, WriteError) and err.path is not None:
        return err.path
    if getattr(err, "filename", None):
        return Path(err.filename)  # type: ignore[attr-defined]
    frames = []
    trace: TracebackType | None = err.__traceback__
    while trace is not None:
        frames.append(trace.tb_frame)
        trace = trace.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            name = getattr(value, "name", None) if isinstance(value, io.IOBase) else None
            if isinstance(name, str) and not name.startswith("<"):
                return Path(name)
    return None


def disk_full_message(err: BaseException, folder: str | Path) -> str | None:
    """For a full disk anywhere in ``err``'s chain (``ENOSPC``): one line naming the folder
    and the file being written (``folder`` when the error does not say); else ``None``."""
    seen: BaseException | None = err
    while seen is not None and getattr(seen, "errno", None) not in (errno.ENOSPC, errno.EDQUOT):
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        return None
    said = getattr(seen, "strerror", None)
    if isinstance(said, str) and "no space left on" in said:  # freezeft's own words already
        return said
    path = written_path(seen)
    if path is None:
        free = free_bytes(folder)
        room = f" ({free / 2**20:.0f} MiB free)" if free is not None else ""
        return f"no space left on {folder}{room} while writing into it"
    return no_space_left(path)


@contextmanager
def atomic_write(
    path: str | Path, mode: str = "w", *, encoding: str | None = "utf-8", newline: str | None = None
) -> Iterator[IO[Any]]:
    """A stream whose content replaces ``path`` when the block ends without an error.

    It writes a temporary file beside ``path`` (made with the umask's permissions), flushes
    it to disk and renames it over ``path``. On any error the temporary file is removed and
    ``path`` is as it was.

    Raises:
        WriteError: the file could not be written (a full disk, a missing or read-only
            folder); its message names ``path``.
    """
    path = Path(path)
    binary = "b" in mode
    try:
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise write_error(err, path) from None
    try:
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it 0600: teammates read runs
        with os.fdopen(
            handle, mode, encoding=None if binary else encoding, newline=None if binary else newline
        ) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, WriteError):
            raise
        previous = f"the previous {path.name} is intact" if path.exists() else ""
        raise write_error(err, path, previous) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` atomically (see :func:`atomic_write`).

    Raises:
        WriteError: the file could not be written; the message names it and, for a full
            disk, says ``no space left on <folder> (N MiB free)``.
    """
    with atomic_write(path, "w", encoding=encoding, newline="") as stream:
        stream.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (not atomically: for files inside a folder that is
    published as a whole, such as a cache entry being built).

    Raises:
        WriteError: as :func:`write_text_atomic`.
    """
    try:
        with open(path, "wb") as stream:
            stream.write(data)
    except OSError as err:
        raise write_error(err, path) from None
