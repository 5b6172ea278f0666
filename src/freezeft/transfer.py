"""Transfer by name and shape: load a source model's tensors into a model of the same design.

What a task that declares no transfer of its own gets from ``python -m freezeft.run
transfer.source=PATH``, and what a Lightning project can call itself::

    report = load_matching(model, "source.ckpt")
    report.to_json("transfer.json")

Every tensor of the model whose qualified name and shape match one in the source is
copied; the rest (a new head for a new label set) stays as initialised. Checkpoints are
loaded with ``weights_only=True``: a file that needs code to load is refused, and so is a
source tensor of integers, bools or complex numbers where the model's is float.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from freezeft.checkpoint_io import read_checkpoint_file
from freezeft.files import write_text_atomic

__all__ = ["MatchingTransfer", "load_matching", "other_kinds", "read_source", "source_state_dict"]


@dataclass
class MatchingTransfer:
    """What :func:`load_matching` did, tensor by tensor (``transfer.json``)."""

    source: str
    loaded: list[str] = field(default_factory=list)
    #: the model's tensors left as initialised: {name: why}
    reinitialised: dict[str, str] = field(default_factory=dict)
    #: source tensors the model has no place for
    unused: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the log."""
        kept = ", ".join(sorted(self.reinitialised)) or "none"
        return (
            f"Transfer from {self.source}: {len(self.loaded)} tensors loaded by name and "
            f"shape; left as initialised: {kept}; {len(self.unused)} source tensors unused."
        )

    def to_json(self, path: str | Path) -> None:
        """Write the report as JSON (atomically)."""
        text = json.dumps({"kind": "by name and shape", **asdict(self)}, indent=2)
        write_text_atomic(path, text)


def read_source(path: str | Path) -> Any:
    """What the ``transfer.source`` file holds, read by
    :func:`~freezeft.checkpoint_io.read_checkpoint_file` (weights only; a zip bomb, a damaged
    file or one that needs code to load refused), its errors beginning ``transfer.source:``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is unreadable, or refused.
    """
    try:
        return read_checkpoint_file(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"transfer.source: {err} Give a Lightning .ckpt or a state-dict file "
            "(torch.save(model.state_dict(), PATH))."
        ) from None
    except ValueError as err:
        raise ValueError(f"transfer.source: {err}") from None


def source_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a Lightning checkpoint (its ``state_dict``) or of a state-dict file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is unreadable, needs code to load (refused: only weights are
            loaded), or holds no tensors.
    """
    loaded = read_source(path)
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    tensors = (
        {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if isinstance(state, dict)
        else {}
    )
    if not tensors:
        raise ValueError(
            f"transfer.source={path} holds no tensors: expected a Lightning checkpoint "
            "(with `state_dict`) or a state-dict file."
        )
    return tensors


def _number_kind(dtype: torch.dtype) -> str:
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating-point"
    return "bool" if dtype == torch.bool else "integer"


def other_kinds(source: str | Path, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Refuse source tensors whose numbers are of another kind than the model's (integer,
    bool or complex values for float weights): copying them would cast them silently.

    ``pairs``: {name: (source tensor, model tensor)}.

    Raises:
        ValueError: naming the file, every such tensor, and both dtypes.
    """
    wrong = [
        f"{name} is {str(found.dtype).removeprefix('torch.')} there, "
        f"{str(own.dtype).removeprefix('torch.')} here"
        for name, (found, own) in pairs.items()
        if _number_kind(found.dtype) != _number_kind(own.dtype)
    ]
    if wrong:
        raise ValueError(
            f"transfer.source={source}: {len(wrong)} of its tensors "
            f"{'holds' if len(wrong) == 1 else 'hold'} another kind of number than the "
            f"model's ({'; '.join(wrong[:5])}"
            + (f"; and {len(wrong) - 5} more" if len(wrong) > 5 else "")
            + "), which loading would cast silently. Give a checkpoint of this model's "
            "weights, or convert those tensors (e.g. tensor.float()) and save it again."
        )


def load_matching(model: nn.Module, source: str | Path) -> MatchingTransfer:
    """Copy every tensor of ``source`` whose name and shape match one of ``model``'s."""
    tensors = source_state_dict(source)
    report = MatchingTransfer(source=str(source))
    own = model.state_dict()
    matching = {}
    for name, tensor in own.items():
        found = tensors.get(name)
        if found is None:
            report.reinitialised[name] = "not in the source"
        elif found.shape != tensor.shape:
            report.reinitialised[name] = (
                f"shape {tuple(found.shape)} in the source, {tuple(tensor.shape)} here"
            )
        else:
            matching[name] = found
    other_kinds(source, {name: (found, own[name]) for name, found in matching.items()})
    if not matching:
        raise ValueError(
            f"transfer.source={source}: none of its {len(tensors)} tensors matches the model "
            f"by name and shape (the model has e.g. {sorted(own)[:3]}, the source "
            f"{sorted(tensors)[:3]}); is it a checkpoint of this model's design?"
        )
    model.load_state_dict(matching, strict=False)
    report.loaded = sorted(matching)
    report.unused = sorted(set(tensors) - set(own))
    return report
