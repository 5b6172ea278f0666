"""Transfer a source DeepSpeech checkpoint into a target model, DeepSpeech style.

``drop_source_layers=N`` keeps the target's fresh initialisation for the last N of
``layer_6, layer_5, lstm, layer_3, layer_2`` and copies every other tensor from the
source, by exact name. A target alphabet that differs from the source's needs N >= 1
(the output layer's size changes with it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from freezeft.files import write_text_atomic
from freezeft.speech.model import LAYER_NAMES

if TYPE_CHECKING:
    from freezeft.speech.module import SpeechModule

__all__ = ["TransferReport", "dropped_layers", "load_source", "transfer_weights"]

#: Layers that ``drop_source_layers`` may drop, last first (``layer_1`` always transfers).
DROPPABLE = tuple(reversed(LAYER_NAMES[1:]))


@dataclass
class TransferReport:
    """What a transfer did, tensor by tensor."""

    source: str
    drop_source_layers: int
    dropped_layers: list[str]
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    source_labels: list[str] = field(default_factory=list)
    target_labels: list[str] = field(default_factory=list)

    def to_json(self, path: str | Path) -> None:
        """Write the report as JSON (atomically)."""
        write_text_atomic(path, json.dumps(asdict(self), indent=2, ensure_ascii=False))

    def summary(self) -> str:
        """One paragraph for the log."""
        source, target = set(self.source_labels), set(self.target_labels)
        if self.source_labels == self.target_labels:
            alphabet = "same alphabet"
        else:
            changed = [
                f"{len(target - source)} new" if target - source else "",
                f"{len(source - target)} dropped" if source - target else "",
                "reordered" if source == target else "",
            ]
            alphabet = (
                f"alphabet {len(self.source_labels)} -> {len(self.target_labels)} labels: "
                + ", ".join(c for c in changed if c)
            )
        return (
            f"Transferred {len(self.loaded)} tensors from {self.source} ({alphabet}); "
            f"drop_source_layers={self.drop_source_layers} re-initialised "
            f"{self.dropped_layers or 'nothing'} ({len(self.reinitialised)} tensors)."
        )


def dropped_layers(drop_source_layers: int) -> list[str]:
    """DeepSpeech's layer names dropped by ``drop_source_layers`` (0..5), last first."""
    if not 0 <= drop_source_layers <= len(DROPPABLE):
        raise ValueError(
            f"Expected `drop_source_layers` in 0..{len(DROPPABLE)} (1 drops layer_6, "
            f"{len(DROPPABLE)} drops {', '.join(DROPPABLE)}), but got {drop_source_layers}."
        )
    return list(DROPPABLE[:drop_source_layers])


def load_source(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read a source checkpoint: the model's tensors (``layer_1.weight``...) and its labels.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a freezeft/Lightning checkpoint of a speech model.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(str(p.relative_to(path)) for p in path.rglob("*.ckpt"))[:5]
        raise IsADirectoryError(
            f"Source checkpoint {path} is a folder, not a checkpoint file; set "
            "`transfer.source` to a .ckpt file" + (f", e.g. one of {found}" if found else "")
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"Source checkpoint {path} does not exist; set `transfer.source` to a checkpoint "
            "written by `python -m freezeft.run stage=pretrain`, `auto`, or null."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"Source checkpoint {path} could not be read as a checkpoint ({first}); set "
            "`transfer.source` to a .ckpt file written by freezeft."
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(
            f"Source checkpoint {path} has no 'state_dict'; is it a Lightning checkpoint?"
        )
    labels = checkpoint.get("hyper_parameters", {}).get("labels")
    if not labels:
        raise ValueError(
            f"Source checkpoint {path} does not record its alphabet (hyper_parameters.labels); "
            "it was not written by freezeft's SpeechModule."
        )
    prefix = "model."
    state = {
        k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
    }
    if not state:
        raise ValueError(f"Source checkpoint {path} holds no DeepSpeech tensors ('model.*').")
    return state, list(labels)


def transfer_weights(
    target: SpeechModule, source: str | Path, drop_source_layers: int
) -> TransferReport:
    """Copy the source checkpoint into ``target`` in place, keeping dropped layers fresh.

    Raises:
        ValueError: the alphabets differ and ``drop_source_layers`` is 0, or tensors the
            target keeps are missing from the source or have other shapes (all listed).
    """
    dropped = dropped_layers(drop_source_layers)
    state, source_labels = load_source(source)
    target_labels = list(target.alphabet.labels)
    if source_labels != target_labels and drop_source_layers == 0:
        raise ValueError(
            f"The target alphabet ({len(target_labels)} labels) differs from the source's "
            f"({len(source_labels)} labels in {source}), so the output layer cannot be reused. "
            "Set `transfer.drop_source_layers` to 1 or more (1 re-initialises layer_6)."
        )
    report = TransferReport(
        source=str(source),
        drop_source_layers=drop_source_layers,
        dropped_layers=dropped,
        source_labels=source_labels,
        target_labels=target_labels,
    )
    target_state = target.model.state_dict()
    problems = []
    for name, tensor in target_state.items():
        if name.split(".")[0] in dropped:
            report.reinitialised.append(name)
        elif name not in state:
            problems.append(f"{name}: missing from the source")
        elif state[name].shape != tensor.shape:
            problems.append(
                f"{name}: source {tuple(state[name].shape)} vs target {tuple(tensor.shape)}"
            )
        else:
            report.loaded.append(name)
    if problems:
        raise ValueError(
            f"Source checkpoint {source} does not fit the target model "
            f"(check `model.n_hidden` and the architecture):\n  " + "\n  ".join(problems)
        )
    with torch.no_grad():
        for name in report.loaded:
            target_state[name].copy_(state[name])
    return report
