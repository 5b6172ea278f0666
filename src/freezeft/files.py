"""Files freezeft writes about a run or a cache: written atomically, their errors in words.

:func:`atomic_write` (a stream) and :func:`write_text_atomic` write to a temporary file in
the target's folder, flush it to disk and rename it into place, so a kill or a full disk
leaves the previous file (or none), never a half-written or empty one. A write that fails
raises :class:`WriteError`, whose message is one line naming the file; for a full disk it
reads ``no space left on <folder> (N MiB free) while writing <file>``. Ctrl+C or SIGTERM
in the middle of an atomic write removes its temporary file too (:func:`atomic_write`);
:func:`signals_raise` turns SIGTERM into :class:`Terminated` for a command that says in
one line that it was stopped.

:func:`read_text_capped` reads a file that something else wrote (a job's results) only if
it is a regular file of a bounded size (:func:`check_regular_file`): never a FIFO (which
would block), a device such as ``/dev/zero`` (endless) or a file of gigabytes.

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
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = [
    "EXIT_CTRL_C",
    "EXIT_SIGTERM",
    "WriteError",
    "Terminated",
    "atomic_write",
    "signals_raise",
    "read_text_capped",
    "check_regular_file",
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


#: the exit codes of a process stopped by Ctrl+C (128 + SIGINT) and by SIGTERM (128 + 15),
#: as a shell reports a process those signals ended
EXIT_CTRL_C, EXIT_SIGTERM = 130, 143


class Terminated(BaseException):
    """SIGTERM, raised where the process was (:func:`signals_raise`), so that ``finally``
    blocks and :func:`atomic_write`'s cleanup run before the process ends. Like
    ``KeyboardInterrupt`` it is no ``Exception``: ``except Exception`` lets it through."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"stopped by {signal.Signals(signum).name}")


def _in_main_thread() -> bool:
    """Whether this is the thread Python runs signal handlers in (the only one that may
    set them)."""
    return threading.current_thread() is threading.main_thread()


@contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block Ctrl+C raises ``KeyboardInterrupt`` and SIGTERM raises
    :class:`Terminated`, whatever handlers were set before (they come back after), so that
    cleanup runs and a command can say in one line that it was stopped. In a thread other
    than the main one it changes nothing.

    Example::

        with signals_raise():
            try:
                write_report(sweep_dir)
            except (KeyboardInterrupt, Terminated):
                sys.exit("freezeft: interrupted")
    """
    if not _in_main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


@contextmanager
def _sigterm_after_cleanup() -> Iterator[None]:
    """Within the block a SIGTERM that would end the process on the spot (no handler is
    set) raises :class:`Terminated` instead, so that the block cleans up; then the signal
    ends the process as it would have. A handler someone set is left alone."""
    if not _in_main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    received: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        received.append(signum)
        _raise_terminated(signum, frame)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is stop:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if received:  # cleaned up: now end as the signal would have ended the process
            os.kill(os.getpid(), signal.SIGTERM)


@contextmanager
def atomic_write(
    path: str | Path, mode: str = "w", *, encoding: str | None = "utf-8", newline: str | None = None
) -> Iterator[IO[Any]]:
    """A stream whose content replaces ``path`` when the block ends without an error.

    It writes a temporary file beside ``path`` (made with the umask's permissions), flushes
    it to disk and renames it over ``path``. On any error, Ctrl+C (``KeyboardInterrupt``)
    or SIGTERM the temporary file is removed and ``path`` is as it was. A SIGTERM without a
    handler then ends the process as it would have; one that a handler turns into an
    exception (:func:`signals_raise`) goes on as that exception.

    Raises:
        WriteError: the file could not be written (a full disk, a missing or read-only
            folder); its message names ``path``.
    """
    path = Path(path)
    binary = "b" in mode
    with _sigterm_after_cleanup():
        tmp: str | None = None
        try:
            handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it 0600: teammates read runs
            with os.fdopen(
                handle,
                mode,
                encoding=None if binary else encoding,
                newline=None if binary else newline,
            ) as stream:
                yield stream
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(tmp, path)
        except OSError as err:
            if tmp is None:  # no temporary file was made
                raise write_error(err, path) from None
            Path(tmp).unlink(missing_ok=True)
            if isinstance(err, WriteError):
                raise
            previous = f"the previous {path.name} is intact" if path.exists() else ""
            raise write_error(err, path, previous) from None
        except BaseException:
            if tmp is not None:
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


def _size(count: int) -> str:
    """``17 MiB``, ``1.5 MiB`` or ``300 bytes``."""
    if count < 2**20:
        return f"{count} bytes"
    return f"{count / 2**20:.1f}".removesuffix(".0") + " MiB"


def _not_regular(mode: int) -> str | None:
    """What a file of ``mode`` is when it is not a regular file (None when it is one)."""
    if stat.S_ISREG(mode):
        return None
    kinds = [
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (a named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ]
    return next((kind for test, kind in kinds if test(mode)), "a special file")


def check_regular_file(path: str | Path, limit: int, what: str = "this file") -> None:
    """Refuse ``path`` unless it is a regular file (or a link to one) of at most ``limit``
    bytes, without opening it: a FIFO would block a read until something writes into it,
    a device such as ``/dev/zero`` never ends.

    Raises:
        OSError: ``path`` cannot be looked at (missing, no permission).
        ValueError: it is not a regular file or is larger than ``limit``; ``str()`` says
            which, without the path: ``is a FIFO (a named pipe), not a regular file``,
            ``is too large for a results.json (17 MiB, more than 16 MiB)``.
    """
    _check_stat(os.stat(path), limit, what)


def _check_stat(info: os.stat_result, limit: int, what: str) -> None:
    kind = _not_regular(info.st_mode)
    if kind is not None:
        raise ValueError(f"is {kind}, not a regular file")
    if info.st_size > limit:
        raise ValueError(
            f"is too large for {what} ({_size(info.st_size)}, more than {_size(limit)})"
        )


def read_text_capped(
    path: str | Path, limit: int, what: str = "this file", encoding: str = "utf-8"
) -> str:
    """The text of ``path``, a regular file (or a link to one) of at most ``limit`` bytes
    (:func:`check_regular_file`). A file swapped in after that check is opened without
    blocking and checked again; one that grows past ``limit`` while it is read is refused.

    Raises:
        OSError: ``path`` cannot be opened or read (missing, no permission).
        ValueError: it is not a regular file, is larger than ``limit``
            (:func:`check_regular_file`'s words) or is not text in ``encoding``
            (``UnicodeDecodeError``).
    """
    check_regular_file(path, limit, what)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    handle = os.open(path, flags)
    try:
        _check_stat(os.fstat(handle), limit, what)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(handle, min(2**20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(handle)
    if size > limit:
        raise ValueError(f"is too large for {what} (more than {_size(limit)})")
    return b"".join(chunks).decode(encoding)
