"""The embedded default data: spoken corpora synthesised with eSpeak NG, in DeepSpeech format.

Phrases of real words (``wordfreq``'s most frequent words per language) are spoken by
several eSpeak voice variants at varied rates and pitches, with low-level noise. Test
and dev voices are held out of training. The result is a DeepSpeech data folder
(``train.csv``, ``dev.csv``, ``test.csv``, WAVs, ``alphabet.txt``, and ``voices.csv``
saying who spoke each file), built once per settings, cached and locked, and identical
for identical settings.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio
from tqdm import tqdm

from freezeft._lightning import rank_zero_info
from freezeft.cache import cached_entry, config_key, default_cache_dir
from freezeft.files import WriteError, atomic_write, write_bytes, write_error, written_path
from freezeft.speech.alphabet import Alphabet
from freezeft.speech.synth import Synthesizer, Voice

__all__ = ["LANGUAGES", "SynthCorpus"]

#: Bump when the generated audio or text would change for the same settings.
GENERATOR_VERSION = 4

_LATIN = "abcdefghijklmnopqrstuvwxyz"

#: language code -> (eSpeak voice, alphabet labels without the space)
LANGUAGES: dict[str, tuple[str, str]] = {
    "en": ("en-us", _LATIN + "'"),
    "de": ("de", _LATIN + "äöüß"),
    "ru": ("ru", "абвгдеёжзийклмнопрстуфхцчшщъыьэюя"),
}

#: Default training voices: eSpeak's numbered male/female variants and named speakers
#: (robotic, whispering and croaking variants left out).
TRAIN_VARIANTS: tuple[str, ...] = (
    "m1", "m2", "m3", "m4", "m6", "m8", "f1", "f2", "f3", "f5", "klatt4", "adam", "aunty",
    "belinda", "benjamin", "boris", "caleb", "david", "ed", "edward", "grandpa", "ian", "john",
    "linda", "max", "norbert", "paul", "quincy", "rob", "robert",
)  # fmt: skip
#: Default held-out voices for dev and test.
HELDOUT_VARIANTS: tuple[str, ...] = ("m5", "m7", "f4", "steph", "travis")

#: One-letter words of each language; other single letters in word lists are not words.
_ONE_LETTER_WORDS: dict[str, str] = {"en": "ai", "de": "", "ru": "авикосуя"}


@dataclass(frozen=True)
class SynthCorpus:
    """Settings of a synthesised corpus; :meth:`build` returns its (cached) folder.

    Args:
        language: one of :data:`LANGUAGES` (``en`` source, ``de`` and ``ru`` targets).
        n_train: training phrases.
        voices_per_phrase: how many voices speak each training phrase (another variant,
            rate and pitch each time): ``n_train * voices_per_phrase`` training utterances.
            Perturbing speed and pitch at the source: the synthesiser renders them.
        n_dev: validation utterances.
        n_test: test utterances.
        vocabulary: how many of the language's most frequent words phrases draw from.
        max_words: words per phrase, 1 to ``max_words``.
        train_variants: eSpeak voice variants for training.
        heldout_variants: variants for dev and test, never used in training.
        rate: (min, max) speaking rate in words per minute.
        pitch: (min, max) eSpeak pitch, 0-99.
        noise_db: white noise level relative to the speech RMS (``None`` for none).
        extra_voices: voices of other synthesisers (``piper:en_US-joe-medium``,
            ``festival:cmu_us_slt_arctic_hts``; see :mod:`freezeft.speech.voices`) that
            speak a share of the training phrases; dev and test stay eSpeak's held-out voices.
        extra_share: the chance that a training utterance is spoken by one of the
            ``extra_voices`` (drawn per utterance, at the utterance's rate). With extra
            voices, the eSpeak utterances keep their voices, rates, pitches and texts but
            not their exact audio (padding, noise and level draw on); 0 gives the eSpeak
            corpus itself.
        sample_rate: output sample rate.
        seed: the corpus' seed: the same settings give the same files.
        cache_dir: where corpora are kept (default :func:`~freezeft.cache.default_cache_dir`).

    Example::

        data_dir = SynthCorpus(language="de", n_train=200).build()
    """

    language: str = "de"
    n_train: int = 2000
    voices_per_phrase: int = 1
    n_dev: int = 200
    n_test: int = 200
    vocabulary: int = 2000
    max_words: int = 3
    train_variants: Sequence[str] = TRAIN_VARIANTS
    heldout_variants: Sequence[str] = HELDOUT_VARIANTS
    rate: Sequence[int] = (130, 190)
    pitch: Sequence[int] = (35, 65)
    noise_db: float | None = -30.0
    extra_voices: Sequence[str] = ()
    extra_share: float = 0.5
    sample_rate: int = 16000
    seed: int = 0
    cache_dir: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.language not in LANGUAGES:
            raise ValueError(
                f"Unknown corpus language {self.language!r}; choose one of {sorted(LANGUAGES)}."
            )
        for name in ("n_train", "voices_per_phrase", "n_dev", "n_test", "vocabulary", "max_words"):
            if getattr(self, name) < 1:
                raise ValueError(f"Expected `{name}` >= 1, but got {getattr(self, name)}.")
        share = self.extra_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
            raise ValueError(f"Expected `extra_share` a number in [0, 1], but got {share!r}.")
        if isinstance(self.extra_voices, str):  # one voice, as Hydra's command line gives it
            object.__setattr__(self, "extra_voices", (self.extra_voices,))
        names = [str(name).strip() for name in self.extra_voices]
        if len(set(names)) < len(names):
            twice = sorted({name for name in names if names.count(name) > 1})
            raise ValueError(
                f"`extra_voices` names {twice} more than once; name each voice once (each "
                "utterance of the extra share draws one of them, all equally likely)."
            )
        # share 0: no extra voice speaks, so the corpus is the eSpeak one (same files, same key)
        object.__setattr__(self, "extra_voices", tuple(names) if share > 0 else ())
        if not self.train_variants or not self.heldout_variants:
            raise ValueError("Both `train_variants` and `heldout_variants` need a variant.")
        overlap = set(self.train_variants) & set(self.heldout_variants)
        if overlap:
            raise ValueError(
                f"Voice variants {sorted(overlap)} are both in training and held out; "
                "held-out voices must not be trained on."
            )
        # Hydra hands lists over as ListConfig; keep plain tuples so settings hash and pickle.
        for name in ("train_variants", "heldout_variants", "rate", "pitch"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self._check_voices()  # to synthesise: say now what is missing

    def _check_voices(self) -> None:
        """One line for an extra voice that cannot speak here, unless the corpus is built."""
        if not self.extra_voices or self.path.is_dir():
            return
        from freezeft.speech.voices import check_voice

        for voice in self.extra_voices:
            check_voice(voice)

    @property
    def alphabet(self) -> Alphabet:
        """Space plus the language's letters."""
        return Alphabet([" ", *LANGUAGES[self.language][1]])

    def settings(self) -> dict:
        """Everything that determines the corpus' content."""
        settings = asdict(self)
        settings.pop("cache_dir")
        if not self.extra_voices:  # eSpeak alone: the key corpora had before extra voices
            del settings["extra_voices"], settings["extra_share"]
        settings["generator_version"] = GENERATOR_VERSION
        return settings

    @property
    def path(self) -> Path:
        """Where the built corpus lives."""
        root = Path(self.cache_dir) if self.cache_dir else default_cache_dir()
        return root / "corpus" / f"{self.language}-{config_key(self.settings())}"

    def build(self) -> Path:
        """Synthesise the corpus unless it is cached; returns its folder."""
        self._check_voices()  # a missing engine: one line, before the synthesiser starts
        return cached_entry(self.path, self._write_in_fresh_process, self.settings())

    def _write_in_fresh_process(self, folder: Path) -> None:
        # eSpeak NG's output depends on what it synthesised before in the same process;
        # a fresh process per corpus makes the files depend on the settings alone. A plain
        # subprocess (not multiprocessing) also works inside joblib/loky and daemon workers.
        # A write that fails there (a full disk) comes back through a pipe as one line.
        command = [sys.executable, "-m", "freezeft.speech.corpus", json.dumps(asdict(self))]
        read, write = os.pipe()
        try:
            done = subprocess.run(  # its progress shows
                [*command, str(folder), str(os.getpid()), str(write)], pass_fds=(write,)
            )
        finally:
            os.close(write)
            with os.fdopen(read, "rb") as pipe:
                reported = pipe.read()
        try:
            failure = json.loads(reported) if reported else {}
        except ValueError:  # cut off mid-write: as if nothing came
            failure = {}
        if "errno" in failure:
            raise WriteError(
                failure["errno"],
                f"{failure['message']} (synthesising the {self.language} corpus; nothing was "
                "cached: paths.cache_dir or $FREEZEFT_CACHE_DIR can point at a folder with room)",
                failure["path"],
            )
        if done.returncode != 0:
            raise RuntimeError(
                f"Synthesising the {self.language} corpus into {folder} failed: "
                f"{_how_it_ended(done.returncode, failure.get('error'))}. Nothing was cached."
            )

    def words(self) -> list[str]:
        """The lexicon: frequent words spelled only with the alphabet's letters."""
        import wordfreq

        letters = set(LANGUAGES[self.language][1])
        one_letter = _ONE_LETTER_WORDS.get(self.language, "")
        words = []
        for word in wordfreq.top_n_list(self.language, self.vocabulary * 3):
            word = word.lower()
            if len(word) == 1 and word not in one_letter:
                continue
            if word and set(word) <= letters and word.strip("'") == word:
                words.append(word)
            if len(words) == self.vocabulary:
                break
        return words

    def _write(self, folder: Path) -> None:
        rank_zero_info(f"Synthesising the {self.language} corpus into {self.path} (one-time)...")
        words = self.words()
        synth = Synthesizer()
        from freezeft.speech.voices import speaker

        extra = [speaker(name, seed=self.seed) for name in self.extra_voices]
        espeak_voice = LANGUAGES[self.language][0]
        splits = (
            ("train", self.n_train, self.train_variants, self.voices_per_phrase),
            ("dev", self.n_dev, self.heldout_variants, 1),
            ("test", self.n_test, self.heldout_variants, 1),
        )
        total = self.n_train * self.voices_per_phrase + self.n_dev + self.n_test
        voices = [["wav_filename", "voice", "rate", "pitch"]]
        with tqdm(total=total, desc=f"Synthesising {self.language} corpus", unit="utt") as bar:
            for split_index, (split, count, variants, repeats) in enumerate(splits):
                (folder / split).mkdir()
                rows = [["wav_filename", "wav_filesize", "transcript"]]
                for i in range(count):
                    rng = np.random.default_rng([self.seed, split_index, i])
                    n_words = int(rng.integers(1, self.max_words + 1))
                    text = " ".join(words[int(j)] for j in rng.integers(0, len(words), n_words))
                    for repeat in range(repeats):
                        if repeat:  # the phrase again, in another voice
                            rng = np.random.default_rng([self.seed, split_index, i, repeat])
                        voice = Voice(
                            espeak_voice,
                            variants[int(rng.integers(0, len(variants)))],
                            rate=int(rng.integers(self.rate[0], self.rate[1] + 1)),
                            pitch=int(rng.integers(self.pitch[0], self.pitch[1] + 1)),
                        )
                        espeak_seed = int(rng.integers(2**31))
                        speaker_name, pitch = voice.name, voice.pitch
                        if split == "train" and extra and rng.random() < self.extra_share:
                            index = int(rng.integers(0, len(extra)))
                            spoken, spoken_rate = extra[index].speak(text, voice.rate)
                            speaker_name, pitch = self.extra_voices[index], ""  # its own pitch
                        else:
                            spoken = synth.speak(text, voice, seed=espeak_seed)
                            spoken_rate = synth.sample_rate
                        audio = self._render(spoken, spoken_rate, rng)
                        relative = f"{split}/{i:05d}{f'-{repeat}' if repeat else ''}.wav"
                        wav = io.BytesIO()  # the same bytes as soundfile writes to a file
                        soundfile.write(wav, audio, self.sample_rate, "PCM_16", format="WAV")
                        write_bytes(folder / relative, wav.getvalue())  # errors in words
                        rows.append([relative, len(wav.getvalue()), text])
                        voices.append([relative, speaker_name, voice.rate, pitch])
                        bar.update()
                _write_csv(folder / f"{split}.csv", rows)
        _write_csv(folder / "voices.csv", voices)
        self.alphabet.to_file(folder / "alphabet.txt")

    def _render(self, audio: np.ndarray, rate: int, rng: np.random.Generator) -> np.ndarray:
        """Resample, add a little silence and noise, and set a random level."""
        audio = torchaudio.functional.resample(torch.from_numpy(audio), rate, self.sample_rate)
        audio = audio.numpy()
        pad = rng.integers(0, self.sample_rate // 10, size=2)
        audio = np.concatenate([np.zeros(pad[0]), audio, np.zeros(pad[1])]).astype(np.float32)
        if self.noise_db is not None:
            rms = float(np.sqrt(np.mean(audio**2))) if audio.size else 0.0
            audio += (
                rng.standard_normal(audio.size).astype(np.float32)
                * rms
                * 10 ** (self.noise_db / 20)
            )
        peak = float(np.abs(audio).max()) if audio.size else 0.0
        if peak > 0:
            audio *= float(rng.uniform(0.3, 0.9)) / peak
        return audio


def _write_csv(path: Path, rows: list[list]) -> None:
    with atomic_write(path, newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)


def _synthesise(settings: str, folder: Path, report: int | None) -> None:
    """The fresh process' work; a write that fails (an ``OSError``: a full disk, a folder
    gone) is sent to the parent as one line through the file descriptor ``report``. Any
    other error is sent as its first line, then raised (its traceback printed)."""
    try:
        SynthCorpus(**json.loads(settings))._write(folder)
    except OSError as err:
        if report is None:
            raise
        path = written_path(err) or folder
        failure = err if isinstance(err, WriteError) else write_error(err, path)
        with os.fdopen(report, "w") as stream:
            json.dump({"errno": failure.errno, "message": str(failure), "path": str(path)}, stream)
        sys.exit(1)
    except Exception as err:
        if report is not None:
            first = (str(err).strip().splitlines() or [""])[0]
            error = f"{type(err).__name__}: {first}" if first else type(err).__name__
            with os.fdopen(report, "w") as stream:
                json.dump({"error": error}, stream)
        raise


def _how_it_ended(returncode: int, error: str | None) -> str:
    """Why the synthesiser process stopped, as far as its exit status and report say: a
    traceback is mentioned only where the process printed one."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        oom = " (the kernel's out-of-memory killer sends it: see `dmesg`)"
        return (
            f"its process was killed by {name}{oom if name == 'SIGKILL' else ''}, so it "
            "printed no traceback"
        )
    if error:
        return f"{error} (the synthesiser's traceback is printed above)"
    return f"its process exited with code {returncode} without saying why"


def _exit_with_parent(parent: int) -> None:
    """Stop this synthesiser process when the process that started it dies (kill -9)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before prctl took effect (or not Linux: poll)
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


if __name__ == "__main__":  # SynthCorpus.build's fresh process: <settings> <folder> <pid> [<fd>]
    _exit_with_parent(int(sys.argv[3]))
    # Ctrl-C reaches the whole process group: the parent reports it, this process just ends
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    _synthesise(sys.argv[1], Path(sys.argv[2]), int(sys.argv[4]) if len(sys.argv) > 4 else None)
