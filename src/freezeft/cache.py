"""Build-once cache entries: locked across processes, published atomically, checked on use.

An entry is a folder that is built in a temporary sibling, marked complete, then renamed
into place; a half-built entry (a killed process) is never used and is rebuilt. The entry
records what it holds (``contents.json``: every file's name and size); each use compares
the folder with it (one ``stat`` per file, nothing hashed), and an entry whose files went
missing, changed size or gained a stranger is named in a warning, removed and built again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from freezeft.files import WriteError, umask, write_text_atomic

__all__ = [
    "default_cache_dir",
    "config_key",
    "cached_entry",
    "differences",
    "entry_damage",
    "umask",
]

log = logging.getLogger(__name__)

_COMPLETE = "COMPLETE"
#: what a complete entry holds: {"files": {relative path: size in bytes}, "count": n}
CONTENTS = "contents.json"


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


def _files(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` (but the marker and the record): relative path -> size."""
    found: dict[str, int] = {}
    pending = [folder]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for item in entries:
                if item.is_dir(follow_symlinks=False):
                    pending.append(Path(item.path))
                    continue
                name = Path(item.path).relative_to(folder).as_posix()
                if name not in (_COMPLETE, CONTENTS):
                    found[name] = item.stat(follow_symlinks=False).st_size
    return found


def _listed(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def entry_damage(path: Path) -> str | None:
    """What is wrong with the complete entry ``path`` compared with its record, or ``None``.

    An entry built before entries recorded their files (no ``contents.json``) is taken as
    it is.
    """
    record = path / CONTENTS
    if not record.exists():
        return None
    try:
        expected = json.loads(record.read_text(encoding="utf-8"))["files"]
        if not isinstance(expected, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        return f"its record {CONTENTS} is unreadable"
    try:
        found = _files(path)
    except OSError as err:
        return f"it cannot be listed: {err}"
    problems = []
    if missing := [name for name in expected if name not in found]:
        problems.append(f"{len(missing)} of its {len(expected)} files missing ({_listed(missing)})")
    changed = [
        f"{name}: {found[name]} bytes, built with {expected[name]}"
        for name in expected
        if name in found and found[name] != expected[name]
    ]
    if changed:
        problems.append(f"{len(changed)} truncated or changed ({_listed(changed)})")
    if strangers := [name for name in found if name not in expected]:
        problems.append(f"{len(strangers)} not from its build ({_listed(strangers)})")
    return "; ".join(problems) or None


def cached_entry(
    path: Path,
    build: Callable[[Path], None],
    settings: dict | None = None,
    check: Callable[[Path], str | None] | None = None,
) -> Path:
    """Return the complete cache folder ``path``, calling ``build(tmp_dir)`` first if needed.

    Concurrent callers (parallel sweep jobs) wait on a file lock; exactly one builds.
    ``settings`` are written beside the entry as ``settings.json`` for people to read.
    A complete entry is checked against its record of files (and by ``check(path)``, which
    returns what is wrong or ``None``); a damaged one is named in a warning and rebuilt.

    Raises:
        OSError: the entry cannot be built (an unwritable cache folder, a full disk), or it
            is damaged and cannot be removed; the message says what to do.
    """
    path = Path(path)
    damage = _damage(path, check, settings)
    if damage is None and (path / _COMPLETE).exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        _acquire_saying_who_holds(lock, path)
    except OSError as err:
        if damage is not None:
            raise _cannot_rebuild(path, damage, err) from None
        raise OSError(
            err.errno,
            f"cannot build the cache entry {path}: {err.strerror or err} (is the cache folder "
            "read-only?). Point paths.cache_dir (or $FREEZEFT_CACHE_DIR) at a writable folder",
        ) from None
    try:
        if (path / _COMPLETE).exists():
            damage = _damage(path, check, settings)  # another process may have rebuilt it
            if damage is None:
                return path
            log.warning(
                f"The cache entry {path} is damaged ({damage}); removing and rebuilding it."
            )
            try:
                if path.is_symlink():  # a link to another entry: that entry is not ours
                    path.unlink()
                else:
                    (path / _COMPLETE).unlink()  # others see a half-built entry, and wait
                    shutil.rmtree(path)
            except OSError as err:
                raise _cannot_rebuild(path, damage, err) from None
        if path.is_symlink():
            path.unlink()
        elif path.exists():  # left behind by a build that did not finish
            shutil.rmtree(path)
        for stale in path.parent.glob(path.name + ".building-*"):  # killed builds (we hold
            shutil.rmtree(stale, ignore_errors=True)  # the lock: no live build is there)
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".building-", dir=path.parent))
        tmp.chmod(0o777 & ~umask())  # mkdtemp makes it 0700: teammates share the cache
        try:
            build(tmp)
            if settings is not None:
                write_text_atomic(
                    tmp / "settings.json", json.dumps(settings, indent=2, default=str)
                )
            files = _files(tmp)
            write_text_atomic(tmp / CONTENTS, json.dumps({"count": len(files), "files": files}))
            (tmp / _COMPLETE).touch()
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        Path(str(path) + ".lock.owner").unlink(missing_ok=True)
        lock.release()
    return path


