"""A run whose weights stop being finite stops at once, and says that the model diverged.

Without this, a diverged model goes on "training" on NaN weights: every loss is NaN (the
speech model then skips each batch as if its audio were bad), the test metrics are NaN
and the run exits 0, so a sweep's report would average a broken run in.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from typing_extensions import override

from freezeft._lightning import CALLBACK_BASES, pl

__all__ = ["Diverged", "DivergenceCheck"]


class Diverged(ValueError):
    """Training diverged: the weights (or every loss of an epoch) are no longer finite.

    Attributes:
        details: where and how: ``step``, ``epoch``, ``lr`` (the optimizers' learning
            rates at that step), ``what`` (the first non-finite parameters, or the losses).
    """

    def __init__(self, details: dict[str, Any]) -> None:
        self.details = details
        lrs = ", ".join(f"{lr:g}" for lr in details["lr"]) or "unknown"
        during = f" {details['during']}" if details.get("during") else ""
        super().__init__(
            f"the model diverged{during} at step {details['step']} (epoch "
            f"{details['epoch']}, learning rate {lrs}): {details['what']}. Nothing after this "
            "step is usable, so nothing was tested; results.json marks the run as diverged. "
            "Lower the learning rate, add warmup (addons=[warmup]) or gradient clipping "
            "(++trainer.gradient_clip_val=1.0), then start the run again."
        )


class DivergenceCheck(*CALLBACK_BASES):  # type: ignore[misc]
    """Raise :class:`Diverged` after the optimizer step that made a trainable weight NaN or
    infinite, or at the end of an epoch in which no batch had a finite loss.

    One pass over the trainable parameters per batch (a sum each, one device sync): cheap
    next to the step that changed them. A single batch with a non-finite loss (the
    speech model skips such batches, as DeepSpeech does) is not divergence.
    """

    def __init__(self) -> None:
        self._finite_losses = 0
        self._batches = 0

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finite_losses = self._batches = 0

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):  # None: the module skipped the batch itself
            self._batches += 1
            self._finite_losses += bool(torch.isfinite(loss.detach()).all())
        bad = _non_finite(pl_module)
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise Diverged(_details(trainer, f"NaN or infinite values in {shown}"))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._batches and not self._finite_losses:
            raise Diverged(
                _details(
                    trainer,
                    f"none of the {self._batches} training batches of the epoch had a finite "
                    "loss, though the weights are finite",
                )
            )


def _non_finite(module: torch.nn.Module) -> list[str]:
    """The names of the trainable parameters holding a NaN or an infinity."""
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not trainable:
        return []
    sums = torch.stack([p.detach().float().sum() for _, p in trainable])
    if bool(torch.isfinite(sums).all()):  # NaN and inf survive a sum: one sync
        return []
    return [n for n, p in trainable if not bool(torch.isfinite(p.detach()).all())]


def _details(trainer: pl.Trainer, what: str) -> dict[str, Any]:
    lrs = sorted({float(g["lr"]) for o in trainer.optimizers for g in o.param_groups if "lr" in g})
    return {
        "step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "lr": [lr for lr in lrs if math.isfinite(lr)] or lrs,
        "what": what,
    }
