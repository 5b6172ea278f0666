"""AutoFreeze: freeze layer groups from the input side once their training has converged.

After AutoFreeze (Liu, Agarwal and Venkataraman, 2021): every ``check_every_n_steps``
optimizer steps, each trainable group's mean gradient norm over those steps is compared
with the previous window's; a group whose relative change

    rate = |norm_now - norm_before| / norm_before

is below ``threshold`` for ``patience`` windows in a row has stopped learning anything
new and is frozen, but only the first
trainable group from the input side (so no group ever trains behind a frozen one), and
never a head group. Frozen groups get no backward pass, and with ``cache_frozen=True`` on a
:class:`~freezeft.frozen_cache.PrefixCachable` module no forward pass either once their
outputs are cached: the cache deepens as groups freeze.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from typing_extensions import override

from freezeft._lightning import pl, rank_zero_info
from freezeft.callbacks.base import expect_int
from freezeft.callbacks.frozen_encoder import FrozenEncoder, HeadSpec
from freezeft.groups import GroupSpec, LayerGroup

__all__ = ["AutoFreeze"]


class AutoFreeze(FrozenEncoder):
    """Freeze groups input side first as their gradient-norm change rate falls below
    ``threshold``; everything trains until then.

    Decisions (group, epoch, step, rate) are logged, kept in :attr:`decisions` (a run's
    ``history.json`` lists them) and saved in checkpoints with the running statistics, so a
    resumed run decides exactly as an uninterrupted one. Under DDP the statistics are
    averaged over ranks before each decision, so every rank freezes the same group at the
    same step; give the Trainer ``strategy="ddp_find_unused_parameters_true"``, since
    parameters DDP's reducer owns stop getting gradients.

    Args:
        head: groups from the top (or their names) that always train.
        threshold: freeze a group when its gradient-norm change rate between two windows
            is below this.
        check_every_n_steps: optimizer steps per window (one decision per window).
        patience: windows in a row the rate must stay below ``threshold`` (one window's
            rate is noisy with small batches).
        min_epochs: no group freezes before this epoch (the head's first epochs, when a
            re-initialised head sends large, changing gradients into the encoder).
        groups: layer-group patterns, input to output.
        bn: ``"frozen"`` keeps frozen groups' norm layers in eval mode; ``"train"`` does not.
        cache_frozen: train from cached outputs of the frozen prefix (deeper as more groups
            freeze); needs a :class:`~freezeft.frozen_cache.PrefixCachable` module and
            un-augmented inputs.
        cache_memory_gb: cached outputs kept in memory; more go to temporary files.

    Raises:
        ValueError: ``threshold`` not positive, ``check_every_n_steps`` < 1,
            ``min_epochs`` < 0 or a bad ``head``.

    Example::

        trainer = Trainer(callbacks=[AutoFreeze(head=1, threshold=0.1)])
    """

    decides_during_fit: ClassVar[bool] = True

    def __init__(
        self,
        head: HeadSpec = 1,
        threshold: float = 0.1,
        check_every_n_steps: int = 50,
        patience: int = 2,
        min_epochs: int = 1,
        groups: Sequence[GroupSpec] | None = None,
        bn: str = "frozen",
        cache_frozen: bool = False,
        cache_memory_gb: float = 2.0,
    ) -> None:
        super().__init__(head, groups, bn, cache_frozen, cache_memory_gb)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise ValueError(f"AutoFreeze: expected a number `threshold`, but got {threshold!r}.")
        if not threshold > 0:
            raise ValueError(f"AutoFreeze: expected `threshold` > 0, but got {threshold}.")
        self.threshold = float(threshold)
        self.check_every_n_steps = expect_int(self, "check_every_n_steps", check_every_n_steps, 1)
        self.patience = expect_int(self, "patience", patience, 1)
        self.min_epochs = expect_int(self, "min_epochs", min_epochs, 0)
        #: groups frozen so far, counted from the input side
        self.n_frozen = 0
        #: one dict per decision: group, epoch, step, rate, norms
        self.decisions: list[dict[str, Any]] = []
        self._window = torch.zeros(0, dtype=torch.float64)  # summed grad norms per group
        self._steps = 0  # optimizer steps in the current window
        self._calm = 0  # windows in a row the candidate's rate was below the threshold
        #: one dict per window: step, epoch and each group's mean gradient norm (None: frozen)
        self.windows: list[dict[str, Any]] = []

    @override
    def check(self, groups: Sequence[LayerGroup]) -> None:
        super().check(groups)
        if len(self._window) != len(groups):
            self._window = torch.zeros(len(groups), dtype=torch.float64)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        ddp_options = getattr(trainer.strategy, "_ddp_kwargs", None)
        if stage == "fit" and trainer.world_size > 1 and ddp_options is not None:
            if not ddp_options.get("find_unused_parameters"):
                raise ValueError(
                    "AutoFreeze freezes layer groups mid-run, and DDP's reducer then waits "
                    "forever for gradients those parameters no longer get. Give the Trainer "
                    "strategy='ddp_find_unused_parameters_true' (or DDPStrategy("
                    "find_unused_parameters=True))."
                )
        if stage == "fit":  # a new fit starts unfrozen (a resumed one loads its state after this)
            self.n_frozen, self.decisions, self.windows = 0, [], []
            self._window.zero_()
            self._steps, self._calm = 0, 0
        super().setup(trainer, pl_module, stage)

    @override
    def trainable(self, index: int, n_groups: int, epoch: int) -> bool | None:
        return index in self._head or index >= self.n_frozen

    def _candidate(self) -> int | None:
        """The next group to freeze: the first trainable one from the input side, unless
        it is a head group. Groups holding only parameters the user froze (a LoRA model's
        embeddings) are passed over: they have nothing to freeze."""
        while (
            self.plan is not None
            and self.n_frozen < len(self.groups)
            and self.n_frozen not in self._head
            and not self.plan.has_own_params(self.n_frozen)
        ):
            self.n_frozen += 1
        n = self.n_frozen
        if n >= len(self.groups) or n in self._head:
            return None
        return n

    # -- statistics: gradient norms per optimizer step --------------------------------
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self.plan is None or trainer.sanity_checking:
            return
        for index, group in enumerate(self.groups):
            if index < self.n_frozen:
                continue
            grads = [p.grad for p in group.params.values() if p.grad is not None]
            if grads:
                norm = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads])
                )
                self._window[index] += float(norm)
        self._steps += 1

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        if self.plan is None or self._steps < self.check_every_n_steps:
            return
        means = self._window / self._steps
        if trainer.world_size > 1:  # the same numbers on every rank, whatever each saw
            means = trainer.strategy.reduce(means.to(pl_module.device), reduce_op="mean").cpu()
        means = means.double()
        self._window.zero_()
        self._steps = 0
        norms = [
            float(m) if i >= self.n_frozen and self.plan.has_own_params(i) else None
            for i, m in enumerate(means)
        ]
        previous = self.windows[-1]["grad_norms"] if self.windows else None
        self.windows.append(
            {"step": trainer.global_step, "epoch": trainer.current_epoch, "grad_norms": norms}
        )
        index = self._candidate()
        if previous is None or index is None or trainer.current_epoch < self.min_epochs:
            return
        before, now = previous[index], norms[index]
        if before is None or now is None or before <= 0 or not math.isfinite(now):
            return
        rate = abs(now - before) / before
        self._calm = self._calm + 1 if rate < self.threshold else 0
        if self._calm < self.patience:
            return
        self._calm = 0
        self.n_frozen = index + 1
        decision = {
            "group": self.groups[index].name,
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "rate": rate,
            "grad_norm": now,
            "grad_norm_before": before,
        }
        self.decisions.append(decision)
        rank_zero_info(
            f"AutoFreeze: step {trainer.global_step} (epoch {trainer.current_epoch}): froze "
            f"{decision['group']}: its gradient norm changed by {rate:.4f} < {self.threshold} "
            f"({before:.4g} -> {now:.4g}), {self.patience} window(s) of "
            f"{self.check_every_n_steps} steps in a row"
        )

    # -- checkpoints -------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            auto_freeze={
                "n_frozen": self.n_frozen,
                "decisions": list(self.decisions),
                "window": self._window.tolist(),
                "steps": self._steps,
                "calm": self._calm,
                "windows": list(self.windows),
            }
        )
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("auto_freeze")
        if saved is None:
            return
        self.n_frozen = int(saved["n_frozen"])
        self.decisions = list(saved["decisions"])
        self._window = torch.tensor(saved["window"], dtype=torch.float64)
        self._steps = int(saved["steps"])
        self._calm = int(saved["calm"])
        self.windows = list(saved["windows"])
