"""Transfer a source DeepSpeech checkpoint into a target model, DeepSpeech style.

``drop_source_layers=N`` keeps the target's fresh initialisation for the last N of
``layer_6, layer_5, lstm, layer_3, layer_2`` and copies every other tensor from the
source, by exact name. A target alphabet that differs from the source's needs N >= 1
(the output layer's size changes with it). The source is a freezeft checkpoint or a plain
state dict of the model (which records no alphabet).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from freezeft._lightning import rank_zero_warn
from freezeft.files import write_text_atomic
from freezeft.speech.model import LAYER_NAMES
from freezeft.transfer import other_kinds, read_source

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
    #: None: the source records no alphabet (a plain state dict)
    source_labels: list[str] | None = field(default_factory=list)
    target_labels: list[str] = field(default_factory=list)

    def to_json(self, path: str | Path) -> None:
        """Write the report as JSON (atomically)."""
        write_text_atomic(path, json.dumps(asdict(self), indent=2, ensure_ascii=False))

    def summary(self) -> str:
        """One paragraph for the log."""
        source, target = set(self.source_labels or ()), set(self.target_labels)
        if self.source_labels is None:
            alphabet = "the source records no alphabet"
        elif self.source_labels == self.target_labels:
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


def load_source(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """Read a source checkpoint: the model's tensors (``layer_1.weight``...) and its labels.

    A Lightning checkpoint of a SpeechModule (``state_dict`` with ``model.*`` tensors, the
    alphabet in ``hyper_parameters.labels``), or a plain state dict of one
    (``torch.save(module.state_dict())``: ``model.*``) or of its DeepSpeech model
    (``torch.save(module.model.state_dict())``: ``layer_1.weight``...), which records no
    alphabet (labels None). Read as weights only, by
    :func:`~freezeft.checkpoint_io.read_checkpoint_file`.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a checkpoint or state dict of a speech model, naming the
            key at fault.
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
    checkpoint = read_source(path)
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"transfer.source: {path} holds a {type(checkpoint).__name__}, not a checkpoint; "
            "set `transfer.source` to a .ckpt file written by freezeft, or a state dict."
        )
    labels = None
    if "state_dict" in checkpoint:  # a Lightning checkpoint
        where = "state_dict"
        state = checkpoint["state_dict"]
        hparams = checkpoint.get("hyper_parameters", {})
        if not isinstance(hparams, dict):
            raise ValueError(
                f"transfer.source: {path}: its `hyper_parameters` is a "
                f"{type(hparams).__name__}, not the dict of settings Lightning writes; "
                "the file is not a checkpoint as freezeft writes it: use one that is."
            )
        labels = hparams.get("labels")
        if labels is not None and (
            not isinstance(labels, (list, tuple)) or not all(isinstance(c, str) for c in labels)
        ):
            raise ValueError(
                f"transfer.source: {path}: its `hyper_parameters.labels` is {labels!r}, not "
                "the list of the alphabet's labels freezeft's SpeechModule records."
            )
        if not isinstance(state, dict):
            raise ValueError(
                f"transfer.source: {path}: its `state_dict` is a {type(state).__name__}, not "
                "a dict of tensors; the file is not a checkpoint as Lightning writes it."
            )
        if labels is not None and not labels:
            labels = None  # recorded empty: as if not recorded
    else:  # a plain state dict
        where = "the state dict"
        state = checkpoint
    prefix = "model." if any(str(k).startswith("model.") for k in state) else ""
    if not prefix and where == "state_dict":
        prefix = "model."  # a Lightning checkpoint's model is its `model` attribute
    found = {
        str(k)[len(prefix) :]: v
        for k, v in state.items()
        if str(k).startswith(prefix) and str(k)[len(prefix) :].split(".")[0] in LAYER_NAMES
    }
    if not found:
        raise ValueError(
            f"transfer.source: {path} holds no DeepSpeech tensors (`{prefix or 'model.'}"
            f"layer_1.weight`...) in {where}; set `transfer.source` to a checkpoint or state "
            "dict of freezeft's speech model."
        )
    for name, value in found.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"transfer.source: {path}: {where}[{prefix + name!r}] is a "
                f"{type(value).__name__}, not a tensor; the file was not written by "
                "torch.save of a model's weights: use one that was."
            )
    return found, list(labels) if labels is not None else None


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
    if source_labels is None and drop_source_layers == 0:
        rank_zero_warn(
            f"freezeft: transfer.source={source} records no alphabet (a plain state dict), "
            f"so its layer_6 is loaded as if its outputs were this run's {len(target_labels)} "
            "labels in the same order; set `transfer.drop_source_layers` to 1 or more if "
            "they are not."
        )
    elif source_labels != target_labels and drop_source_layers == 0:
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
    other_kinds(source, {name: (state[name], target_state[name]) for name in report.loaded})
    with torch.no_grad():
        for name in report.loaded:
            target_state[name].copy_(state[name])
    return report
