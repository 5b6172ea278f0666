"""DeepSpeech-format data: CSV manifests + alphabet, as a Lightning DataModule.

A CSV has the columns ``wav_filename,wav_filesize,transcript``; relative WAV paths
resolve against the CSV's folder. Batches hold utterances of similar length
(DeepSpeech sorts by file size) so little time goes to padding.
"""

from __future__ import annotations

import csv
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Literal

import numpy as np
import pytorch_lightning as pl
import soundfile
import torch
import torchaudio
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

from freezeft.machine import usable_cores
from freezeft.speech.alphabet import Alphabet

__all__ = [
    "Sample",
    "Skipped",
    "read_csv",
    "load_audio",
    "wav_truncation",
    "SpeechDataset",
    "BucketBatchSampler",
    "collate",
    "SpeechDataModule",
]

CSV_COLUMNS = ("wav_filename", "wav_filesize", "transcript")


@dataclass(frozen=True)
class Sample:
    """One row of a DeepSpeech CSV, with its path resolved."""

    path: Path
    size: int
    transcript: str
    source: str  # "file.csv:row" for messages
    csv_dir: Path | None = None  # set when the CSV gave a relative path
    extra_fields: int = 0  # fields beyond the header's (an unquoted comma in the transcript)


def read_csv(path: str | Path) -> list[Sample]:
    """Read a DeepSpeech CSV; errors name the file, the row and what to fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV file {path} does not exist.")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # Excel writes a BOM
            rows = list(csv.reader(handle))
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ValueError(
            f"CSV file {path} is not UTF-8 text: line {line} has the byte "
            f"{err.object[err.start : err.start + 1]!r}; save the file as UTF-8."
        ) from None
    if not rows:
        raise ValueError(f"CSV file {path} is empty; expected the header {','.join(CSV_COLUMNS)}.")
    header = [column.strip() for column in rows[0]]
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise ValueError(
            f"CSV file {path} lacks the column(s) {missing}; its header is {header}, "
            f"expected {','.join(CSV_COLUMNS)} (DeepSpeech's format)."
        )
    col = {name: header.index(name) for name in CSV_COLUMNS}
    samples = []
    for number, row in enumerate(rows[1:], start=2):
        if not any(field.strip() for field in row):  # an empty or blank line
            continue
        where = f"{path}:{number}"
        swallowed = max(field.count("\n") for field in row)
        if swallowed:
            raise ValueError(
                f"{where}: a field runs over {swallowed} more line(s): an opening double quote "
                "without its closing one, which makes the CSV reader merge the following rows "
                "into this one. Close the quote, or remove it."
            )
        if len(row) < len(header):
            raise ValueError(f"{where}: expected {len(header)} fields, but got {len(row)}: {row}.")
        extra = len(row) - len(header)
        wav = Path(row[col["wav_filename"]])
        relative = not wav.is_absolute()
        if relative:
            wav = path.parent / wav
        size_text = row[col["wav_filesize"]].strip()
        try:
            size = int(size_text) if size_text else 0
        except ValueError:
            raise ValueError(
                f"{where}: wav_filesize must be an integer number of bytes, but got {size_text!r}."
            ) from None
        csv_dir = path.parent if relative else None
        samples.append(Sample(wav, size, row[col["transcript"]], where, csv_dir, extra))
    if not samples:
        raise ValueError(
            f"CSV file {path} has a header but no rows; add rows "
            f"({','.join(CSV_COLUMNS)}) or leave the file out of the split."
        )
    return samples


def load_audio(path: Path, sample_rate: int) -> np.ndarray:
    """Mono float32 audio at ``sample_rate``; other rates are resampled, channels averaged.

    Any WAV/FLAC/OGG subtype libsndfile reads works (8-bit, 16/24/32-bit, float).
    """
    audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != sample_rate:
        audio = torchaudio.functional.resample(torch.from_numpy(audio), rate, sample_rate).numpy()
    return audio


def wav_truncation(path: Path) -> tuple[int, int] | None:
    """``(declared, present)`` data bytes if a RIFF WAV file is cut short, else ``None``.

    libsndfile reads a truncated WAV without complaint (just fewer samples), so the
    RIFF chunks are walked here: the ``data`` chunk must hold the bytes it declares.
    """
    with open(path, "rb") as stream:
        if stream.read(4) != b"RIFF":
            return None
        stream.seek(12)
        size = os.fstat(stream.fileno()).st_size
        while header := stream.read(8):
            if len(header) < 8:
                return None
            declared = int.from_bytes(header[4:], "little")
            if header[:4] == b"data":
                present = size - stream.tell()
                return (declared, present) if present < declared else None
            stream.seek(declared + (declared & 1), os.SEEK_CUR)
    return None


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
    that leaves the CSV's folder; missing, unreadable, truncated or empty audio; audio too
    short for its transcript (CTC needs a frame per label plus one between repeated
    labels: DeepSpeech's "Not enough time for target transition sequence"). Audio at
    another sample rate is resampled and multi-channel audio downmixed, with a note.

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
        window_ms: float = 32.0,
        step_ms: float = 20.0,
    ) -> None:
        if on_bad_sample not in ("skip", "error"):
            raise ValueError(
                f"Expected `on_bad_sample` to be 'skip' or 'error', but got {on_bad_sample!r}."
            )
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


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar-length utterances; batch order shuffled per epoch (seeded).

    In distributed runs each rank takes every ``num_replicas``-th batch; the batch list
    is padded by wrapping around so every rank gets the same number of batches.

    Args:
        sizes: a length proxy per sample (file size in bytes).
        batch_size: samples per batch.
        shuffle: shuffle the batch order each epoch (call :meth:`set_epoch`).
        seed: base seed of the shuffle.
        num_replicas: number of ranks.
        rank: this rank.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"Expected `batch_size` >= 1, but got {batch_size}.")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"Expected 0 <= rank < num_replicas, but got {rank}, {num_replicas}.")
        order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
        self.batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the shuffle of ``epoch`` (Lightning calls this each epoch)."""
        self.epoch = epoch

    def skip_batches(self, count: int) -> None:
        """Leave out the first ``count`` batches of the next iteration only (mid-epoch resume)."""
        self._skip = count

    def __len__(self) -> int:
        return math.ceil(len(self.batches) / self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(len(self.batches)))
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(order), generator=generator).tolist()
        total = len(self) * self.num_replicas
        order = (order * math.ceil(total / max(len(order), 1)))[:total] if order else []
        skip, self._skip = self._skip, 0
        for index in order[self.rank :: self.num_replicas][skip:]:
            yield self.batches[index]


