"""Fault injection: every kind of bad DeepSpeech input, built on real files.

Each case must end in an error that names the file and row and says what to do, or in
a counted skip whose reason says the same; never a traceback from deep inside torch.
"""

from __future__ import annotations

import os
import shutil
import signal
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import soundfile

from freezeft.speech.alphabet import Alphabet
from freezeft.speech.audio import load_audio
from freezeft.speech.data import SpeechDataModule
from freezeft.speech.dataset import SpeechDataset, collate
from freezeft.speech.manifest import read_csv

HEADER = "wav_filename,wav_filesize,transcript\n"


@pytest.fixture
def speech(german_mini) -> tuple[np.ndarray, str]:
    """One real utterance (16 kHz float audio) and its transcript."""
    wav = german_mini / "train" / "00000.wav"
    transcript = (german_mini / "train.csv").read_text().splitlines()[1].split(",", 2)[2]
    audio, rate = soundfile.read(wav, dtype="float32")
    assert rate == 16000
    return audio, transcript


@pytest.fixture
def alphabet(german_mini) -> Alphabet:
    return Alphabet.from_file(german_mini / "alphabet.txt")


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text(HEADER + "".join(f"{wav},0,{text}\n" for wav, text in rows))
    return path


def only_skip(dataset: SpeechDataset):
    assert len(dataset.skipped) == 1, dataset.skipped
    return dataset.skipped[0]


# -- CSV files ---------------------------------------------------------------------------


def test_missing_csv_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CSV file .*nope.csv does not exist"):
        read_csv(tmp_path / "nope.csv")


