"""The DeepSpeech acoustic model: three dense layers, one LSTM, two dense layers, CTC output."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["DeepSpeech", "LAYER_NAMES"]

#: DeepSpeech's layer names, input to output; ``drop_source_layers=N`` drops the last N.
LAYER_NAMES: tuple[str, ...] = ("layer_1", "layer_2", "layer_3", "lstm", "layer_5", "layer_6")


class ClippedReLU(nn.Module):
    """``min(max(x, 0), ceiling)``: DeepSpeech's activation (ceiling 20)."""

    def __init__(self, ceiling: float = 20.0) -> None:
        super().__init__()
        self.ceiling = ceiling

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(min=0.0, max=self.ceiling)

    def extra_repr(self) -> str:
        return f"ceiling={self.ceiling}"


class DeepSpeech(nn.Module):
    """DeepSpeech's network on feature frames; outputs per-frame logits over labels + blank.

    The CTC blank is the **last** output index (``n_labels``), as in DeepSpeech.

    Args:
        n_features: values per input frame (494 for 26 MFCCs with ±9 frames of context).
        n_labels: alphabet size, without the blank.
        n_hidden: width of every hidden layer and of the LSTM (2048 in DeepSpeech).
        dropout: dropout rate after ``layer_1``, ``layer_2``, ``layer_3`` and ``layer_5``.
        relu_clip: ceiling of the clipped ReLU.

    Example::

        model = DeepSpeech(n_features=494, n_labels=28, n_hidden=256)
        logits = model(frames)  # (B, T, 29)
    """

    def __init__(
        self,
        n_features: int,
        n_labels: int,
        n_hidden: int = 2048,
        dropout: float = 0.05,
        relu_clip: float = 20.0,
    ) -> None:
        super().__init__()
        if n_labels < 1:
            raise ValueError(f"Expected `n_labels` >= 1, but got {n_labels}.")
        if n_hidden < 1:
            raise ValueError(f"Expected `n_hidden` >= 1, but got {n_hidden}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Expected `dropout` in [0, 1), but got {dropout}.")
        self.n_labels = n_labels
        self.layer_1 = nn.Linear(n_features, n_hidden)
        self.layer_2 = nn.Linear(n_hidden, n_hidden)
        self.layer_3 = nn.Linear(n_hidden, n_hidden)
        self.lstm = nn.LSTM(n_hidden, n_hidden, batch_first=True)
        self.layer_5 = nn.Linear(n_hidden, n_hidden)
        self.layer_6 = nn.Linear(n_hidden, n_labels + 1)
        self.activation = ClippedReLU(relu_clip)
        self.dropout = nn.Dropout(dropout)

    @property
    def blank(self) -> int:
        """Index of the CTC blank."""
        return self.n_labels

    def forward(self, frames: Tensor) -> Tensor:
        """``frames`` (B, T, n_features) -> logits (B, T, n_labels + 1)."""
        return self.forward_layers(frames, 0, len(LAYER_NAMES))

    def forward_layers(self, x: Tensor, start: int, stop: int, dropout: bool = True) -> Tensor:
        """Apply layers ``LAYER_NAMES[start:stop]`` to ``x`` (their activations included).

        ``dropout=False`` skips dropout whatever the mode: what a cache of a frozen
        prefix's outputs needs, since those must not change from one epoch to the next.
        """
        for name in LAYER_NAMES[start:stop]:
            if name == "lstm":
                # Padding sits after each utterance's frames, so a unidirectional LSTM's
                # outputs at real frames do not depend on it; no packing is needed.
                x, _ = self.lstm(x)
            elif name == "layer_6":
                x = self.layer_6(x)
            else:
                x = self.activation(getattr(self, name)(x))
                if dropout:
                    x = self.dropout(x)
        return x
