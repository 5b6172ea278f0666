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
from freezeft.text import describe_divergence as describe

__all__ = ["Diverged", "DivergenceCheck", "describe"]


class Diverged(ValueError):
    """Training diverged: the weights (or every loss of an epoch) are no longer finite.

    Attributes:
        details: where and how: ``step``, ``epoch``, ``lr`` (the optimizers' learning
            rates at that step), ``what`` (the first non-finite parameters, or the losses).
    """

    def __init__(self, details: dict[str, Any]) -> None:
        self.details = details
        super().__init__(
            f"the model {describe(details)}. Nothing after this step is usable, so nothing "
            "was tested; results.json marks the run as diverged. Lower the learning rate, add "
            "warmup (addons=[warmup]) or gradient clipping (++trainer.gradient_clip_val=1.0), "
            "then start the run again."
        )


class DivergenceCheck(*CALLBACK_BASES):  # type: ignore[misc]
    """Raise :class:`Diverged` when training has diverged:

    * after the optimizer step that made a trainable weight NaN or infinite;
    * at the end of an epoch in which no batch had a finite loss;
    * at the end of an epoch whose mean training loss exploded: above :attr:`EXPLODED`
      times the run's first training loss (the model before any update; at least 1e-2),
      a loss no healthy run comes back from (a learning rate far too high with weights
      that stay finite).

    One pass over the trainable parameters per batch (a sum each, one device sync): cheap
    next to the step that changed them. A single batch with a non-finite loss (the
    speech model skips such batches, as DeepSpeech does) is not divergence. Under several
    processes the decision is reduced across them, so every rank stops at the same step.
    """

    #: how many times the run's first training loss an epoch's mean may grow
    EXPLODED = 1e4

    def __init__(self) -> None:
        self._first: float | None = None  # the run's first finite loss (in checkpoints)
        self._epoch = torch.zeros(3, dtype=torch.float64)  # loss sum, finite, batches

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch.zero_()

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
            value = float(loss.detach().float().mean())
            self._epoch[2] += 1
            if math.isfinite(value):
                self._epoch[0] += value
                self._epoch[1] += 1
                if self._first is None:
                    self._first = value
        bad = _non_finite(pl_module)
        if trainer.world_size > 1:  # sharded weights: each rank sees its own shard
            any_bad = trainer.strategy.reduce(
                torch.tensor(float(bool(bad)), device=pl_module.device), reduce_op="sum"
            )
            if float(any_bad) > 0 and not bad:
                bad = ["a shard of another rank"]
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise Diverged(_details(trainer, f"NaN or infinite values in {shown}"))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch, first = (
            self._epoch.clone(),
            torch.tensor([self._first or 0.0, self._first is not None], dtype=torch.float64),
        )
        if trainer.world_size > 1:  # one decision for every rank
            device = pl_module.device
            epoch = trainer.strategy.reduce(epoch.to(device), reduce_op="sum").cpu()
            first = trainer.strategy.reduce(first.to(device), reduce_op="sum").cpu()
        total, finite, batches = float(epoch[0]), int(epoch[1]), int(epoch[2])
        if batches and not finite:
            raise Diverged(
                _details(
                    trainer,
                    f"none of the {batches} training batches of the epoch had a finite "
                    "loss, though the weights are finite",
                )
            )
        if not finite or not first[1]:
            return
        mean, start = total / finite, float(first[0] / first[1])
        if mean > self.EXPLODED * max(start, 1e-2):
            raise Diverged(
                _details(
                    trainer,
                    f"the training loss exploded: its mean over the epoch, {mean:.4g}, is "
                    f"over {self.EXPLODED:g} times the run's first training loss, "
                    f"{start:.4g}",
                )
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"first_loss": self._first}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._first = state_dict.get("first_loss")


def _non_finite(module: torch.nn.Module) -> list[str]:
    """The names of the trainable parameters holding a NaN or an infinity (of the local
    shard, for a parameter sharded across processes)."""
    trainable = [(n, _local(p)) for n, p in module.named_parameters() if p.requires_grad]
    trainable = [(n, p) for n, p in trainable if p.numel()]
    if not trainable:
        return []
    sums = torch.stack([p.float().sum() for _, p in trainable])
    if bool(torch.isfinite(sums).all()):  # NaN and inf survive a sum: one sync
        return []
    return [n for n, p in trainable if not bool(torch.isfinite(p).all())]


def _local(param: torch.Tensor) -> torch.Tensor:
    """A parameter's own values on this process (a DTensor's local shard)."""
    param = param.detach()
    return param.to_local() if hasattr(param, "to_local") else param


def _details(trainer: pl.Trainer, what: str) -> dict[str, Any]:
    lrs = sorted({float(g["lr"]) for o in trainer.optimizers for g in o.param_groups if "lr" in g})
    return {
        "step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "lr": [lr for lr in lrs if math.isfinite(lr)] or lrs,
        "what": what,
    }
