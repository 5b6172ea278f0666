"""Speech synthesis with the eSpeak NG library shipped by ``espeakng-loader``.

Bound through ctypes; nothing is installed system-wide. eSpeak NG keeps global
state, so one :class:`Synthesizer` serves a whole process; reproducible audio needs a
fresh process per batch of utterances (see :meth:`Synthesizer.speak`).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import numpy as np

__all__ = ["Synthesizer", "Voice", "list_variants"]

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_ESPEAK_RATE = 1
_ESPEAK_PITCH = 3
_EE_OK = 0

_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


@dataclass(frozen=True)
class Voice:
    """One speaker: an eSpeak language, a voice variant, a rate (words/min) and a pitch (0-99)."""

    language: str
    variant: str
    rate: int = 160
    pitch: int = 50

    @property
    def name(self) -> str:
        """eSpeak's ``language+variant`` voice name."""
        return f"{self.language}+{self.variant}"


def list_variants() -> list[str]:
    """Voice variants (``voices/!v``) shipped with espeakng-loader's data, sorted."""
    import os

    import espeakng_loader

    return sorted(os.listdir(os.path.join(espeakng_loader.get_data_path(), "voices", "!v")))


class Synthesizer:
    """Text to 16-bit mono audio at :attr:`sample_rate` (22.05 kHz for eSpeak NG).

    Example::

        synth = Synthesizer()
        audio = synth.speak("guten tag", Voice("de", "m3"))  # float32 numpy array in [-1, 1]
    """

    _instance: Synthesizer | None = None
    _lock = threading.Lock()

    def __new__(cls) -> Synthesizer:
        with cls._lock:
            if cls._instance is None:
                instance = super().__new__(cls)
                instance._init_library()
                cls._instance = instance
            return cls._instance

    def _init_library(self) -> None:
        import espeakng_loader

        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib = self._lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        data_path = espeakng_loader.get_data_path().encode()
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, 0)
        if rate <= 0:
            raise RuntimeError(
                f"eSpeak NG failed to initialise from {data_path.decode()!r}; "
                "reinstall espeakng-loader (`pip install --force-reinstall espeakng-loader`)."
            )
        self.sample_rate: int = rate
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._on_audio)  # keep a reference: ctypes does not
        lib.espeak_SetSynthCallback(self._callback)
        self._voice: str | None = None

    def _on_audio(self, wav, num_samples, _events) -> int:  # noqa: ANN001 - ctypes signature
        if num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0

    def speak(self, text: str, voice: Voice, seed: int = 0) -> np.ndarray:
        """Synthesise ``text`` with ``voice``; returns float32 samples in [-1, 1].

        eSpeak NG draws random numbers (``seed`` fixes them) and also carries state from
        one utterance to the next, so the same call sequence in a fresh process gives the
        same audio, but a repeated call in one process may not.
        """
        with self._lock:
            self._lib.espeak_ng_SetRandSeed(seed)
            if self._voice != voice.name:
                if self._lib.espeak_SetVoiceByName(voice.name.encode()) != _EE_OK:
                    raise ValueError(
                        f"eSpeak NG has no voice {voice.name!r}: check the language code and "
                        f"pick a variant from freezeft.speech.synth.list_variants()."
                    )
                self._voice = voice.name
            self._lib.espeak_SetParameter(_ESPEAK_RATE, int(voice.rate), 0)
            self._lib.espeak_SetParameter(_ESPEAK_PITCH, int(voice.pitch), 0)
            self._chunks = []
            data = text.encode("utf-8") + b"\0"
            status = self._lib.espeak_Synth(
                data, len(data), 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None
            )
            if status != _EE_OK:
                raise RuntimeError(f"eSpeak NG could not synthesise {text!r} (status {status})")
            chunks, self._chunks = self._chunks, []
        if not chunks:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32) / 32768.0
