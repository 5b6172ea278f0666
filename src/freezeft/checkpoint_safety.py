"""What a checkpoint file is, found before ``torch.load`` runs: a zip torch never writes
(compressed entries, sizes larger than the file: a zip bomb) is refused, the code a pickle
would import (globals outside torch's weights-only allowlist) is named, and a damaged or
truncated file is told apart from one that carries code."""

from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path
from typing import Any

import torch

from freezeft.text import first_line

__all__ = ["code_it_imports", "damage", "refuse_a_zip_torch_never_writes"]


def refuse_a_zip_torch_never_writes(path: Path) -> None:
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


def code_it_imports(path: Path) -> list[str]:
    """The callables the file's pickle imports that a weights-only load refuses (empty for
    a file that is no pickle or imports nothing else), read without running it."""
    facts = _pickle_facts(path)
    if facts is None:
        return []
    allowed = _allowed_globals()
    return list(dict.fromkeys(name for name in facts.imports if name not in allowed))


def damage(path: Path) -> str | None:
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
        return f"is damaged: its zip cannot be read ({type(err).__name__}: {first_line(err)})"
    return None
