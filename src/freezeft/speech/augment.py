"""Training-time augmentation for unheard voices: speed perturbation on the audio and
SpecAugment's masks on the log-mel spectrogram. Both are off in eval mode."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchaudio
from torch import Tensor, nn

__all__ = ["SpecAugment", "SpeedPerturbation"]


class SpeedPerturbation(nn.Module):
    """Kaldi-style speed perturbation: each training batch is played at a speed drawn from
    ``factors`` (tempo and pitch change together, as with a tape), by resampling.

    Args:
        factors: speeds to draw from, e.g. ``(0.9, 1.0, 1.1)``; 1.1 is 10% faster.
        sample_rate: the audio's sample rate.

    Example::

        perturb = SpeedPerturbation((0.9, 1.0, 1.1))
        audio, lengths = perturb(audio, lengths)
    """

    def __init__(self, factors: Sequence[float] = (0.9, 1.0, 1.1), sample_rate: int = 16000):
        super().__init__()
        factors = tuple(float(f) for f in factors)
        if not factors or not all(0.5 <= f <= 2.0 for f in factors):
            raise ValueError(
                f"Expected `speed_perturbation` factors in [0.5, 2], but got {factors}."
            )
        self.factors = factors
        self.sample_rate = sample_rate

    def draw(self) -> float:
        """The speed for the next batch (one draw from torch's generator)."""
        return self.factors[int(torch.randint(len(self.factors), ()))]

    def apply(self, audio: Tensor, lengths: Tensor, factor: float) -> tuple[Tensor, Tensor]:
        """Padded ``audio`` (B, S) and ``lengths`` (B,) played at speed ``factor``.

        The same audio and factor always give the same result, so a cache of what a frozen
        prefix makes of the audio can key each sample by its factor."""
        if factor == 1.0:
            return audio, lengths
        # played `factor` times faster: read as if sampled at rate * factor, back to rate
        source_rate = round(self.sample_rate * factor)
        audio = torchaudio.functional.resample(audio, source_rate, self.sample_rate)
        lengths = (lengths.double() * self.sample_rate / source_rate).floor().long()
        return audio, lengths.clamp(max=audio.shape[-1])

    def forward(self, audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Padded ``audio`` (B, S) and ``lengths`` (B,) at one speed drawn for the batch
        (unchanged in eval mode)."""
        if not self.training:
            return audio, lengths
        return self.apply(audio, lengths, self.draw())

    def extra_repr(self) -> str:
        return f"factors={self.factors}"


class SpecAugment(nn.Module):
    """SpecAugment's frequency and time masks on a batch of log-mel spectrograms (training).

    Each utterance gets its own masks (torchaudio's ``FrequencyMasking``/``TimeMasking``
    with ``iid_masks``); masked values are set to the utterance's mean level, so a mask
    hides information without adding an artificial silence.

    Args:
        freq_masks: frequency masks per utterance.
        freq_width: widest frequency mask, in mel bands.
        time_masks: time masks per utterance.
        time_width: widest time mask, in frames.

    Example::

        augment = SpecAugment(freq_masks=2, freq_width=6, time_masks=2, time_width=8)
    """

    def __init__(
        self, freq_masks: int = 2, freq_width: int = 6, time_masks: int = 2, time_width: int = 8
    ) -> None:
        super().__init__()
        for name, value in (
            ("freq_masks", freq_masks),
            ("freq_width", freq_width),
            ("time_masks", time_masks),
            ("time_width", time_width),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(
                    f"Expected `spec_augment.{name}` an integer >= 0, but got {value!r}."
                )
        self.masks = nn.ModuleList(
            [torchaudio.transforms.FrequencyMasking(freq_width, iid_masks=True)] * freq_masks
            + [torchaudio.transforms.TimeMasking(time_width, iid_masks=True)] * time_masks
        )

    def forward(self, log_mels: Tensor) -> Tensor:
        """``log_mels`` (B, n_mels, T) -> the same with masks (only in training mode)."""
        if not self.training or not len(self.masks):
            return log_mels
        mean = log_mels.mean(dim=(1, 2), keepdim=True)
        x = (log_mels - mean).unsqueeze(1)  # (B, 1, F, T): iid masks need a channel axis
        for mask in self.masks:
            x = mask(x)
        return x.squeeze(1) + mean