class SpeechDataModule(pl.LightningDataModule):
    """DeepSpeech CSVs + alphabet as train/dev/test dataloaders.

    Give either ``data_dir`` (CSV and alphabet names resolve against it) or ``corpus``
    (an object with a ``build() -> Path`` method, e.g. :class:`~freezeft.speech.corpus.SynthCorpus`,
    built in :meth:`prepare_data`). CSV arguments may be one path or a list of paths.

    Args:
        data_dir: folder holding the CSVs and the alphabet.
        corpus: a corpus to build (cached) instead of ``data_dir``.
        train_csv: training CSV(s).
        dev_csv: validation CSV(s).
        test_csv: test CSV(s).
        alphabet: alphabet file.
        batch_size: utterances per batch.
        num_workers: dataloader worker processes; ``"auto"``: none when training on the CPU
            (the training threads use the cores), else the cores per GPU minus one, at most 8.
        sample_rate: the model's sample rate; other rates are resampled.
        on_bad_sample: ``"skip"`` (default) or ``"error"`` for rows that cannot be used.
        seed: seed of the batch-order shuffle.

    Example::

        data = SpeechDataModule(data_dir="cv-de", train_csv="train.csv", batch_size=16)
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        corpus: object | None = None,
        train_csv: str | Sequence[str] = "train.csv",
        dev_csv: str | Sequence[str] = "dev.csv",
        test_csv: str | Sequence[str] = "test.csv",
        alphabet: str = "alphabet.txt",
        batch_size: int = 32,
        num_workers: int | Literal["auto"] = "auto",
        sample_rate: int = 16000,
        on_bad_sample: Literal["skip", "error"] = "skip",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if (data_dir is None) == (corpus is None):
            hint = (
                " (an experiment such as `experiment=tiny` sets `data.corpus`: add "
                "`~data.corpus` to the command line to drop it)"
                if data_dir is not None
                else ""
            )
            raise ValueError(
                "Give exactly one of `data_dir` (DeepSpeech CSVs on disk) or `corpus` "
                f"(a corpus to synthesise), but got data_dir={data_dir!r}, corpus={corpus!r}"
                f"{hint}."
            )
        if batch_size < 1:
            raise ValueError(f"Expected `batch_size` >= 1, but got {batch_size}.")
        if num_workers != "auto" and (not isinstance(num_workers, int) or num_workers < 0):
            raise ValueError(f"Expected `num_workers` >= 0 or 'auto', but got {num_workers!r}.")
        if on_bad_sample not in ("skip", "error"):
            raise ValueError(
                f"Expected `on_bad_sample` to be 'skip' or 'error', but got {on_bad_sample!r}."
            )
        self.corpus = corpus
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self.csvs = {"train": train_csv, "dev": dev_csv, "test": test_csv}
        self.alphabet_file = alphabet
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.sample_rate = sample_rate
        self.on_bad_sample = on_bad_sample
        self.seed = seed
        self._alphabet: Alphabet | None = None
        self.datasets: dict[str, SpeechDataset] = {}

    @property
    def data_dir(self) -> Path:
        """The folder holding the data (building the corpus first if one was given)."""
        if self._data_dir is None:
            self._data_dir = Path(self.corpus.build())
        return self._data_dir

    @property
    def alphabet(self) -> Alphabet:
        """The output alphabet."""
        if self._alphabet is None:
            self._alphabet = Alphabet.from_file(self.data_dir / self.alphabet_file)
        return self._alphabet

    def csv_paths(self, split: str) -> list[Path]:
        """The CSV files of ``split`` ("train", "dev" or "test")."""
        value = self.csvs[split]
        names = [value] if isinstance(value, (str, Path)) else list(value)
        return [self.data_dir / name for name in names]

    def prepare_data(self) -> None:
        _ = self.data_dir  # builds the corpus once (cached and locked across processes)

    def dataset(self, split: str) -> SpeechDataset:
        """The dataset of ``split``, read on first use."""
        if split not in self.datasets:
            dataset = SpeechDataset(
                self.csv_paths(split), self.alphabet, self.sample_rate, self.on_bad_sample
            )
            if len(dataset) == 0:
                kinds = Counter(s.kind for s in dataset.skipped)
                csvs = [str(p) for p in self.csv_paths(split)]
                raise ValueError(
                    f"No usable row in the {split} CSV(s) {csvs}: all {len(dataset.skipped)} "
                    f"were skipped ({dict(kinds)}); first: "
                    f"{dataset.skipped[0].source}: {dataset.skipped[0].detail}"
                )
            rank_zero_info(f"{split}: {len(dataset)} utterances")
            self.datasets[split] = dataset
        return self.datasets[split]

    def skipped_rows(self) -> list[tuple[str, Skipped]]:
        """``(split, row)`` for every row the datasets read so far left out."""
        return [(split, row) for split, data in self.datasets.items() for row in data.skipped]

    def setup(self, stage: str) -> None:
        # fit checks the test split too, so its bad rows are reported before training
        splits = {"fit": ("train", "dev", "test"), "validate": ("dev",), "test": ("test",)}
        for split in splits.get(stage, ()):
            if self.csvs.get(split):
                self.dataset(split)

    def workers(self) -> int:
        """Dataloader workers for this run (``num_workers``, or what ``"auto"`` picks)."""
        if self.num_workers != "auto":
            return int(self.num_workers)
        if not self._on_cuda():
            return 0
        return max(0, min(8, usable_cores() // max(1, self.trainer.num_devices) - 1))

    def _on_cuda(self) -> bool:
        """Whether the attached trainer trains on CUDA GPUs (workers, pinned memory)."""
        trainer = self.trainer
        return trainer is not None and type(trainer.accelerator).__name__ == "CUDAAccelerator"

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.dataset(split)
        trainer = self.trainer
        sampler = BucketBatchSampler(
            dataset.sizes(),
            self.batch_size,
            shuffle=shuffle,
            seed=self.seed,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
        )
        if split == "train" and trainer is not None and trainer.fit_loop.epoch_loop.restarting:
            # resuming mid-epoch: the batches this epoch already trained on are not repeated
            # (resuming after an epoch's last batch, e.g. stopped in its validation: none)
            done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
            if done < len(sampler):
                sampler.skip_batches(done)
        workers = self.workers()
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=workers,
            persistent_workers=workers > 0,
            # its own generator: creating an iterator does not draw from torch's global RNG,
            # so a resumed run's dropout masks follow the same sequence as an uninterrupted one
            generator=torch.Generator().manual_seed(self.seed),
            pin_memory=self._on_cuda(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("dev", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
