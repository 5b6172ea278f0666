"""Small text helpers every wing uses for messages (the standard library only)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["first_line", "joined_lines", "is_number", "describe_divergence"]


def first_line(err: BaseException) -> str:
    """An exception's first line (its type's name if it says nothing)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def joined_lines(text: str) -> str:
    """A text's lines, and runs of white space, as one line."""
    return " ".join(str(text).split())


def is_number(value: Any, *, finite: bool = False) -> bool:
    """Whether ``value`` is an int or a float (not a bool); with ``finite``, a finite one
    (an integer beyond the float range is not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    if not finite:
        return True
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def describe_divergence(details: dict[str, Any]) -> str:
    """``diverged at step S (epoch E, learning rate LR): what`` from
    :attr:`freezeft.divergence.Diverged.details` (as ``results.json`` keeps them: any of
    them may be missing)."""
    lrs = ", ".join(f"{lr:g}" for lr in details.get("lr") or []) or "unknown"
    during = f" {details['during']}" if details.get("during") else ""
    return (
        f"diverged{during} at step {details.get('step')} (epoch {details.get('epoch')}, "
        f"learning rate {lrs}): {details.get('what')}"
    )
