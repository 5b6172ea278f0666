"""A split's rows checked before training, as audio + label ids, and their batching.

Every row is checked from its CSV fields and its audio header (without decoding): rows
that cannot be trained on are skipped and listed, or refused. Audio whose body fails to
decode later is left out of its batch and reported the same way.
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Literal

import soundfile
import torch
from torch.utils.data import Dataset

from freezeft._lightning import rank_zero_info, rank_zero_warn
from freezeft.speech.alphabet import Alphabet
from freezeft.speech.audio import load_audio, wav_truncation
from freezeft.speech.features import STEP_MS, WINDOW_MS
from freezeft.speech.manifest import Sample, read_csv

__all__ = ["Skipped", "SpeechDataset", "check_on_bad_sample", "collate"]


def check_on_bad_sample(value: str) -> None:
    """``"skip"`` or ``"error"``: what a bad row does (the one check, used by the data
    module and the dataset)."""
    if value not in ("skip", "error"):
        raise ValueError(f"Expected `on_bad_sample` to be 'skip' or 'error', but got {value!r}.")


@dataclass(frozen=True)
class Skipped:
    """A row left out of a dataset: where it is, its audio file, the kind of problem and why."""

    source: str
    path: str
    kind: str
    detail: str


class SpeechDataset(Dataset):
    """Audio + label ids for DeepSpeech CSV rows, checked before training starts.

    Rows that cannot be trained on are skipped (``on_bad_sample="skip"``: counted in
    :attr:`skipped`, summarised in a warning) or raise (``"error"``) with the CSV row:
    empty transcript; characters outside the alphabet; a duplicate row; a relative path
    that leaves the CSV's folder; missing, unreadable (a symlink loop too), truncated or
    empty audio; audio too short for its transcript (CTC needs a frame per label plus one
    between repeated labels: DeepSpeech's "Not enough time for target transition
    sequence"). Audio at another sample rate is resampled and multi-channel audio
    downmixed, with a note.

    Args:
        csv_files: the split's CSVs.
        alphabet: the output alphabet.
        sample_rate: the model's sample rate.
        on_bad_sample: ``"skip"`` or ``"error"``.
        window_ms: the feature window, for the frames-per-transcript check.
        step_ms: the feature step, for the same check.
    """

    def __init__(
        self,
        csv_files: Sequence[str | Path],
        alphabet: Alphabet,
        sample_rate: int = 16000,
        on_bad_sample: Literal["skip", "error"] = "skip",
        window_ms: float = WINDOW_MS,
        step_ms: float = STEP_MS,
    ) -> None:
        check_on_bad_sample(on_bad_sample)
        self.alphabet = alphabet
        self.sample_rate = sample_rate
        self.window = round(sample_rate * window_ms / 1000)
        self.step = round(sample_rate * step_ms / 1000)
        self.samples: list[Sample] = []
        self.skipped: list[Skipped] = []
        self.notes: Counter[str] = Counter()
        seen: dict[tuple[Path, str], str] = {}
        for csv_file in csv_files:
            for sample in read_csv(csv_file):
                problem = self._check(sample, seen)
                if problem is None:
                    self.samples.append(sample)
                    continue
                kind, detail = problem
                if on_bad_sample == "error":
                    raise ValueError(
                        f"{sample.source}: {detail}. Fix or remove the row, or set "
                        "`data.on_bad_sample=skip` to skip such rows."
                    )
                self.skipped.append(Skipped(sample.source, str(sample.path), kind, detail))
        names = ", ".join(map(str, csv_files))
        for note, count in sorted(self.notes.items()):
            rank_zero_info(f"{names}: {count} file(s) {note}")
        if self.skipped:
            kinds = Counter(s.kind for s in self.skipped)
            rank_zero_warn(
                f"Skipped {len(self.skipped)} of {len(self.samples) + len(self.skipped)} rows "
                f"of {names} ({', '.join(f'{n} {k}' for k, n in kinds.most_common())}); "
                f"first: {self.skipped[0].source}: {self.skipped[0].detail}"
            )

    def _check(self, sample: Sample, seen: dict[tuple[Path, str], str]) -> tuple[str, str] | None:
        """``(kind, detail)`` of what makes ``sample`` unusable, or ``None``."""
        if sample.extra_fields:
            return (
                "extra fields",
                f"the row has {sample.extra_fields} field(s) more than the header: an unquoted "
                'comma in the transcript? Quote it ("be as, for")',
            )
        if not sample.transcript:
            return "empty transcript", "empty transcript"
        missing = self.alphabet.missing(sample.transcript)
        if missing:
            return (
                "outside alphabet",
                f"transcript has characters outside the alphabet: {missing}",
            )
        loop = _symlink_loop(sample.path)
        if loop is not None:
            return "unreadable audio", loop
        key = (sample.path.resolve(), sample.transcript)
        if key in seen:
            return "duplicate", f"duplicate of {seen[key]}"
        seen[key] = sample.source
        # lexically, not resolve()d: a symlinked audio folder inside the CSV's folder is fine
        lexical = Path(os.path.normpath(sample.path))
        if sample.csv_dir is not None and not lexical.is_relative_to(
            os.path.normpath(sample.csv_dir)
        ):
            return (
                "outside CSV folder",
                f"relative path {sample.path} leaves the CSV's folder {sample.csv_dir}; "
                "give an absolute path or move the file under that folder",
            )
        return self._check_audio(sample)

    def _check_audio(self, sample: Sample) -> tuple[str, str] | None:
        if not sample.path.is_file():
            return "missing audio", f"audio file {sample.path} does not exist"
        try:
            info = soundfile.info(str(sample.path))
            cut = wav_truncation(sample.path)
        except (OSError, RuntimeError, soundfile.LibsndfileError) as err:
            return "unreadable audio", f"cannot read audio file {sample.path}: {err}"
        if cut is not None:
            return (
                "truncated audio",
                f"audio file {sample.path} is truncated: its header declares {cut[0]} "
                f"data bytes, {cut[1]} are present",
            )
        if info.frames == 0:
            return "empty audio", f"audio file {sample.path} has no samples"
        if info.samplerate != self.sample_rate:
            self.notes[f"resampled from {info.samplerate} Hz to {self.sample_rate} Hz"] += 1
        if info.channels > 1:
            self.notes[f"downmixed from {info.channels} channels to mono"] += 1
        samples = info.frames * self.sample_rate // info.samplerate
        frames = max(0, (samples - self.window) // self.step + 1)
        labels = self.alphabet.encode(sample.transcript)
        needed = len(labels) + sum(a == b for a, b in pairwise(labels))
        if frames < needed:
            return (
                "too short for transcript",
                f"audio too short for its transcript: {frames} frames "
                f"({info.frames / info.samplerate:.2f} s) for {len(labels)} labels, CTC needs "
                f"at least {needed} (DeepSpeech: 'Not enough time for target transition "
                "sequence')",
            )
        return None

    def __len__(self) -> int:
        return len(self.samples)

    def sizes(self) -> list[int]:
        """File sizes (bytes) for length bucketing; read from disk where the CSV gave 0."""
        return [s.size or (os.path.getsize(s.path) if s.path.exists() else 0) for s in self.samples]

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        try:
            audio = load_audio(sample.path, self.sample_rate)
        except (OSError, RuntimeError, soundfile.LibsndfileError) as err:
            # a body that fails to decode although its header passed the checks: the batch
            # goes on without it, and collate() reports it (see ``unreadable``)
            return {"path": str(sample.path), "source": sample.source, "error": str(err)}
        return {
            "audio": torch.from_numpy(audio),
            "labels": torch.tensor(self.alphabet.encode(sample.transcript), dtype=torch.long),
            "transcript": sample.transcript,
            "path": str(sample.path),
        }


def _symlink_loop(path: Path) -> str | None:
    """Why ``path`` cannot be opened because of a symlink loop (``ln -s a.wav a.wav``, or
    two links pointing at each other, anywhere along the path), or ``None``.

    Checked before ``Path.resolve()``, which raises ``RuntimeError`` on a loop (Python
    3.12 and older) instead of leaving the row to be skipped as unreadable audio.
    """
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return (
                f"audio file {path} is a symlink loop ({err.strerror}); point the link "
                "at a real WAV file or remove the row"
            )
    return None


def collate(items: list[dict]) -> dict:
    """Pad audio and labels of a list of dataset items into one batch; items whose audio
    failed to decode are left out and listed as ``unreadable`` (source, path, detail)."""
    unreadable = [  # plain dicts: Lightning moves batches with apply_to_collection
        {"source": i["source"], "path": i["path"], "detail": f"cannot decode: {i['error']}"}
        for i in items
        if "error" in i
    ]
    items = [item for item in items if "error" not in item]
    audio_lengths = torch.tensor([len(item["audio"]) for item in items], dtype=torch.long)
    label_lengths = torch.tensor([len(item["labels"]) for item in items], dtype=torch.long)
    audio = torch.zeros(len(items), int(audio_lengths.max()) if items else 0)
    labels = torch.zeros(len(items), int(label_lengths.max()) if items else 0, dtype=torch.long)
    for i, item in enumerate(items):
        audio[i, : len(item["audio"])] = item["audio"]
        labels[i, : len(item["labels"])] = item["labels"]
    return {
        "audio": audio,
        "audio_lengths": audio_lengths,
        "labels": labels,
        "label_lengths": label_lengths,
        "transcripts": [item["transcript"] for item in items],
        "paths": [item["path"] for item in items],
        "unreadable": unreadable,
    }
