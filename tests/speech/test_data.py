import shutil

import pytest
import torch

from freezeft.batching import BucketBatchSampler
from freezeft.speech.alphabet import Alphabet
from freezeft.speech.data import SpeechDataModule
from freezeft.speech.dataset import SpeechDataset
from freezeft.speech.manifest import read_csv


def test_relative_wav_paths_resolve_against_the_csv_folder(tmp_path, german_mini):
    (tmp_path / "audio").mkdir()
    shutil.copy(german_mini / "train" / "00000.wav", tmp_path / "audio" / "a.wav")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train.csv").write_text(
        "wav_filename,wav_filesize,transcript\n../audio/a.wav,123,hallo\n"
        f"{tmp_path / 'audio' / 'a.wav'},,welt\n"
    )
    samples = read_csv(tmp_path / "lists" / "train.csv")
    assert samples[0].path == tmp_path / "lists" / ".." / "audio" / "a.wav"
    assert samples[0].path.exists() and samples[1].path.exists()
    assert samples[0].size == 123 and samples[1].size == 0
    assert samples[1].source.endswith("train.csv:3")


def test_missing_columns_are_named(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("wav_filename,transcript\nx.wav,hallo\n")
    with pytest.raises(ValueError, match=r"bad.csv lacks the column\(s\) \['wav_filesize'\]"):
        read_csv(path)


def test_rows_outside_the_alphabet_are_skipped_or_refused(tmp_path, german_mini):
    wav = german_mini / "train" / "00000.wav"
    path = tmp_path / "train.csv"
    path.write_text(f"wav_filename,wav_filesize,transcript\n{wav},0,gut\n{wav},0,gut!\n{wav},0,\n")
    alphabet = Alphabet.from_file(german_mini / "alphabet.txt")
    dataset = SpeechDataset([path], alphabet)
    assert len(dataset) == 1
    assert [s.source for s in dataset.skipped] == [f"{path}:3", f"{path}:4"]
    assert "['!']" in dataset.skipped[0].detail
    with pytest.raises(ValueError, match=r"train.csv:3: transcript has characters outside"):
        SpeechDataset([path], alphabet, on_bad_sample="error")


def test_bucket_sampler_groups_similar_lengths_and_covers_every_sample():
    sizes = [50, 10, 40, 20, 30, 60, 70]
    sampler = BucketBatchSampler(sizes, batch_size=2, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert all(max(sizes[i] for i in b) - min(sizes[i] for i in b) <= 10 for b in batches)
    sampler.set_epoch(1)
    assert sorted(map(tuple, sampler)) == sorted(map(tuple, batches))


def test_bucket_sampler_shards_evenly_across_ranks():
    sizes = list(range(10))
    ranks = [list(BucketBatchSampler(sizes, 2, num_replicas=2, rank=r)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    assert {i for b in ranks[0] + ranks[1] for i in b} == set(range(10))


def test_datamodule_batches_real_audio(german_mini):
    data = SpeechDataModule(data_dir=german_mini, batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["audio"].shape[0] == 4 and batch["audio"].dtype == torch.float32
    assert batch["audio_lengths"].max() == batch["audio"].shape[1]
    assert batch["labels"].shape == (4, int(batch["label_lengths"].max()))
    for labels, n, text in zip(
        batch["labels"], batch["label_lengths"], batch["transcripts"], strict=True
    ):
        assert data.alphabet.decode(labels[:n].tolist()) == text


def test_datamodule_needs_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one of `data_dir`"):
        SpeechDataModule()
