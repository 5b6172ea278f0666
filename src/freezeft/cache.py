"""Build-once cache entries: locked across processes, published atomically.

An entry is a folder that is built in a temporary sibling, marked complete, then renamed
into place; a half-built entry (a killed process) is never used and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

__all__ = ["default_cache_dir", "config_key", "cached_entry", "umask"]

_COMPLETE = "COMPLETE"


def default_cache_dir() -> Path:
    """``$FREEZEFT_CACHE_DIR``, else ``$XDG_CACHE_HOME/freezeft``, else ``~/.cache/freezeft``."""
    if os.environ.get("FREEZEFT_CACHE_DIR"):
        return Path(os.environ["FREEZEFT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "freezeft"


def config_key(settings: dict) -> str:
    """A short stable hash of JSON-serialisable settings."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cached_entry(path: Path, build: Callable[[Path], None], settings: dict | None = None) -> Path:
    """Return the complete cache folder ``path``, calling ``build(tmp_dir)`` first if needed.

    Concurrent callers (parallel sweep jobs) wait on a file lock; exactly one builds.
    ``settings`` are written beside the entry as ``settings.json`` for people to read.
    """
    path = Path(path)
    if (path / _COMPLETE).exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        lock.acquire()
    except OSError as err:
        raise OSError(
            err.errno,
            f"cannot build the cache entry {path}: {err.strerror or err} (is the cache folder "
            "read-only?). Point paths.cache_dir (or $FREEZEFT_CACHE_DIR) at a writable folder",
        ) from None
    try:
        if (path / _COMPLETE).exists():
            return path
        if path.exists():  # left behind by a build that did not finish
            shutil.rmtree(path)
        for stale in path.parent.glob(path.name + ".building-*"):  # killed builds (we hold
            shutil.rmtree(stale, ignore_errors=True)  # the lock: no live build is there)
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".building-", dir=path.parent))
        tmp.chmod(0o777 & ~umask())  # mkdtemp makes it 0700: teammates share the cache
        try:
            build(tmp)
            if settings is not None:
                (tmp / "settings.json").write_text(json.dumps(settings, indent=2, default=str))
            (tmp / _COMPLETE).touch()
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        lock.release()
    return path


def umask() -> int:
    """The process' umask (files are made ``0o666 & ~umask()``, folders ``0o777 & ~umask()``)."""
    current = os.umask(0o022)
    os.umask(current)
    return current