def test_wrong_header_names_the_columns(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("file,size,text\nx.wav,1,hallo\n")
    with pytest.raises(ValueError, match=r"bad.csv lacks the column\(s\).*its header is"):
        read_csv(path)


def test_empty_and_header_only_csv(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match=r"empty.csv is empty; expected the header"):
        read_csv(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text(HEADER)
    with pytest.raises(ValueError, match=r"header.csv has a header but no rows"):
        read_csv(tmp_path / "header.csv")


def test_non_utf8_csv_names_the_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes((HEADER + "a.wav,0,gut\nb.wav,0,schön\n").encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.csv is not UTF-8 text: line 3 .*save the file"):
        read_csv(path)


def test_duplicate_rows_are_skipped(tmp_path, speech, alphabet):
    audio, text = speech
    soundfile.write(tmp_path / "a.wav", audio, 16000)
    path = write_csv(tmp_path / "train.csv", [("a.wav", text), ("a.wav", text)])
    dataset = SpeechDataset([path], alphabet)
    skip = only_skip(dataset)
    assert len(dataset) == 1 and skip.kind == "duplicate"
    assert skip.source == f"{path}:3" and skip.detail == f"duplicate of {path}:2"


def test_relative_path_outside_the_csv_folder(tmp_path, speech, alphabet):
    audio, text = speech
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "lists").mkdir()
    soundfile.write(tmp_path / "elsewhere" / "a.wav", audio, 16000)
    soundfile.write(tmp_path / "lists" / "b.wav", audio, 16000)
    path = write_csv(
        tmp_path / "lists" / "train.csv", [("../elsewhere/a.wav", text), ("b.wav", text)]
    )
    skip = only_skip(SpeechDataset([path], alphabet))
    assert skip.kind == "outside CSV folder" and "leaves the CSV's folder" in skip.detail
    assert "give an absolute path" in skip.detail


def test_a_symlinked_audio_folder_inside_the_csv_folder_is_fine(tmp_path, speech, alphabet):
    audio, text = speech
    (tmp_path / "store").mkdir()
    soundfile.write(tmp_path / "store" / "a.wav", audio, 16000)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "audio").symlink_to(tmp_path / "store")
    path = write_csv(tmp_path / "data" / "train.csv", [("audio/a.wav", text)])
    dataset = SpeechDataset([path], alphabet)
    assert len(dataset) == 1 and not dataset.skipped


def test_an_unquoted_comma_in_a_transcript_is_a_bad_row(tmp_path, speech, alphabet):
    audio, text = speech
    soundfile.write(tmp_path / "a.wav", audio, 16000)
    soundfile.write(tmp_path / "b.wav", audio, 16000)
    path = tmp_path / "train.csv"
    path.write_text(HEADER + f"a.wav,0,{text}\nb.wav,0,be as, for\n")
    skip = only_skip(SpeechDataset([path], alphabet))
    assert skip.source.endswith("train.csv:3") and skip.kind == "extra fields"
    assert "unquoted comma in the transcript" in skip.detail
    with pytest.raises(ValueError, match=r"train.csv:3: the row has 1 field\(s\) more"):
        SpeechDataset([path], alphabet, on_bad_sample="error")


def test_excel_csv_and_alphabet_with_a_byte_order_mark_are_read(tmp_path, speech, german_mini):
    audio, text = speech
    soundfile.write(tmp_path / "a.wav", audio, 16000)
    path = tmp_path / "train.csv"
    path.write_bytes(b"\xef\xbb\xbf" + f"{HEADER}a.wav,0,{text}\n".encode())  # Excel's CSV UTF-8
    (tmp_path / "alphabet.txt").write_bytes(
        b"\xef\xbb\xbf# labels\n" + (german_mini / "alphabet.txt").read_bytes()
    )
    alphabet = Alphabet.from_file(tmp_path / "alphabet.txt")
    assert alphabet.labels == Alphabet.from_file(german_mini / "alphabet.txt").labels
    assert len(SpeechDataset([path], alphabet)) == 1


def test_bad_test_rows_are_reported_before_training(tmp_path, speech, german_mini):
    audio, text = speech
    shutil.copy(german_mini / "alphabet.txt", tmp_path)
    soundfile.write(tmp_path / "a.wav", audio, 16000)
    for split in ("train", "dev"):
        write_csv(tmp_path / f"{split}.csv", [("a.wav", text)])
    write_csv(tmp_path / "test.csv", [("a.wav", text), ("gone.wav", text)])
    data = SpeechDataModule(data_dir=str(tmp_path))
    data.setup("fit")
    assert [(split, row.kind) for split, row in data.skipped_rows()] == [("test", "missing audio")]


def test_an_unclosed_quote_that_swallows_rows_is_an_error_naming_the_row(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text(HEADER + 'a.wav,0,"uhr bei\nb.wav,0,gut\nc.wav,0,gut\n')
    with pytest.raises(ValueError, match=r"train.csv:2: a field runs over 3 more line\(s\)"):
        read_csv(path)


def test_blank_lines_are_skipped_like_empty_ones(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text(HEADER + "a.wav,0,gut\n   \n\nb.wav,0,gut\n")
    assert [s.path.name for s in read_csv(path)] == ["a.wav", "b.wav"]


# -- audio -------------------------------------------------------------------------------


def test_missing_unreadable_truncated_and_empty_audio(tmp_path, speech, alphabet):
    audio, text = speech
    soundfile.write(tmp_path / "good.wav", audio, 16000, subtype="PCM_16")
    whole = (tmp_path / "good.wav").read_bytes()
    (tmp_path / "truncated.wav").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "garbage.wav").write_bytes(b"this is not audio at all")
    soundfile.write(tmp_path / "empty.wav", audio[:0], 16000)
    rows = [
        (name, text)
        for name in ("good.wav", "missing.wav", "garbage.wav", "truncated.wav", "empty.wav")
    ]
    path = write_csv(tmp_path / "train.csv", rows)
    dataset = SpeechDataset([path], alphabet)
    assert len(dataset) == 1
    kinds = {s.source.rsplit(":", 1)[1]: (s.kind, s.detail) for s in dataset.skipped}
    assert kinds["3"][0] == "missing audio" and "missing.wav does not exist" in kinds["3"][1]
    assert kinds["4"][0] == "unreadable audio" and "garbage.wav" in kinds["4"][1]
    assert kinds["5"][0] == "truncated audio"
    assert f"declares {len(whole) - 44} data bytes" in kinds["5"][1]
    assert kinds["6"] == ("empty audio", f"audio file {tmp_path / 'empty.wav'} has no samples")
    with pytest.raises(
        ValueError,
        match=r"train.csv:3: audio file .*missing.wav does not exist\. .*data.on_bad_sample=skip",
    ):
        SpeechDataset([path], alphabet, on_bad_sample="error")


def test_a_symlink_loop_as_audio_is_a_skipped_unreadable_row(tmp_path, speech, alphabet):
    audio, text = speech
    soundfile.write(tmp_path / "good.wav", audio, 16000)
    (tmp_path / "loop.wav").symlink_to("loop.wav")  # ln -s loop.wav loop.wav
    (tmp_path / "ping.wav").symlink_to("pong.wav")  # two links pointing at each other
    (tmp_path / "pong.wav").symlink_to("ping.wav")
    rows = [("good.wav", text), ("loop.wav", text), ("ping.wav", text)]
    path = write_csv(tmp_path / "train.csv", rows)
    dataset = SpeechDataset([path], alphabet)
    assert len(dataset) == 1
    assert [(s.source, s.kind) for s in dataset.skipped] == [
        (f"{path}:3", "unreadable audio"),
        (f"{path}:4", "unreadable audio"),
    ]
    assert all("is a symlink loop" in s.detail for s in dataset.skipped), dataset.skipped
    assert "loop.wav is a symlink loop" in dataset.skipped[0].detail
    with pytest.raises(ValueError, match=r"train.csv:3: audio file .*loop.wav is a symlink loop"):
        SpeechDataset([path], alphabet, on_bad_sample="error")


def test_other_rates_and_stereo_are_converted_with_a_note(tmp_path, speech, alphabet, caplog):
    audio, text = speech
    soundfile.write(tmp_path / "8k.wav", audio[::2], 8000)
    soundfile.write(tmp_path / "stereo.wav", np.stack([audio, audio], axis=1), 16000)
    path = write_csv(tmp_path / "train.csv", [("8k.wav", text), ("stereo.wav", text)])
    dataset = SpeechDataset([path], alphabet)
    assert len(dataset) == 2 and not dataset.skipped
    assert dataset.notes == {
        "resampled from 8000 Hz to 16000 Hz": 1,
        "downmixed from 2 channels to mono": 1,
    }
    resampled, stereo = dataset[0]["audio"], dataset[1]["audio"]
    assert abs(len(resampled) - len(audio)) <= 2
    assert np.allclose(stereo.numpy(), audio, atol=1e-6)


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "FLOAT", "DOUBLE"])
def test_8bit_and_float_wavs_load(tmp_path, speech, subtype):
    audio, _ = speech
    soundfile.write(tmp_path / "a.wav", audio, 16000, subtype=subtype)
    loaded = load_audio(tmp_path / "a.wav", 16000)
    assert loaded.dtype == np.float32 and len(loaded) == len(audio)
    assert np.abs(loaded - audio).max() < (0.02 if subtype == "PCM_U8" else 1e-4)


