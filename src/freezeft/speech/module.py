"""DeepSpeech as a LightningModule: MFCCs on the device, CTC training, WER/CER evaluation."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from freezeft._lightning import SIGTERM_EXCEPTIONS, pl, rank_zero_info
from freezeft.frozen_cache import cached_forward
from freezeft.speech.alphabet import Alphabet
from freezeft.speech.augment import SpecAugment, SpeedPerturbation
from freezeft.speech.dataset import Skipped
from freezeft.speech.decoding import error_counts, greedy_decode, sample_cer
from freezeft.speech.drop_layers import TransferReport, dropped_layers, transfer_weights
from freezeft.speech.features import MFCCFeatures
from freezeft.speech.model import LAYER_NAMES, DeepSpeech
from freezeft.speech.scorer import Decoder, Scorer, check_words

log = logging.getLogger(__name__)

__all__ = ["SpeechModule"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class SpeechModule(pl.LightningModule):
    """DeepSpeech speech recogniser with MFCC features, CTC loss and DeepSpeech's decoders.

    Logs ``train_loss``, ``val_loss``, ``val_wer``, ``val_cer`` (greedy decoding) and the
    ``test_*`` equivalents (corpus-level WER/CER computed with jiwer). With
    ``decoder=beam`` the test is decoded with the scorer (a lexicon and word LM, its weights
    tuned on the dev set first): ``test_wer``/``test_cer`` are the scorer's, and
    ``test_greedy_wer``/``test_greedy_cer`` the greedy ones. Its :meth:`layer_groups`
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
        spec_augment: SpecAugment's masks while training, the arguments of
            :class:`~freezeft.speech.augment.SpecAugment` (``None``: off; a frozen-output
            cache needs it off).
        speed_perturbation: speeds each training batch is played at, drawn per batch (e.g.
            ``[0.9, 1.0, 1.1]``; ``None``: off); a frozen-output cache keeps one output per
            sample and speed.
        optimizer: a factory ``params -> Optimizer`` (Hydra ``_partial_: true``);
            default AdamW(lr=1e-3).
        scheduler: an optional factory ``optimizer -> LR scheduler``, stepped each epoch.
        scheduler_monitor: the metric a ``ReduceLROnPlateau`` scheduler watches.
        decoder: how the test set is decoded: a :class:`~freezeft.speech.scorer.Decoder`,
            its dict (Hydra's ``decoder`` group), or ``"greedy"``/``"beam"``.
        language: the data's language (``wordfreq`` code); the scorer's words come from its
            general word list unless ``decoder.lm_text`` names a text.
        scorer_dir: where the scorer is written; default ``<trainer.default_root_dir>/scorer``.
        log_samples: log the test's best, median and worst samples (DeepSpeech's report).

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
        spec_augment: dict[str, int] | None = None,
        speed_perturbation: Sequence[float] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_monitor: str = "val_loss",
        decoder: Decoder | str | dict | None = None,
        language: str | None = None,
        scorer_dir: str | Path | None = None,
        log_samples: bool = True,
    ) -> None:
        super().__init__()
        labels = list(labels)
        #: the test logs its best, median and worst samples, DeepSpeech-style
        self.log_samples = log_samples
        self.decoder = Decoder.from_config(decoder)
        if self.decoder.beam:  # before any training: a bad word source fails now
            check_words(labels, language, self.decoder.lm_text, self.decoder.vocabulary)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.hparams["labels"] = labels
        self.hparams["decoder"] = asdict(self.decoder)
        self.language = language
        self.scorer_dir = scorer_dir
        #: the scorer the test decodes with (built and tuned on dev when the test starts)
        self.scorer: Scorer | None = None
        self.alphabet = Alphabet(labels)
        if speed_perturbation is not None and not isinstance(speed_perturbation, (list, tuple)):
            raise ValueError(
                "Expected `speed_perturbation` a list of speeds such as [0.9, 1.0, 1.1], but "
                f"got {speed_perturbation!r}."
            )
        if spec_augment is not None:
            known = set(inspect.signature(SpecAugment).parameters)
            if not isinstance(spec_augment, dict) or set(spec_augment) - known:
                raise ValueError(
                    f"Expected `spec_augment` a dict with keys from {sorted(known)}, but got "
                    f"{spec_augment!r}."
                )
        self.features = MFCCFeatures(
            sample_rate=sample_rate,
            n_mfcc=n_mfcc,
            n_context=n_context,
            spec_augment=SpecAugment(**spec_augment) if spec_augment is not None else None,
        )
        self.speed_perturbation = (
            SpeedPerturbation(speed_perturbation, sample_rate)
            if speed_perturbation and any(float(f) != 1.0 for f in speed_perturbation)
            else None  # no factor but 1: nothing to perturb (and the prefix stays cachable)
        )
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
        #: (split, file, loss) of evaluated utterances whose loss was not finite
        self.non_finite_losses: list[tuple[str, str, float]] = []
        #: ``(split, Skipped)`` for audio that failed to decode while training or testing
        self.unreadable: list[tuple[str, Skipped]] = []
        self._counts: Tensor | None = None
        self._greedy_counts: Tensor | None = None
        self._samples: list[dict] = []

    # -- freezeft.app.task: what the app may ask of a task (every hook optional) --------------
    #: How the sweep report ranks and shows speech runs (test CER, lower is better); runs
    #: decoded differently are reported apart (a scorer's CER and a greedy one differ).
    report_spec = {
        "rank_by": "cer",
        "mode": "min",
        "columns": {
            "cer": "test CER",
            "wer": "test WER",
            "greedy_cer": "greedy CER",
            "greedy_wer": "greedy WER",
        },
        "split_by": ["decoder"],
    }

    def describe(self) -> dict[str, Any]:
        """What ``results.json`` records of the model: its width."""
        return {"n_hidden": self.hparams.get("n_hidden")}

    def transfer_from(self, source: Path, drop_source_layers: int = 1) -> TransferReport:
        """DeepSpeech's transfer: load ``source``, re-initialising its last layers."""
        return transfer_weights(self, source, drop_source_layers)

    @staticmethod
    def check_transfer(drop_source_layers: int = 1) -> None:
        """Check ``transfer.*`` before any work (raises ``ValueError``)."""
        dropped_layers(drop_source_layers)

    def test_results(self, metrics: dict[str, float]) -> dict[str, Any]:
        """WER, CER (the scorer's with ``decoder=beam``) and loss of the test set, the greedy
        WER and CER, the scorer, its best and worst samples, skipped batches."""
        headline = f"test WER {metrics['test_wer']:.4f} CER {metrics['test_cer']:.4f}"
        greedy = {"wer": metrics["test_wer"], "cer": metrics["test_cer"]}
        if "test_greedy_wer" in metrics:
            greedy = {"wer": metrics["test_greedy_wer"], "cer": metrics["test_greedy_cer"]}
            headline += f" (scorer); greedy WER {greedy['wer']:.4f} CER {greedy['cer']:.4f}"
        left_out = sum(split == "test" for split, _, _ in self.non_finite_losses)
        if left_out:
            headline += (
                f"; {left_out} test file(s) with a non-finite loss left out of test_loss "
                "(named in results.json: non_finite_losses)"
            )
        return {
            "wer": metrics["test_wer"],
            "cer": metrics["test_cer"],
            "greedy_wer": greedy["wer"],
            "greedy_cer": greedy["cer"],
            "loss": metrics.get("test_loss", float("nan")),
            "decoder": self.decoder.name,
            "scorer": (
                {"folder": str(self.scorer.folder), **asdict(self.scorer.settings)}
                if self.scorer is not None
                else None
            ),
            "headline": headline,
            "report_note": self._decoding_note(),
            "samples": self.test_samples[:1] + self.test_samples[-1:],
            "skipped_batches": self.skipped_batches,
            "non_finite_losses": [
                {"split": split, "path": path, "loss": str(value)}
                for split, path, value in self.non_finite_losses
            ],
        }

    def _decoding_note(self) -> str:
        """What the test CER/WER were decoded with, for the report: the scorer or greedy."""
        if self.scorer is None:
            return (
                "Decoding: greedy (test CER/WER = greedy CER/WER); test voices are never "
                "heard in training"
            )
        settings = self.scorer.settings
        return (
            f"Decoding: test CER/WER with the scorer ({settings.words} words from "
            f"{settings.source}; lm_weight and word_score tuned on dev per run), greedy "
            "CER/WER without it; test voices are never heard in training"
        )

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
    def sample_keys(self, batch: dict) -> list[tuple[str, float]]:
        """A sample is its audio path and the speed its batch is played at (1 unperturbed)."""
        speed = float(batch.get("speed", 1.0))
        return [(path, speed) for path in batch["paths"]]

    def forward_prefix(self, batch: dict, n_groups: int) -> list[Tensor]:
        """Features and the first ``n_groups`` layers without dropout, one tensor per sample."""
        frames, lengths = self.features(*self._played(batch))
        x = self.model.forward_layers(frames, 0, n_groups, dropout=False)
        return [x[i, : int(n)] for i, n in enumerate(lengths)]

    def advance_prefix(self, outputs: Sequence[Tensor], start: int, stop: int) -> list[Tensor]:
        """Per-sample outputs of the first ``stop`` layers from those of the first ``start``
        (without dropout): the frozen-output cache deepens with it as more layers freeze."""
        lengths = [len(o) for o in outputs]
        x = nn.utils.rnn.pad_sequence(list(outputs), batch_first=True)
        x = self.model.forward_layers(x, start, stop, dropout=False)
        return [x[i, :n] for i, n in enumerate(lengths)]

    def forward_from_prefix(
        self, outputs: Sequence[Tensor], batch: dict, n_groups: int
    ) -> tuple[Tensor, Tensor]:
        """Logits and frame counts from per-sample outputs of the first ``n_groups`` layers."""
        lengths = torch.tensor([len(o) for o in outputs], device=outputs[0].device)
        x = nn.utils.rnn.pad_sequence(list(outputs), batch_first=True)
        return self.model.forward_layers(x, n_groups, len(LAYER_NAMES)), lengths

    def prefix_is_deterministic(self) -> bool:
        """True unless training audio gets noise or SpecAugment. Speed perturbation keeps it
        true: a batch's speed is drawn before the cache is asked and is part of each
        sample's key, so a cache holds one output per sample and speed."""
        return self.noise_std == 0 and self.features.spec_augment is None

    def _with_speed(self, batch: dict) -> dict:
        """``batch`` with the speed it is played at, drawn for this training batch."""
        if self.speed_perturbation is None or not self.training:
            return batch
        return {**batch, "speed": self.speed_perturbation.draw()}

    def _played(self, batch: dict) -> tuple[Tensor, Tensor]:
        """The batch's audio and lengths at its speed (see :meth:`_with_speed`)."""
        audio, lengths = batch["audio"], batch["audio_lengths"]
        speed = batch.get("speed", 1.0)
        if speed != 1.0 and self.speed_perturbation is not None:
            audio, lengths = self.speed_perturbation.apply(audio, lengths, speed)
        return audio, lengths

    def _usable(self, batch: dict, split: str) -> bool:
        """Record the batch's files that failed to decode; False if none is left."""
        for item in batch.get("unreadable", []):
            if item["path"] not in {r.path for _, r in self.unreadable}:
                kind = item.get("kind", "unreadable audio")  # or non-finite audio
                row = Skipped(item["source"], item["path"], kind, item["detail"])
                self.unreadable.append((split, row))
                log.warning(f"{row.source}: {row.detail}; the batch goes on without it.")
        return len(batch["paths"]) > 0

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        if not self._usable(batch, "train"):
            return self._nothing_to_train()
        batch = self._with_speed(batch)
        output = cached_forward(self, batch)  # None unless a strategy caches frozen outputs
        if output is None:
            audio, lengths = self._played(batch)
            if self.noise_std > 0:
                audio = audio + self.noise_std * torch.randn_like(audio)
            output = self(audio, lengths)
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
        output = cached_forward(self, batch)  # validation in a fit that caches frozen outputs
        if output is None:
            output = self(batch["audio"], batch["audio_lengths"])
        logits, frame_lengths = output
        self._log_finite_loss(logits, frame_lengths, batch, stage)
        hypotheses = [
            self.alphabet.decode(ids)
            for ids in greedy_decode(logits, frame_lengths, self.model.blank)
        ]
        if stage == "test" and self.scorer is not None:
            self._greedy_counts = _added(self._greedy_counts, batch["transcripts"], hypotheses)
            hypotheses = self.scorer.decode(logits, frame_lengths)
        self._counts = _added(self._counts, batch["transcripts"], hypotheses)
        if stage == "test":
            self._samples += [
                {"path": p, "reference": r, "hypothesis": h, "cer": sample_cer(r, h)}
                for p, r, h in zip(batch["paths"], batch["transcripts"], hypotheses, strict=True)
            ]

    def _log_finite_loss(
        self, logits: Tensor, frame_lengths: Tensor, batch: dict, stage: str
    ) -> None:
        """Log the batch's mean CTC loss (as ``_loss`` computes it) over its utterances whose
        loss is finite; an utterance whose loss is not (NaN audio the row check could not see)
        is named in a warning and in :attr:`non_finite_losses`, so one file never turns a
        split's loss into NaN, and the loss stored in results is that of the others."""
        log_probs = logits.float().log_softmax(dim=-1).transpose(0, 1)
        per_sample = nn.functional.ctc_loss(
            log_probs,
            batch["labels"],
            frame_lengths,
            batch["label_lengths"],
            blank=self.model.blank,
            reduction="none",
            zero_infinity=True,
        ) / batch["label_lengths"].clamp(min=1).to(log_probs.dtype)
        finite = torch.isfinite(per_sample)
        split = "dev" if stage == "val" else stage
        for path, ok, value in zip(
            batch["paths"], finite.tolist(), per_sample.tolist(), strict=True
        ):
            if not ok and (split, path) not in {(s, p) for s, p, _ in self.non_finite_losses}:
                self.non_finite_losses.append((split, path, value))
                log.warning(
                    f"{path}: its {split} loss is {value} (its audio or features are not "
                    "finite); it is left out of the mean loss. Check or remove the file."
                )
        if finite.any():
            loss = per_sample[finite].mean()
            self.log(f"{stage}_loss", loss, sync_dist=True, batch_size=int(finite.sum()))

    def _log_error_rates(self, stage: str, counts: Tensor | None = None) -> tuple[float, float]:
        counts = counts if counts is not None else torch.zeros(4, dtype=torch.float64)
        counts = self._sum_over_ranks(counts)
        wer = float(counts[0] / counts[1]) if counts[1] else float("nan")
        cer = float(counts[2] / counts[3]) if counts[3] else float("nan")
        # every rank holds the gathered value: log it on each, so any rank can monitor it
        # (sync_dist: the mean of equal values, and no warning that it may be missing)
        self.log(f"{stage}_wer", wer, prog_bar=stage == "val", sync_dist=True)
        self.log(f"{stage}_cer", cer, prog_bar=stage == "val", sync_dist=True)
        return wer, cer

    def _sum_over_ranks(self, counts: Tensor) -> Tensor:
        """Error counts summed over DDP ranks (each rank evaluates its share)."""
        if self.trainer.world_size == 1:
            return counts
        gathered = self.all_gather(counts.to(self.device))
        return gathered.reshape(-1, *counts.shape).sum(dim=0).cpu()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        counts, self._counts = self._counts, None
        self._log_error_rates("val", counts)

    def on_test_start(self) -> None:
        if self.decoder.beam:
            self.scorer = self._tuned_scorer()

    def on_test_epoch_start(self) -> None:
        self._samples = []
        self._counts = self._greedy_counts = None

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        counts, self._counts = self._counts, None
        wer, cer = self._log_error_rates("test", counts)
        if self.scorer is not None:
            greedy, self._greedy_counts = self._greedy_counts, None
            self._log_error_rates("test_greedy", greedy)
        self.test_samples = sorted(self._samples, key=lambda s: (s["cer"], s["path"]))
        if self.test_samples and self.log_samples:
            rank_zero_info(format_samples(self.test_samples, wer, cer))

    def _tuned_scorer(self) -> Scorer:
        """Build the scorer into its folder (rank 0; the others wait for it) and tune its
        LM weight and word score on the dev set (all ranks' shares)."""
        d = self.decoder
        folder = Path(self.scorer_dir or Path(self.trainer.default_root_dir) / "scorer")
        if self.trainer.is_global_zero:
            Scorer.build(
                folder,
                self.alphabet.labels,
                language=None if d.lm_text else self.language,
                lm_text=d.lm_text,
                vocabulary=d.vocabulary,
                beam_size=d.beam_size,
                lm_weight=d.lm_weight if d.lm_weight is not None else d.lm_weights[0],
                word_score=d.word_score if d.word_score is not None else d.word_scores[0],
            )
        self.trainer.strategy.barrier("freezeft-scorer")
        scorer = Scorer.load(folder, self.alphabet.labels)
        rank_zero_info(
            f"Scorer: {scorer.settings.words} words from {scorer.settings.source}, "
            f"{scorer.settings.order}-gram LM, beam {scorer.settings.beam_size} ({folder})"
        )
        if d.lm_weight is not None and d.word_score is not None:
            return scorer
        try:
            dev = self._dev_outputs()
            if dev is None:
                log.warning(
                    "decoder=beam tunes lm_weight and word_score on the dev set, but the "
                    "trainer has no datamodule with a val_dataloader; decoding with lm_weight="
                    f"{scorer.settings.lm_weight}, word_score={scorer.settings.word_score} "
                    "untuned. Set `decoder.lm_weight` and `decoder.word_score`, or test with "
                    "a datamodule."
                )
                return scorer
            tuned = scorer.tune(
                *dev,
                lm_weights=(d.lm_weight,) if d.lm_weight is not None else d.lm_weights,
                word_scores=(d.word_score,) if d.word_score is not None else d.word_scores,
                reduce=self._sum_over_ranks,
                should_stop=lambda: self.trainer.received_sigterm,
            )
        except InterruptedError:  # SIGTERM or Ctrl+C: stop as a test batch would
            raise SIGTERM_EXCEPTIONS[0]() from None
        if self.trainer.is_global_zero:
            tuned.save()
        rank_zero_info(
            f"Scorer tuned on dev: lm_weight={tuned.settings.lm_weight}, "
            f"word_score={tuned.settings.word_score}, dev WER {tuned.settings.tuned_on['wer']}"
        )
        return tuned

    @torch.no_grad()
    def _dev_outputs(self) -> tuple[list[Tensor], list[Tensor], list[str]] | None:
        """Logits, frame counts and transcripts of this rank's dev batches."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "val_dataloader"):
            return None
        was_training = self.training
        self.eval()
        outputs, lengths, references = [], [], []
        for batch in datamodule.val_dataloader():
            if self.trainer.received_sigterm:
                raise InterruptedError("scorer tuning interrupted")
            if not batch["paths"]:
                continue
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            logits, frame_lengths = self(batch["audio"], batch["audio_lengths"])
            outputs.append(logits.cpu())
            lengths.append(frame_lengths.cpu())
            references += batch["transcripts"]
        self.train(was_training)
        return outputs, lengths, references

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


def _added(total: Tensor | None, references: list[str], hypotheses: list[str]) -> Tensor:
    """``total`` (``None``: nothing yet) plus this batch's error counts."""
    counts = torch.tensor(error_counts(references, hypotheses), dtype=torch.float64)
    return counts if total is None else total + counts


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
