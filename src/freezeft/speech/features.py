"""DeepSpeech's input features: MFCCs with a context window, computed on the model's device."""

from __future__ import annotations

import math

import torch
import torchaudio
from torch import Tensor, nn

from freezeft.speech.augment import SpecAugment

__all__ = ["MFCCFeatures", "STEP_MS", "WINDOW_MS"]


#: DeepSpeech's analysis window and frame step (ms): the features' and the data checks'.
WINDOW_MS = 32.0
STEP_MS = 20.0


class MFCCFeatures(nn.Module):
    """Padded audio batch -> normalised MFCC frames with ``n_context`` frames on each side.

    DeepSpeech's defaults: 16 kHz audio, 26 coefficients, 32 ms window, 20 ms step and
    ±9 frames of context, so each output frame has ``26 * (2 * 9 + 1) = 494`` values.
    Each utterance's coefficients are normalised to zero mean and unit variance over its
    own frames (padding excluded).

    Args:
        sample_rate: audio sample rate in Hz.
        n_mfcc: coefficients per frame.
        n_context: frames of context on each side.
        window_ms: analysis window length.
        step_ms: frame step.
        n_mels: mel filterbank size the coefficients are taken from.
        spec_augment: masks applied to the log-mel spectrogram while training (``None``:
            none).

    Example::

        features = MFCCFeatures()
        frames, frame_lengths = features(audio, audio_lengths)  # (B, T, 494), (B,)
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_mfcc: int = 26,
        n_context: int = 9,
        window_ms: float = WINDOW_MS,
        step_ms: float = STEP_MS,
        n_mels: int = 40,
        spec_augment: SpecAugment | None = None,
    ) -> None:
        super().__init__()
        if n_context < 0:
            raise ValueError(f"Expected `n_context` >= 0, but got {n_context}.")
        win_length = round(sample_rate * window_ms / 1000)
        self.hop_length = round(sample_rate * step_ms / 1000)
        self.n_mfcc = n_mfcc
        self.n_context = n_context
        self.mfcc = torchaudio.transforms.MFCC(
            sample_rate=sample_rate,
            n_mfcc=n_mfcc,
            melkwargs={
                "n_fft": win_length,
                "win_length": win_length,
                "hop_length": self.hop_length,
                "n_mels": n_mels,
                "center": False,
                "f_max": sample_rate / 2,
            },
        )
        self.win_length = win_length
        self.spec_augment = spec_augment

    @property
    def n_features(self) -> int:
        """Values per output frame."""
        return self.n_mfcc * (2 * self.n_context + 1)

    def frame_lengths(self, audio_lengths: Tensor) -> Tensor:
        """Number of frames for each audio length (in samples)."""
        frames = (audio_lengths - self.win_length) // self.hop_length + 1
        return frames.clamp(min=0)

    def _log_mels(self, power: Tensor, valid: Tensor) -> Tensor:
        """torchaudio MFCC's decibels (floored ``top_db`` below the loudest value), with the
        floor taken per utterance over its own frames: torchaudio's ``amplitude_to_DB`` takes
        one floor for a whole ``(B, n_mels, T)`` batch, so a loud (or NaN) file in a batch
        changed every other file's features."""
        to_db = self.mfcc.amplitude_to_DB
        log_mels = to_db.multiplier * torch.log10(power.clamp(min=to_db.amin))
        log_mels = log_mels - to_db.multiplier * to_db.db_multiplier
        if to_db.top_db is not None:
            own = log_mels.masked_fill(~valid[:, None, :], -math.inf)
            loudest = own.amax(dim=(1, 2), keepdim=True)
            floor = torch.where(torch.isfinite(loudest), loudest, torch.zeros_like(loudest))
            log_mels = torch.maximum(log_mels, floor - to_db.top_db)
        return log_mels

    def forward(self, audio: Tensor, audio_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """``audio`` (B, S) float, ``audio_lengths`` (B,) -> frames (B, T, F) and lengths (B,)."""
        if audio.shape[-1] < self.win_length:
            audio = nn.functional.pad(audio, (0, self.win_length - audio.shape[-1]))
        with torch.autocast(device_type=audio.device.type, enabled=False):
            power = self.mfcc.MelSpectrogram(audio.float())  # (B, n_mels, T)
            lengths = self.frame_lengths(audio_lengths).clamp(max=power.shape[-1])
            valid = torch.arange(power.shape[-1], device=audio.device)[None, :] < lengths[:, None]
            log_mels = self._log_mels(power, valid)
            if self.spec_augment is not None:
                log_mels = self.spec_augment(log_mels)
            # torchaudio's MFCC: the DCT of the log-mel spectrogram
            coeffs = torch.matmul(log_mels.transpose(1, 2), self.mfcc.dct_mat)  # (B, T, n_mfcc)
        mask = valid.unsqueeze(-1).to(coeffs.dtype)
        count = mask.sum(dim=1, keepdim=True).clamp(min=1)
        mean = (coeffs * mask).sum(dim=1, keepdim=True) / count
        var = ((coeffs - mean) ** 2 * mask).sum(dim=1, keepdim=True) / count
        coeffs = (coeffs - mean) / (var.sqrt() + 1e-5) * mask
        if self.n_context:
            c = self.n_context
            padded = nn.functional.pad(coeffs, (0, 0, c, c))  # zero frames before and after
            coeffs = padded.unfold(1, 2 * c + 1, 1).transpose(2, 3).flatten(2)
        return coeffs, lengths
