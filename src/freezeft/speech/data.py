"""DeepSpeech-format data (CSV manifests + alphabet) as a Lightning DataModule.

Batches hold utterances of similar length (DeepSpeech sorts by file size) so little time
goes to padding.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from freezeft._lightning import pl, rank_zero_info
from freezeft.batching import BucketBatchSampler
from freezeft.machine import usable_cores
from freezeft.speech.alphabet import Alphabet
from freezeft.speech.dataset import (
    MAX_DURATION_S,
    Skipped,
    SpeechDataset,
    check_max_duration,
    check_on_bad_sample,
    collate,
)

__all__ = ["SpeechDataModule"]


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
        language: the data's language as a ``wordfreq`` code (``de``, ``fr``...): the scorer
            takes its words from that language's word list. A corpus knows its own.
        max_duration_s: audio longer than this many seconds is skipped as ``too long`` (a
            recording, not an utterance: its loss and gradients overflow); ``None``: no limit.

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
        language: str | None = None,
        max_duration_s: float | None = MAX_DURATION_S,
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
        check_on_bad_sample(on_bad_sample)
        check_max_duration(max_duration_s)
        self.corpus = corpus
        self._data_dir = Path(data_dir).expanduser() if data_dir is not None else None
        if self._data_dir is not None and not self._data_dir.is_dir():
            where = "is a file, not a folder" if self._data_dir.exists() else "does not exist"
            raise FileNotFoundError(
                f"The data folder {self._data_dir} (data_dir) {where}: give the folder that "
                "holds your DeepSpeech CSVs and alphabet.txt."
            )
        self.csvs = {"train": train_csv, "dev": dev_csv, "test": test_csv}
        self.alphabet_file = alphabet
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.sample_rate = sample_rate
        self.on_bad_sample = on_bad_sample
        self.max_duration_s = max_duration_s
        self.seed = seed
        self._language = language
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
            known = getattr(self.corpus, "alphabet", None)  # a corpus knows it before it is built
            self._alphabet = known or Alphabet.from_file(self.data_dir / self.alphabet_file)
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
                self.csv_paths(split),
                self.alphabet,
                self.sample_rate,
                self.on_bad_sample,
                max_duration_s=self.max_duration_s,
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

    # -- freezeft.app.task: what the app may ask of a task's data (every hook optional) ------
    @property
    def language(self) -> str | None:
        """The data's language: ``language`` if given, else the corpus' (``None``: unknown)."""
        return self._language or getattr(self.corpus, "language", None)

    def model_kwargs(self) -> dict[str, Any]:
        """The model's output labels (the alphabet's) and the data's language."""
        return {"labels": self.alphabet.labels, "language": self.language}

    def describe(self) -> dict[str, Any]:
        """The language (synthesised corpora), training utterances and batch size."""
        return {
            "language": self.language,
            "train_utterances": len(self.dataset("train")),
            "batch_size": self.batch_size,
        }

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