# -- transcripts -------------------------------------------------------------------------


def test_empty_and_foreign_transcripts_are_listed_per_row(tmp_path, speech, alphabet):
    audio, text = speech
    soundfile.write(tmp_path / "a.wav", audio, 16000)
    soundfile.write(tmp_path / "b.wav", audio, 16000)
    soundfile.write(tmp_path / "c.wav", audio, 16000)
    path = write_csv(tmp_path / "train.csv", [("a.wav", ""), ("b.wav", "café!"), ("c.wav", text)])
    dataset = SpeechDataset([path], alphabet)
    assert [(s.source, s.kind) for s in dataset.skipped] == [
        (f"{path}:2", "empty transcript"),
        (f"{path}:3", "outside alphabet"),
    ]
    assert "['!', 'é']" in dataset.skipped[1].detail


def test_audio_too_short_for_its_transcript(tmp_path, speech, alphabet):
    audio, text = speech
    soundfile.write(tmp_path / "short.wav", audio[:1600], 16000)  # 0.1 s: 4 frames
    path = write_csv(tmp_path / "train.csv", [("short.wav", "aa bb")])
    skip = only_skip(SpeechDataset([path], alphabet))
    assert skip.kind == "too short for transcript"
    # 5 labels + 2 repeats (aa, bb) need 7 frames; 0.1 s gives (1600 - 512) // 320 + 1 = 4
    assert "4 frames (0.10 s) for 5 labels, CTC needs at least 7" in skip.detail
    assert "Not enough time for target transition sequence" in skip.detail


def test_a_split_with_no_usable_row_is_an_error(tmp_path, alphabet, german_mini):
    shutil.copy(german_mini / "alphabet.txt", tmp_path / "alphabet.txt")
    for split in ("train", "dev", "test"):
        write_csv(tmp_path / f"{split}.csv", [("gone.wav", "gut")])
    data = SpeechDataModule(data_dir=tmp_path)
    with pytest.raises(
        ValueError, match=r"No usable row in the train CSV.*1 were skipped.*missing audio"
    ):
        data.setup("fit")


