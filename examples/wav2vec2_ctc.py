"""HF's wav2vec2 CTC model with a frozen encoder: only the new output layer trains.

The usual first step of adapting a pretrained wav2vec2 to a new alphabet: keep the
feature extractor and transformer layers as they are and train ``lm_head``, which maps to
the new characters, with CTC. freezeft discovers the groups (feature extractor, feature
projection, positional convolution, encoder layers, lm_head) and FrozenEncoder(head=1)
trains lm_head alone: no gradients or optimizer state for the rest, whose weights stay
bit-identical. Follow it with ``FreezeThenUnfreeze`` to fine-tune the encoder later.

A real run starts from ``Wav2Vec2ForCTC.from_pretrained("facebook/wav2vec2-base",
vocab_size=len(alphabet))``; here a tiny wav2vec2 is built from a config so it runs
offline, on "utterances" of 3 tones whose pitches are the labels.

    python examples/wav2vec2_ctc.py

Needs, beside freezeft: ``pip install transformers``.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

from freezeft.callbacks import FrozenEncoder

RATE, TONE = 4000, 400  # samples per second, samples per tone


def utterances(n: int, seed: int) -> TensorDataset:
    """3 tones each, of 4 pitches (labels 1..4; 0 is the CTC blank and padding)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(1, 5, (n, 3), generator=g)
    t = torch.arange(TONE) / RATE
    tones = torch.stack([torch.sin(2 * math.pi * 200 * k * t) for k in range(5)])
    audio = torch.cat([tones[labels[:, i]] for i in range(3)], dim=1)
    return TensorDataset(audio + 0.05 * torch.randn(audio.shape, generator=g), labels)


class SpeechRecognizer(pl.LightningModule):
    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        config = Wav2Vec2Config(
            vocab_size=5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, conv_dim=(32, 32), conv_stride=(5, 4), conv_kernel=(10, 8),
            num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4, mask_time_prob=0.0,
            pad_token_id=0, ctc_loss_reduction="mean",
        )  # fmt: skip
        self.model = Wav2Vec2ForCTC(config)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        audio, labels = batch
        loss = self.model(input_values=audio, labels=labels).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        audio, labels = batch
        self.log("val_loss", self.model(input_values=audio, labels=labels).loss, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main(epochs: int = 4) -> tuple[float, float]:
    pl.seed_everything(0)
    module = SpeechRecognizer()
    encoder = {n: p.clone() for n, p in module.model.wav2vec2.named_parameters()}
    val = DataLoader(utterances(64, 1), batch_size=64)
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[FrozenEncoder(head=1)],
    )
    before = float(trainer.validate(module, val, verbose=False)[0]["val_loss"])
    trainer.fit(module, DataLoader(utterances(256, 0), batch_size=16, shuffle=True), val)
    after = float(trainer.callback_metrics["val_loss"])
    params = dict(module.model.wav2vec2.named_parameters())
    moved = sum(not torch.equal(value, params[name]) for name, value in encoder.items())
    print(f"wav2vec2 encoder weights changed: {moved} of {len(encoder)}")
    print(f"validation CTC loss: {before:.3f} before, {after:.3f} after")
    return before, after


if __name__ == "__main__":
    main()
