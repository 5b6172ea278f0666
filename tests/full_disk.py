"""A full disk for tests: files opened for writing under a folder fail like on a full disk.

Every file opened for writing there (``open``, ``io.open``, ``os.fdopen``, ``Path.write_text``,
fsspec's local files) writes half of what it is given, then raises ``OSError(ENOSPC)``,
as a write does when the file system fills up in the middle of it.

* in a test: ``fill(monkeypatch, folder)``;
* for a subprocess: ``python tests/full_disk.py FOLDER -m MODULE ARGS...`` runs
  ``python -m MODULE ARGS...`` with ``FOLDER`` full.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import runpy
import sys
from pathlib import Path
from typing import Any

_real_open = io.open


class _FullFile:
    """A file whose writes stop half-way with ENOSPC; anything else goes to the real file."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, data: Any) -> int:
        self._stream.write(data[: len(data) // 2])
        self._stream.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stream.close()


def _is_under(file: Any, folder: Path) -> bool:
    if isinstance(file, int):  # os.fdopen: the descriptor's file
        try:
            file = os.readlink(f"/proc/self/fd/{file}")
        except OSError:
            return False
    try:
        return Path(os.fspath(file)).resolve().is_relative_to(folder)
    except TypeError:
        return False


def _full_open(folder: Path):  # type: ignore[no-untyped-def]
    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        stream = _real_open(file, mode, *args, **kwargs)
        if any(flag in mode for flag in "wax+") and _is_under(file, folder):
            return _FullFile(stream)
        return stream

    return open_


def fill(monkeypatch: Any, folder: str | Path) -> None:
    """Make ``folder`` (and everything under it) full for the rest of the test."""
    opener = _full_open(Path(folder).resolve())
    monkeypatch.setattr(io, "open", opener)
    monkeypatch.setattr(builtins, "open", opener)


if __name__ == "__main__":  # full_disk.py FOLDER -m MODULE ARGS...
    folder, flag, module, *args = sys.argv[1:]
    assert flag == "-m", "usage: full_disk.py FOLDER -m MODULE ARGS..."
    io.open = builtins.open = _full_open(Path(folder).resolve())  # type: ignore[assignment]
    sys.argv = [module, *args]
    sys.path.insert(0, os.getcwd())  # as `python -m` does: the user's modules import
    runpy.run_module(module, run_name="__main__", alter_sys=True)