# -- attack round 4 (issue 33): long recordings, runaway CSV fields, NaN audio ------------


def test_a_recording_longer_than_max_duration_is_skipped_as_too_long(tmp_path, speech, alphabet):
    audio, text = speech
    soundfile.write(tmp_path / "good.wav", audio, 16000)
    soundfile.write(tmp_path / "long.wav", np.zeros(61 * 16000, np.int16), 16000)  # 61 s
    path = write_csv(tmp_path / "train.csv", [("good.wav", text), ("long.wav", text)])
    skip = only_skip(SpeechDataset([path], alphabet))  # the default limit: 60 s
    assert (skip.source, skip.kind) == (f"{path}:3", "too long")
    assert skip.detail.startswith(f"audio file {tmp_path / 'long.wav'} lasts 61.0 s, more than ")
    assert "data.max_duration_s=60 s" in skip.detail and "cut it into utterances" in skip.detail
    assert len(SpeechDataset([path], alphabet, max_duration_s=None)) == 2  # null: no limit
    assert len(SpeechDataset([path], alphabet, max_duration_s=61.5)) == 2
    with pytest.raises(ValueError, match=r"train.csv:3: audio file .*long.wav lasts 61.0 s"):
        SpeechDataset([path], alphabet, on_bad_sample="error")


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), "60", True])
def test_a_max_duration_that_is_no_positive_number_is_refused(tmp_path, value):
    with pytest.raises(ValueError, match=r"Expected `max_duration_s` to be a number of seconds"):
        SpeechDataModule(data_dir=tmp_path, max_duration_s=value)


def test_an_unclosed_quote_in_a_large_csv_names_its_line(tmp_path):
    # past the CSV reader's field limit (131072 characters) the reader raised _csv.Error
    path = tmp_path / "train.csv"
    rows = [f"{i}.wav,0,gut\n" for i in range(5)] + ['5.wav,0,"gut\n'] + ["x.wav,0,gut\n"] * 20000
    path.write_text(HEADER + "".join(rows))
    with pytest.raises(ValueError, match=r"train.csv:7: a field runs over at least \d+ more line"):
        read_csv(path)


def test_a_nul_byte_in_a_csv_names_its_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes((HEADER + "a.wav,0,gut\nb\0.wav,0,gut\n").encode())
    with pytest.raises(ValueError, match=r"train.csv:3: the row holds a NUL byte"):
        read_csv(path)


def test_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text(HEADER + "a.wav,0,gut\n\n\nb.wav,x,gut\n")
    with pytest.raises(ValueError, match=r"train.csv:5: wav_filesize must be an integer"):
        read_csv(path)


def write_audio_splits(folder: Path, audio: np.ndarray, text: str, bad: str) -> None:
    """train/dev/test CSVs, each with a good row and a row whose audio is ``bad``."""
    soundfile.write(folder / "good.wav", audio, 16000)
    for split in ("train", "dev", "test"):
        write_csv(folder / f"{split}.csv", [("good.wav", text), (bad, text)])


@pytest.mark.parametrize("subtype", ["FLOAT", "DOUBLE"])
def test_nan_and_infinite_audio_is_skipped_in_every_split(tmp_path, speech, german_mini,
                                                          subtype):  # fmt: skip
    audio, text = speech
    shutil.copy(german_mini / "alphabet.txt", tmp_path)
    bad = audio.copy()
    bad[1600:1700] = np.nan
    bad[2000] = np.inf
    soundfile.write(tmp_path / "nan.wav", bad, 16000, subtype=subtype)
    write_audio_splits(tmp_path, audio, text, "nan.wav")
    data = SpeechDataModule(data_dir=tmp_path)
    data.setup("fit")
    assert [(split, row.kind) for split, row in data.skipped_rows()] == [
        ("train", "non-finite audio"),
        ("dev", "non-finite audio"),
        ("test", "non-finite audio"),
    ]
    detail = data.skipped_rows()[0][1].detail
    assert detail.startswith(f"audio file {tmp_path / 'nan.wav'} has 101 non-finite sample(s)")
    assert "the first at 0.100 s" in detail
    with pytest.raises(ValueError, match=r"train.csv:3: audio file .*nan.wav has 101 non-finite"):
        SpeechDataModule(data_dir=tmp_path, on_bad_sample="error").setup("fit")


