"""A split's rows checked before training, as audio + label ids, and their batching.

Every row is checked from its CSV fields and its audio header (without decoding; float
audio's samples are read, for NaN and infinite values): rows that cannot be trained on are
skipped and listed, or refused. Audio whose body fails to decode later, or decodes to
non-finite samples, is left out of its batch and reported the same way.
"""

from __future__ import annotations

import errno
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile
import torch
from torch.utils.data import Dataset

from freezeft._lightning import rank_zero_info, rank_zero_warn
from freezeft.speech.alphabet import Alphabet
from freezeft.speech.audio import load_audio, wav_truncation
from freezeft.speech.features import STEP_MS, WINDOW_MS
from freezeft.speech.manifest import Sample, not_a_regular_file, read_csv

__all__ = [
    "MAX_DURATION_S",
    "Skipped",
    "SpeechDataset",
    "check_max_duration",
    "check_on_bad_sample",
    "collate",
]

#: the longest utterance trained on by default, in seconds: DeepSpeech corpora (Common Voice,
#: LibriSpeech) hold utterances of a few seconds to about 35 s; a recording of minutes or
#: hours is no utterance, and its CTC loss and gradients overflow (NaN)
MAX_DURATION_S = 60.0

#: subtypes whose samples can be NaN or infinite (the integer PCM ones cannot)
FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")


def check_on_bad_sample(value: str) -> None:
    """``"skip"`` or ``"error"``: what a bad row does (the one check, used by the data
    module and the dataset)."""
    if value not in ("skip", "error"):
        raise ValueError(f"Expected `on_bad_sample` to be 'skip' or 'error', but got {value!r}.")


