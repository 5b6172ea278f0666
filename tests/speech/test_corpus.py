import csv
import errno
import hashlib
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile

from freezeft.cache import cached_entry
from freezeft.files import WriteError
from freezeft.speech.alphabet import Alphabet
from freezeft.speech.corpus import SynthCorpus
from freezeft.speech.manifest import read_csv

FULL_DISK = Path(__file__).parents[1] / "full_disk.py"


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow  # synthesises the tiny corpus
def test_corpus_is_deepspeech_format_with_real_audio(german_corpus, tiny):
    for split in ("train", "dev", "test"):
        count = tiny[f"n_{split}"]
        samples = read_csv(german_corpus / f"{split}.csv")
        assert len(samples) == count
        for sample in samples[:3]:
            info = soundfile.info(str(sample.path))
            assert info.samplerate == 16000 and info.channels == 1
            assert info.frames > 1600  # at least 0.1 s of speech
            assert sample.size == sample.path.stat().st_size
    alphabet = Alphabet.from_file(german_corpus / "alphabet.txt")
    assert {"ä", "ö", "ü", "ß", " "} <= set(alphabet.labels)


@pytest.mark.slow  # synthesises the tiny corpus
def test_heldout_voices_never_speak_training_data(german_corpus):
    with open(german_corpus / "voices.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    train = {r["voice"] for r in rows if r["wav_filename"].startswith("train/")}
    test = {r["voice"] for r in rows if r["wav_filename"].startswith("test/")}
    assert train and test and not train & test


@pytest.mark.slow  # synthesises a corpus
def test_same_settings_give_identical_files(tmp_path, german_corpus, tiny):
    again = SynthCorpus(language="de", cache_dir=str(tmp_path), **tiny).build()
    assert again != german_corpus
    for name in ("train.csv", "test.csv", "alphabet.txt", "train/00003.wav", "test/00001.wav"):
        assert digest(again / name) == digest(german_corpus / name)


@pytest.mark.slow  # synthesises a corpus
def test_russian_corpus_has_a_cyrillic_alphabet(tmp_path):
    corpus = SynthCorpus(language="ru", n_train=4, n_dev=1, n_test=1, cache_dir=str(tmp_path))
    folder = corpus.build()
    labels = Alphabet.from_file(folder / "alphabet.txt").labels
    assert "ж" in labels and "a" not in labels
    assert all(set(s.transcript) <= set(labels) for s in read_csv(folder / "train.csv"))


def test_half_built_cache_entry_is_rebuilt(tmp_path):
    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "partial.bin").write_text("killed mid-build")  # no completion marker
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "data.txt").write_text("complete")

    assert cached_entry(entry, build) == entry
    assert (entry / "data.txt").read_text() == "complete"
    assert not (entry / "partial.bin").exists()
    cached_entry(entry, build)
    assert len(calls) == 1  # the complete entry is reused


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_text():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").exists(), reason="needs /proc to find the process")
def test_the_synthesiser_stops_when_the_run_that_started_it_is_killed(tmp_path):
    cache = tmp_path / "killed-run-cache"
    script = (
        "from freezeft.speech.corpus import SynthCorpus; "
        f"SynthCorpus(language='de', cache_dir={str(cache)!r}, n_train=5000).build()"
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    while not (children := [p for p in _processes_mentioning(str(cache)) if p != parent.pid]):
        assert time.monotonic() < deadline and parent.poll() is None, "no synthesiser started"
        time.sleep(0.2)
    parent.kill()  # kill -9: no cleanup in the parent
    parent.wait()
    deadline = time.monotonic() + 60  # generous: 2 loaded cores (pytest-xdist)
    while _processes_mentioning(str(cache)):
        assert time.monotonic() < deadline, f"synthesiser {children} outlived its parent"
        time.sleep(0.2)


@pytest.mark.slow  # synthesises a corpus, twice
def test_a_damaged_corpus_is_named_and_rebuilt_with_the_same_files(tmp_path, caplog):
    corpus = SynthCorpus(language="de", n_train=3, n_dev=1, n_test=1, cache_dir=str(tmp_path))
    folder = corpus.build()
    built = {p: digest(p) for p in folder.rglob("*") if p.is_file()}
    (folder / "train" / "00000.wav").unlink()
    wav = folder / "train" / "00001.wav"
    wav.write_bytes(wav.read_bytes()[:1000])  # cut short
    (folder / "dev" / "stray.wav").write_bytes(b"RIFF")  # and a file that was never built
    with caplog.at_level(logging.WARNING, logger="freezeft.cache"):
        assert corpus.build() == folder
    assert f"The cache entry {folder} is damaged (1 of its" in caplog.text
    assert "train/00000.wav" in caplog.text and "train/00001.wav: 1000 bytes" in caplog.text
    assert "dev/stray.wav" in caplog.text
    assert {p: digest(p) for p in folder.rglob("*") if p.is_file()} == built


@pytest.mark.slow  # synthesises in a subprocess
def test_a_full_disk_while_synthesising_is_one_error_and_nothing_is_cached(
    tmp_path, monkeypatch, capfd
):
    run = subprocess.run

    def on_a_full_disk(command, **kwargs):  # the synthesiser, with the cache folder full
        assert command[1:3] == ["-m", "freezeft.speech.corpus"]
        return run([command[0], str(FULL_DISK), str(tmp_path), *command[1:]], **kwargs)

    monkeypatch.setattr(subprocess, "run", on_a_full_disk)
    corpus = SynthCorpus(language="de", n_train=2, n_dev=1, n_test=1, cache_dir=str(tmp_path))
    with pytest.raises(WriteError) as raised:
        corpus.build()
    message = str(raised.value)
    assert raised.value.errno == errno.ENOSPC
    assert re.fullmatch(
        rf"no space left on {re.escape(str(tmp_path))}/corpus/de-\w+\.building-\w+/train "
        r"\(\d+ MiB free\) while writing \S+/train/00000\.wav \(synthesising the de corpus; "
        r"nothing was cached: paths\.cache_dir or \$FREEZEFT_CACHE_DIR can point at a folder "
        r"with room\)",
        message,
    ), message
    assert "Traceback" not in capfd.readouterr().err  # the synthesiser's error came back
    assert [p.name for p in (tmp_path / "corpus").iterdir()] == [corpus.path.name + ".lock"]


def test_a_synthesiser_killed_by_a_signal_says_so_not_that_a_traceback_is_above(
    tmp_path, monkeypatch, capfd
):
    run = subprocess.run

    def killed(command, **kwargs):  # the synthesiser's process, killed as the OOM killer does
        assert command[1:3] == ["-m", "freezeft.speech.corpus"]
        suicide = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
        return run([command[0], "-c", suicide, *command[3:]], **kwargs)

    monkeypatch.setattr(subprocess, "run", killed)
    corpus = SynthCorpus(language="de", n_train=2, n_dev=1, n_test=1, cache_dir=str(tmp_path))
    with pytest.raises(RuntimeError) as raised:
        corpus.build()
    assert re.fullmatch(
        r"Synthesising the de corpus into \S+ failed: its process was killed by SIGKILL \(the "
        r"kernel's out-of-memory killer sends it: see `dmesg`\), so it printed no traceback\. "
        r"Nothing was cached\.",
        str(raised.value),
    ), str(raised.value)
    assert "Traceback" not in capfd.readouterr().err  # and indeed none was printed
    assert [p.name for p in (tmp_path / "corpus").iterdir()] == [corpus.path.name + ".lock"]


@pytest.mark.slow  # the synthesiser's own process
def test_a_synthesiser_that_crashes_names_its_error_and_its_traceback_is_above(
    tmp_path, monkeypatch, capfd
):
    run = subprocess.run

    def crashing(command, **kwargs):  # settings the synthesiser's process cannot take
        broken = json.dumps({**json.loads(command[3]), "language": "xx"})
        return run([*command[:3], broken, *command[4:]], **kwargs)

    monkeypatch.setattr(subprocess, "run", crashing)
    corpus = SynthCorpus(language="de", n_train=2, n_dev=1, n_test=1, cache_dir=str(tmp_path))
    with pytest.raises(RuntimeError) as raised:
        corpus.build()
    assert re.fullmatch(
        r"Synthesising the de corpus into \S+ failed: ValueError: Unknown corpus language 'xx'; "
        r"choose one of \[.*\]\. \(the synthesiser's traceback is printed above\)\. Nothing "
        r"was cached\.",
        str(raised.value),
    ), str(raised.value)
    assert "Traceback (most recent call last)" in capfd.readouterr().err  # it is
