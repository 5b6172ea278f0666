"""DeepSpeech as a LightningModule: MFCCs on the device, CTC training, WER/CER evaluation."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor, nn

from freezeft.frozen_cache import cached_forward
from freezeft.speech.alphabet import Alphabet
from freezeft.speech.dataset import Skipped
from freezeft.speech.decoding import error_counts, greedy_decode, sample_cer
from freezeft.speech.features import MFCCFeatures
from freezeft.speech.model import LAYER_NAMES, DeepSpeech
from freezeft.speech.transfer import TransferReport, dropped_layers, transfer_weights

log = logging.getLogger(__name__)

__all__ = ["SpeechModule"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class SpeechModule(pl.LightningModule):
    """DeepSpeech speech recogniser with MFCC features, CTC loss and greedy decoding.

    Logs ``train_loss``, ``val_loss``, ``val_wer``, ``val_cer`` and the ``test_*``
    equivalents (corpus-level WER/CER computed with jiwer). Its :meth:`layer_groups`
    are DeepSpeech's six layers, so every freezeft strategy works on it unchanged; it
    implements :class:`~freezeft.frozen_cache.PrefixCachable`, so ``cache_frozen=True``
    strategies train its head from cached outputs of the frozen layers.

    Args:
        labels: the alphabet's labels (the CTC blank comes after them).
        n_hidden: hidden width (DeepSpeech: 2048).
        dropout: dropout rate of the dense layers.
        relu_clip: ceiling of the clipped ReLU.
        sample_rate: audio sample rate.
        n_mfcc: MFCC coefficients per frame.
        n_context: context frames on each side.
        noise_std: standard deviation of Gaussian noise added to the training audio
            (augmentation; 0 disables it, and a frozen-output cache needs it off).
        optimizer: a factory ``params -> Optimizer`` (Hydra ``_partial_: true``);
            default AdamW(lr=1e-3).
        scheduler: an optional factory ``optimizer -> LR scheduler``, stepped each epoch.
        scheduler_monitor: the metric a ``ReduceLROnPlateau`` scheduler watches.

    Example::

        module = SpeechModule(labels=list(" abcdefghijklmnopqrstuvwxyz'"), n_hidden=256)
        trainer.fit(module, datamodule=SpeechDataModule(data_dir="data"))
    """

    def __init__(
        self,
        labels: Sequence[str],
        n_hidden: int = 256,
        dropout: float = 0.05,
        relu_clip: float = 20.0,
        sample_rate: int = 16000,
        n_mfcc: int = 26,
        n_context: int = 9,
        noise_std: float = 0.0,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_monitor: str = "val_loss",
    ) -> None:
        super().__init__()
        labels = list(labels)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.hparams["labels"] = labels
        self.alphabet = Alphabet(labels)
        self.features = MFCCFeatures(sample_rate=sample_rate, n_mfcc=n_mfcc, n_context=n_context)
        self.model = DeepSpeech(
            self.features.n_features, len(labels), n_hidden, dropout=dropout, relu_clip=relu_clip
        )
        if noise_std < 0:
            raise ValueError(f"Expected `noise_std` >= 0, but got {noise_std}.")
        self.noise_std = noise_std
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_monitor = scheduler_monitor
        self.test_samples: list[dict] = []
        self.skipped_batches: list[dict] = []
        #: ``(split, Skipped)`` for audio that failed to decode while training or testing
        self.unreadable: list[tuple[str, Skipped]] = []
        self._counts: Tensor | None = None
        self._samples: list[dict] = []

    # -- freezeft.task.TaskModule: what `python -m freezeft.run` needs -------------------
    #: The metric that picks the best checkpoint (what DeepSpeech selects on).
    monitor = "val_cer"
    monitor_mode = "min"

    def transfer_from(self, source: Path, drop_source_layers: int = 1) -> TransferReport:
        """DeepSpeech's transfer: load ``source``, re-initialising its last layers."""
        return transfer_weights(self, source, drop_source_layers)

    @staticmethod
    def check_transfer(drop_source_layers: int = 1) -> None:
        """Check ``transfer.*`` before any work (raises ``ValueError``)."""
        dropped_layers(drop_source_layers)

    def test_results(self, metrics: dict[str, float]) -> dict[str, Any]:
        """WER, CER and loss of the test set, its best and worst samples, skipped batches."""
        return {
            "wer": metrics["test_wer"],
            "cer": metrics["test_cer"],
            "loss": metrics["test_loss"],
            "headline": f"test WER {metrics['test_wer']:.4f} CER {metrics['test_cer']:.4f}",
            "samples": self.test_samples[:1] + self.test_samples[-1:],
            "skipped_batches": self.skipped_batches,
        }

    def skipped_samples(self) -> list[tuple[str, Skipped]]:
        """Audio that failed to decode while training or testing, by split."""
        return list(self.unreadable)

    def layer_groups(self) -> list[str]:
        """DeepSpeech's layers, input to output: the groups every strategy works on."""
        return [f"model.{name}" for name in LAYER_NAMES]

    def forward(self, audio: Tensor, audio_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Padded audio (B, S) -> logits (B, T, labels + 1) and frame counts (B,)."""
        frames, frame_lengths = self.features(audio, audio_lengths)
        return self.model(frames), frame_lengths

    def _loss(self, logits: Tensor, frame_lengths: Tensor, batch: dict) -> Tensor:
        log_probs = logits.float().log_softmax(dim=-1).transpose(0, 1)
        return nn.functional.ctc_loss(
            log_probs,
            batch["labels"],
            frame_lengths,
            batch["label_lengths"],
            blank=self.model.blank,
            zero_infinity=True,
        )

    # -- PrefixCachable: what a frozen-output cache needs ---------------------------------
    def sample_keys(self, batch: dict) -> list[str]:
        """Audio paths identify the samples."""
        return batch["paths"]

    def forward_prefix(self, batch: dict, n_groups: int) -> list[Tensor]:
        """Features and the first ``n_groups`` layers without dropout, one tensor per sample."""
        frames, lengths = self.features(batch["audio"], batch["audio_lengths"])
        x = self.model.forward_layers(frames, 0, n_groups, dropout=False)
        return [x[i, : int(n)] for i, n in enumerate(lengths)]

    def forward_from_prefix(
        self, outputs: Sequence[Tensor], batch: dict, n_groups: int
    ) -> tuple[Tensor, Tensor]:
        """Logits and frame counts from per-sample outputs of the first ``n_groups`` layers."""
        lengths = torch.tensor([len(o) for o in outputs], device=outputs[0].device)
        x = nn.utils.rnn.pad_sequence(list(outputs), batch_first=True)
        return self.model.forward_layers(x, n_groups, len(LAYER_NAMES)), lengths

    def prefix_is_deterministic(self) -> bool:
        """True unless training audio is augmented with noise."""
        return self.noise_std == 0

    def _usable(self, batch: dict, split: str) -> bool:
        """Record the batch's files that failed to decode; False if none is left."""
        for item in batch.get("unreadable", []):
            if item["path"] not in {r.path for _, r in self.unreadable}:
                row = Skipped(item["source"], item["path"], "unreadable audio", item["detail"])
                self.unreadable.append((split, row))
                log.warning(f"{row.source}: {row.detail}; the batch goes on without it.")
        return len(batch["paths"]) > 0

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        if not self._usable(batch, "train"):
            return self._nothing_to_train()
        output = cached_forward(self, batch)  # None unless a strategy caches frozen outputs
        if output is None:
            audio = batch["audio"]
            if self.noise_std > 0:
                audio = audio + self.noise_std * torch.randn_like(audio)
            output = self(audio, batch["audio_lengths"])
        logits, frame_lengths = output
        loss = self._loss(logits, frame_lengths, batch)
        if not torch.isfinite(loss):
            return self._skip_batch(loss, batch, batch_idx)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["transcripts"]))
        return loss

    def _skip_batch(self, loss: Tensor, batch: dict, batch_idx: int) -> Tensor | None:
        """Report a batch whose loss is not finite and train on nothing from it (DeepSpeech's
        way): its files are listed in the log and in :attr:`skipped_batches`."""
        self.skipped_batches.append(
            {
                "epoch": self.current_epoch,
                "batch": batch_idx,
                "loss": float(loss),
                "paths": batch["paths"],
            }
        )
        log.warning(
            f"Skipping batch {batch_idx} of epoch {self.current_epoch}: its loss is "
            f"{float(loss)}. Its files: {', '.join(batch['paths'])}"
        )
        return self._nothing_to_train()

    def _nothing_to_train(self) -> Tensor | None:
        if self.trainer.world_size > 1:
            # every rank must run backward under DDP: a zero loss gives zero gradients
            return sum((p * 0).sum() for p in self.parameters() if p.requires_grad)
        return None

    def _evaluate(self, batch: dict, stage: str) -> None:
        if not self._usable(batch, "dev" if stage == "val" else stage):
            return
        logits, frame_lengths = self(batch["audio"], batch["audio_lengths"])
        loss = self._loss(logits, frame_lengths, batch)
        self.log(f"{stage}_loss", loss, sync_dist=True, batch_size=len(batch["transcripts"]))
        hypotheses = [
            self.alphabet.decode(ids)
            for ids in greedy_decode(logits, frame_lengths, self.model.blank)
        ]
        counts = torch.tensor(error_counts(batch["transcripts"], hypotheses), dtype=torch.float64)
        self._counts = counts if self._counts is None else self._counts + counts
        if stage == "test":
            self._samples += [
                {"path": p, "reference": r, "hypothesis": h, "cer": sample_cer(r, h)}
                for p, r, h in zip(batch["paths"], batch["transcripts"], hypotheses, strict=True)
            ]

    def _log_error_rates(self, stage: str) -> tuple[float, float]:
        counts = self._counts if self._counts is not None else torch.zeros(4, dtype=torch.float64)
        self._counts = None
        if self.trainer.world_size > 1:
            counts = self.all_gather(counts.to(self.device)).reshape(-1, 4).sum(dim=0).cpu()
        wer = float(counts[0] / counts[1]) if counts[1] else float("nan")
        cer = float(counts[2] / counts[3]) if counts[3] else float("nan")
        # every rank holds the gathered value: log it on each, so any rank can monitor it
        self.log(f"{stage}_wer", wer, prog_bar=stage == "val")
        self.log(f"{stage}_cer", cer, prog_bar=stage == "val")
        return wer, cer

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_error_rates("val")

    def on_test_epoch_start(self) -> None:
        self._samples = []

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        wer, cer = self._log_error_rates("test")
        self.test_samples = sorted(self._samples, key=lambda s: (s["cer"], s["path"]))
        if self.test_samples:
            rank_zero_info(format_samples(self.test_samples, wer, cer))

    def configure_optimizers(self) -> Any:
        params = list(self.parameters())
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(params, lr=1e-3)
        else:
            optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": "epoch",
                "monitor": self.scheduler_monitor,
            },
        }


def format_samples(samples: list[dict], wer: float, cer: float, k: int = 3) -> str:
    """Best, median and worst test samples by CER, DeepSpeech-report style."""
    middle = len(samples) // 2
    picks = {
        "Best": samples[:k],
        "Median": samples[max(0, middle - k // 2) : middle - k // 2 + k],
        "Worst": samples[-k:][::-1],
    }
    lines = [f"Test on {len(samples)} utterances - WER: {wer:.4f}, CER: {cer:.4f}"]
    for title, chosen in picks.items():
        lines.append("-" * 80)
        lines.append(f"{title} CER samples:")
        for s in chosen:
            lines.append(f" CER {s['cer']:.3f}  {s['path']}")
            lines.append(f"  - ref: {s['reference']!r}")
            lines.append(f"  - hyp: {s['hypothesis']!r}")
    lines.append("-" * 80)
    return "\n".join(lines)
