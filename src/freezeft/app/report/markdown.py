"""Text from a sweep's files (strategy names, overrides, paths, error messages) as it goes
into ``report.md``: escaped, so that it shows as it is and cannot change the report's
layout (a ``|`` that splits a table cell, a line end that starts a heading, raw HTML)."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

__all__ = ["text", "code"]

#: what a backslash escapes in Markdown text, in this order (the backslash itself first)
_ESCAPES = [
    ("\\", "\\\\"),
    ("&", "&amp;"),
    ("<", "&lt;"),
    (">", "&gt;"),
    ("|", "\\|"),
    ("`", "\\`"),
    ("[", "\\["),
    ("]", "\\]"),
]


def _one_line(value: Any) -> str:
    """``value`` as one line: line ends as spaces, other control characters (a terminal's
    escape sequences: ``cli`` prints the report) shown as ``\\x1b``."""
    flat = " ".join(str(value).splitlines())
    return "".join(
        f"\\x{ord(c):02x}" if c != "\t" and unicodedata.category(c) == "Cc" else c for c in flat
    )


def text(value: Any) -> str:
    """``value`` as Markdown text, on one line, that shows exactly as it is, in a table cell
    or in running text: ``\\``, ``|``, backticks and brackets escaped with a backslash,
    ``<``, ``>`` and ``&`` as HTML entities, a leading ``#`` escaped.

    Example::

        >>> text("fast|0.001 <b>")
        'fast\\\\|0.001 &lt;b&gt;'
    """
    escaped = _one_line(value)
    for plain, written in _ESCAPES:
        escaped = escaped.replace(plain, written)
    return re.sub(r"^(\s*)#", r"\1\\#", escaped)


def code(value: Any, *, in_table: bool = False) -> str:
    """``value`` as a Markdown code span: shown as it is and copied as it is (a command, a
    path), on one line; its fence has one backtick more than the longest run of them in
    it. In a table cell a ``|`` is written ``\\|`` (GitHub's tables read it as ``|``, code
    spans included); a value with a backslash goes in as :func:`text` there instead, as a
    backslash before a ``|`` would end the cell.
    """
    flat = _one_line(value)
    if in_table and "\\" in flat:
        return text(flat)
    if in_table:
        flat = flat.replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall("`+", flat)), default=0) + 1)
    padded = flat.startswith("`") or flat.endswith("`")
    return f"{fence} {flat} {fence}" if padded else f"{fence}{flat}{fence}"