def check_max_duration(value: object) -> None:
    """``None`` (no limit) or a positive number of seconds: the longest audio trained on."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if value is not None and not (number and math.isfinite(value) and value > 0):
        raise ValueError(
            "Expected `max_duration_s` to be a number of seconds > 0, or null for no limit, "
            f"but got {value!r}."
        )


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
    that leaves the CSV's folder; missing, unreadable (a symlink loop, a folder, a FIFO or
    a device too), truncated or empty audio; audio longer than ``max_duration_s``; float
    audio holding NaN or infinite samples; audio too short for its transcript (CTC needs a
    frame per label plus one between repeated labels: DeepSpeech's "Not enough time for
    target transition sequence"). Audio at another sample rate is resampled and
    multi-channel audio downmixed, with a note.

    Args:
        csv_files: the split's CSVs.
        alphabet: the output alphabet.
        sample_rate: the model's sample rate.
        on_bad_sample: ``"skip"`` or ``"error"``.
        window_ms: the feature window, for the frames-per-transcript check.
        step_ms: the feature step, for the same check.
        max_duration_s: the longest audio kept, in seconds (``None``: no limit).

    Raises:
        ValueError: a bad row with ``on_bad_sample="error"``; transcripts with spaces but
            an alphabet without the space label (whatever ``on_bad_sample``).
    """

    def __init__(
        self,
        csv_files: Sequence[str | Path],
        alphabet: Alphabet,
        sample_rate: int = 16000,
        on_bad_sample: Literal["skip", "error"] = "skip",
        window_ms: float = WINDOW_MS,
        step_ms: float = STEP_MS,
        max_duration_s: float | None = MAX_DURATION_S,
    ) -> None:
        check_on_bad_sample(on_bad_sample)
        check_max_duration(max_duration_s)
        self.max_duration_s = max_duration_s
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
                    # the reference transcript in the labels' own form (NFC, or NFD for an
                    # alphabet of combining marks), as the model's hypotheses are written
                    spelled = self.alphabet.spelling(sample.transcript)
                    self.samples.append(replace(sample, transcript=spelled))
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
        if " " in missing:
            raise ValueError(self._no_space_label(sample))
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

    def _no_space_label(self, sample: Sample) -> str:
        """The refusal of an alphabet without the space label when transcripts have spaces:
        every row with two words would be skipped, and the model could not write a space."""
        where = f"The alphabet file {self.alphabet.path}" if self.alphabet.path else "The alphabet"
        return (
            f"{where} has no space label (' '), but the transcripts have spaces (first: "
            f"{sample.source}: {sample.transcript!r}): every row with more than one word would "
            "be skipped, and the model could not write a space. Add a line holding a single "
            "space (' ') to the alphabet, as DeepSpeech's alphabet.txt has."
        )

    def _check_audio(self, sample: Sample) -> tuple[str, str] | None:
        special = not_a_regular_file(sample.path)  # found with stat: a FIFO would block open()
        if special is not None:
            return (
                "unreadable audio",
                f"audio file {sample.path} is {special}, not a regular file; point the row "
                "at an audio file",
            )
        if sample.path.is_dir():
            return "unreadable audio", f"audio file {sample.path} is a folder, not an audio file"
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
        duration = info.frames / info.samplerate
        if self.max_duration_s is not None and duration > self.max_duration_s:
            return (
                "too long",
                f"audio file {sample.path} lasts {duration:.1f} s, more than "
                f"data.max_duration_s={self.max_duration_s:g} s: a recording, not an "
                "utterance (its CTC loss and gradients overflow); cut it into utterances, or "
                "raise data.max_duration_s (null: no limit)",
            )
        if info.subtype in FLOAT_SUBTYPES:
            try:
                bad = _non_finite(sample.path)
            except (OSError, RuntimeError, soundfile.LibsndfileError) as err:
                return "unreadable audio", f"cannot decode audio file {sample.path}: {err}"
            if bad is not None:
                return "non-finite audio", bad
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
        left_out = {"path": str(sample.path), "source": sample.source}
        try:
            audio = load_audio(sample.path, self.sample_rate)
        except (OSError, RuntimeError, soundfile.LibsndfileError) as err:
            # a body that fails to decode although its header passed the checks: the batch
            # goes on without it, and collate() reports it (see ``unreadable``)
            return {**left_out, "kind": "unreadable audio", "error": f"cannot decode: {err}"}
        if not np.isfinite(audio).all():  # audio the row check did not read (not float WAV)
            bad = int(np.count_nonzero(~np.isfinite(audio)))
            detail = (
                f"audio file {sample.path} decodes to {bad} non-finite sample(s) (NaN or "
                f"infinite) of {len(audio)}; fix or re-export the file"
            )
            return {**left_out, "kind": "non-finite audio", "error": detail}
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


def _non_finite(path: Path, block_frames: int = 1 << 16) -> str | None:
    """Why float audio at ``path`` cannot be trained on: NaN or infinite samples (as float32,
    the model's type: a huge double is infinite there), or ``None``. Read in blocks."""
    bad, first, frames = 0, None, 0
    with soundfile.SoundFile(str(path)) as audio:
        for block in audio.blocks(blocksize=block_frames, dtype="float32", always_2d=True):
            finite = np.isfinite(block).all(axis=1)
            if first is None and not finite.all():
                first = frames + int(np.argmin(finite))
            bad += int(np.count_nonzero(~finite))
            frames += len(block)
        rate = audio.samplerate
    if not bad:
        return None
    return (
        f"audio file {path} has {bad} non-finite sample(s) (NaN or infinite) of {frames}, "
        f"the first at {first / rate:.3f} s; fix or re-export the file"
    )


def collate(items: list[dict]) -> dict:
    """Pad audio and labels of a list of dataset items into one batch; items whose audio
    failed to decode, or decoded to non-finite samples, are left out and listed as
    ``unreadable`` (source, path, kind, detail)."""
    unreadable = [  # plain dicts: Lightning moves batches with apply_to_collection
        {"source": i["source"], "path": i["path"], "kind": i["kind"], "detail": i["error"]}
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
