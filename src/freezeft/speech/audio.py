"""Audio files as the model reads them: mono float32 at the model's rate."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio

__all__ = ["load_audio", "wav_truncation"]


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