def _damage(
    path: Path, check: Callable[[Path], str | None] | None, settings: dict | None = None
) -> str | None:
    if not (path / _COMPLETE).exists():
        return None
    return (
        entry_damage(path)
        or (_other_settings(path, settings) if settings is not None else None)
        or (check(path) if check is not None else None)
    )


def _other_settings(path: Path, settings: dict) -> str | None:
    """What differs between the settings an entry was built with (its ``settings.json``)
    and ``settings``, or ``None``: an entry copied or linked from another key is not used."""
    try:
        built = json.loads((path / "settings.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "it has no settings.json"
    except (OSError, ValueError) as err:
        return f"its settings.json is unreadable ({err})"
    wanted = json.loads(json.dumps(settings, default=str))
    found = differences(built, wanted)
    if not found:
        return None
    return (
        "it was built with other settings than its key's: "
        + ", ".join(found[:3])
        + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    )


def differences(built: object, wanted: object, where: str = "") -> list[str]:
    """Where two JSON values differ: ``["n_train 32 (wanted 48)", ...]`` by dotted key."""
    if isinstance(built, dict) and isinstance(wanted, dict):
        return [
            item
            for key in sorted(set(built) | set(wanted), key=str)
            for item in differences(
                built.get(key, "<absent>"), wanted.get(key, "<absent>"), f"{where}{key}."
            )
        ]
    if built == wanted:
        return []
    return [f"{where.rstrip('.') or 'settings'} {built!r} (wanted {wanted!r})"]


#: seconds between the lines saying who holds an entry's build lock
_WAIT_SAY_EVERY = 60.0


def _acquire_saying_who_holds(lock: FileLock, path: Path) -> None:
    """Take ``lock``; while another process holds it, say which one, whether it is stopped,
    and for how long it has built (first after a few seconds, then every minute), instead of
    waiting without a word. The holder's pid is in ``<entry>.lock.owner``."""
    from filelock import Timeout

    owner = Path(str(path) + ".lock.owner")
    waited, timeout = 0.0, min(5.0, _WAIT_SAY_EVERY)
    while True:
        try:
            lock.acquire(timeout=timeout)
            break
        except Timeout:
            waited += timeout
            timeout = _WAIT_SAY_EVERY
            log.warning(
                f"Waiting for the cache entry {path}: {_holder(owner)} (waited {waited:.0f} s)."
            )
    try:
        write_text_atomic(owner, f"{os.getpid()}\n")
    except OSError:  # only for messages
        pass


def _holder(owner: Path) -> str:
    """Who holds an entry's lock, in words, from its owner file and /proc."""
    try:
        pid = int(owner.read_text().split()[0])
        since = owner.stat().st_mtime
    except (OSError, ValueError, IndexError):
        return "another process is building it"
    import time

    minutes = (time.time() - since) / 60
    state = ""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] in ("T", "t"):
            state = (
                f"; it is stopped (Ctrl+Z or SIGSTOP): `kill -CONT {pid}` (or `fg` in its "
                f"shell) lets it go on, `kill {pid}` ends it and this process builds the entry"
            )
    except (OSError, IndexError):
        pass
    return f"process {pid} has been building it for {minutes:.0f} min{state}"


def _cannot_rebuild(path: Path, damage: str, err: OSError) -> OSError:
    return WriteError(
        err.errno or errno.EIO,
        f"the cache entry {path} is damaged ({damage}) and cannot be rebuilt here: "
        f"{err.strerror or err}. Remove it with `rm -rf {path}` (as a user who may), or "
        "point paths.cache_dir (or $FREEZEFT_CACHE_DIR) at a writable folder",
        path,
    )
