"""A user's mistake in one line: what was wrong and what to change, wherever it was raised.

freezeft's own checks, Hydra's composition (an unknown option, a key not in the config),
Hydra's instantiation of a config's object (the object's own error, unwrapped), a missing
extra (the ``pip install`` that brings it), a path or a full disk. Anything else is a bug
and keeps its traceback (:func:`one_line` returns None).
"""

from __future__ import annotations

import difflib
import re
from importlib import resources
from pathlib import Path

from hydra.errors import HydraException, InstantiationException, OverrideParseException
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from freezeft._lightning import MISCONFIGURATION_EXCEPTIONS
from freezeft.extras import missing_extra

__all__ = ["is_user_error", "one_line"]

_PACKAGE = Path(__file__).parents[1]  # src/freezeft


def is_user_error(err: BaseException) -> bool:
    """What a user can cause and fix: an ``OSError`` (paths, permissions, a full disk),
    Lightning's misconfiguration errors, a ``ValueError`` raised by freezeft about their
    data, config or checkpoint, or the error of an object a config built."""
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        cause = err.__cause__  # a config's object refused its arguments: judge that error
        return isinstance(cause, TypeError) or is_user_error(cause)
    if isinstance(err, (OSError, *MISCONFIGURATION_EXCEPTIONS)):
        return True
    if not isinstance(err, ValueError):
        return False
    frame = err.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and Path(frame.tb_frame.f_code.co_filename).is_relative_to(_PACKAGE)


def _joined(text: str) -> str:
    """A message's lines as one."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = len(lines) - 1
    return " ".join(
        line if i == last or line.endswith((".", ":", ";", ",")) else f"{line};"
        for i, line in enumerate(lines)
    )


def _omegaconf(err: OmegaConfBaseException) -> str:
    """An OmegaConf error (a required value not given, a bad interpolation), one line."""
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, MissingMandatoryValue) and key:
        return f"{key} is required: give it on the command line, e.g. {key}=VALUE"
    first = str(err).splitlines()[0].strip()
    return f"{first} (config: {key})" if key and key not in first else first


def _composition(err: HydraException) -> str:
    """Hydra's composition errors, one line: the options of a group listed on it, the
    config search path left out, an OmegaConf cause's own words (without its key dump)."""
    text, _, search_path = str(err).partition("Config search path:")
    unlisted = re.search(r"Could not load '(.+)/([^'/]+)'", text)
    if unlisted and "Available options" not in text:  # an option inside a list: addons=[x]
        options = _group_options(search_path, unlisted.group(1))
        if options:
            text += f"\nAvailable options in '{unlisted.group(1)}':\n" + "".join(
                f"\t{option}\n" for option in options
            )
            text = text.replace("Could not load", "Could not find", 1)
    found = re.search(r"Available options in '([^']+)':\n((?:\t.*\n?)*)", text)
    head = _joined(text[: found.start()] if found else text)
    if found:
        options = [o.strip() for o in found.group(2).splitlines() if o.strip()]
        head = head.rstrip(" .;") + f". Options for {found.group(1)}: {', '.join(options)}."
        wanted = re.search(r"Could not find '[^']*?([^'/]+)'", text)
        close = difflib.get_close_matches(wanted.group(1), options, n=2) if wanted else []
        if close:
            shown = [f"[{c}]" if unlisted else c for c in close]  # an item of a list
            head = f"{head} Did you mean {' or '.join(f'{found.group(1)}={c}' for c in shown)}?"
    cause = err.__cause__
    typo = re.search(r"Could not override '([^']+)'", text)
    if typo and "is not in struct" in str(cause):
        key = typo.group(1)
        if key.count(".") == 1 and key.startswith("strategy."):
            return (
                f"{key} is not a key of the config: a strategy's own settings are under "
                f"strategy.callbacks.<its key>, e.g. strategy.callbacks.freeze_then_unfreeze."
                f"{key.split('.')[1]}=... (--cfg job prints every key)"
            )
        parent, last = getattr(cause, "parent_node", None), key.rsplit(".", 1)[-1]
        there = [str(k) for k in parent.keys()] if hasattr(parent, "keys") else []
        close = difflib.get_close_matches(last, there, n=2)
        section = key.rsplit(".", 1)[0] + "." if "." in key else ""
        if close:
            hint = f"Did you mean {' or '.join(f'{section}{c}' for c in close)}? "
        elif there and len(there) <= 30:
            hint = f"The keys there: {', '.join(there)}. "
        else:
            hint = ""
        return (
            f"{key} is not a key of the config. {hint}Check its spelling (--cfg job prints "
            f"every key), or add a new key with a leading +, as +{key}=..."
        )
    if cause is not None and not isinstance(cause, HydraException):
        first = str(cause).splitlines()[0].strip() if str(cause).strip() else ""
        if first and first not in head:
            head += f" ({first})"
    return head


def _group_options(search_path: str, group: str) -> list[str]:
    """The options of config group ``group`` on a Hydra error's search path (Hydra lists
    them for ``group=x``, not for an item of a list, ``group=[x]``)."""
    found: set[str] = set()
    for kind, where in re.findall(r"path=(pkg|file)://(\S+)", search_path):
        try:
            if kind == "pkg":
                folder = resources.files(where.replace("/", "."))
            else:
                folder = Path(where)
            entries = list(folder.joinpath(group).iterdir())
        except (ModuleNotFoundError, OSError, TypeError, ValueError):
            continue
        found.update(e.name[: -len(".yaml")] for e in entries if e.name.endswith(".yaml"))
    return sorted(found)


def one_line(err: BaseException) -> str | None:
    """The one line to print for a user's mistake; None for a bug (it keeps its
    traceback)."""
    extra = missing_extra(err)
    if extra is not None:
        return extra
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        if not is_user_error(err):
            return None
        key = re.search(r"full_key: (\S+)", str(err))
        inner = one_line(err.__cause__) or _joined(str(err.__cause__))
        return f"{inner} (config: {key.group(1)})" if key and key.group(1) not in inner else inner
    if isinstance(err, (OverrideParseException, HydraException)):
        return _composition(err)
    if isinstance(err, OmegaConfBaseException):
        return _omegaconf(err)
    if is_user_error(err):
        line = _joined(str(err))
        if "No supported gpu backend found" in line:
            line += (
                " This machine has no GPU that torch can use: run with trainer=cpu (the default)."
            )
        return line
    return None