def test_audio_that_decodes_to_nan_later_leaves_its_batch(tmp_path, speech, alphabet):
    # the row check passed (a finite file, replaced afterwards): the batch goes on without it
    audio, text = speech
    soundfile.write(tmp_path / "a.wav", audio, 16000)
    soundfile.write(tmp_path / "b.wav", audio, 16000)
    dataset = SpeechDataset([write_csv(tmp_path / "t.csv", [("a.wav", text), ("b.wav", text)])],
                            alphabet)  # fmt: skip
    soundfile.write(tmp_path / "b.wav", np.full_like(audio, np.nan), 16000, subtype="FLOAT")
    batch = collate([dataset[0], dataset[1]])
    assert batch["paths"] == [str(tmp_path / "a.wav")]
    (left_out,) = batch["unreadable"]
    assert left_out["kind"] == "non-finite audio" and left_out["source"].endswith("t.csv:3")
    assert "b.wav decodes to" in left_out["detail"] and "non-finite sample(s)" in left_out["detail"]


def test_nfd_transcripts_and_alphabet_are_read_as_nfc(tmp_path, speech, german_mini):
    audio, _ = speech
    soundfile.write(tmp_path / "a.wav", audio, 16000)
    nfd = unicodedata.normalize("NFD", "über")
    assert len(nfd) == 5  # u + a combining diaeresis
    path = write_csv(tmp_path / "train.csv", [("a.wav", nfd)])
    assert read_csv(path)[0].transcript == "über"
    dataset = SpeechDataset([path], Alphabet.from_file(german_mini / "alphabet.txt"))
    assert len(dataset) == 1 and not dataset.skipped
    # an alphabet file written in NFD reads its ü as one label
    (tmp_path / "alphabet.txt").write_text(unicodedata.normalize("NFD", " \nb\ne\nr\nu\nü\n"))
    alphabet = Alphabet.from_file(tmp_path / "alphabet.txt")
    assert alphabet.labels == [" ", "b", "e", "r", "u", "ü"]
    assert alphabet.encode(nfd) == alphabet.encode("über") == [5, 1, 2, 3]


def test_an_alphabet_without_the_space_label_is_refused(tmp_path, speech, german_mini):
    audio, text = speech
    labels = Alphabet.from_file(german_mini / "alphabet.txt").labels
    (tmp_path / "alphabet.txt").write_text("".join(f"{c}\n" for c in labels if c != " "))
    soundfile.write(tmp_path / "a.wav", audio, 16000)
    for split in ("train", "dev", "test"):
        write_csv(tmp_path / f"{split}.csv", [("a.wav", "gut"), ("a.wav", "uhr bei")])
    with pytest.raises(
        ValueError,
        match=rf"alphabet file {tmp_path / 'alphabet.txt'} has no space label \(' '\), but the "
        r"transcripts have spaces \(first: .*train.csv:3: 'uhr bei'\).*Add a line holding a "
        r"single space",
    ):
        SpeechDataModule(data_dir=tmp_path).setup("fit")  # skip mode too: no row is at fault


def test_a_device_and_a_fifo_as_audio_are_unreadable_not_missing(tmp_path, speech, alphabet):
    audio, text = speech
    soundfile.write(tmp_path / "good.wav", audio, 16000)
    os.mkfifo(tmp_path / "fifo.wav")
    (tmp_path / "folder.wav").mkdir()
    rows = [("good.wav", text), ("/dev/zero", text), ("fifo.wav", text), ("folder.wav", text)]
    path = write_csv(tmp_path / "train.csv", rows)
    signal.alarm(20)  # opening the FIFO would block: fail instead of hanging
    try:
        dataset = SpeechDataset([path], alphabet)
    finally:
        signal.alarm(0)
    assert len(dataset) == 1
    assert [(s.kind, s.detail) for s in dataset.skipped] == [
        ("unreadable audio", "audio file /dev/zero is a character device, not a regular file; "
         "point the row at an audio file"),
        ("unreadable audio", f"audio file {tmp_path / 'fifo.wav'} is a FIFO (named pipe), not a "
         "regular file; point the row at an audio file"),
        ("unreadable audio", f"audio file {tmp_path / 'folder.wav'} is a folder, not an audio "
         "file"),
    ]  # fmt: skip
