"""Learning-rate warmup, per layer group, on top of whatever the user's scheduler sets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from typing_extensions import override

from freezeft._lightning import pl, rank_zero_warn
from freezeft.callbacks.base import StrategyCallback, expect_bool, expect_int, run_length
from freezeft.groups import canonical_group_name

__all__ = ["LRWarmup"]


class LRWarmup(StrategyCallback):
    """Ramp every group's LR linearly from ``start_factor`` to 1 over ``warmup_steps``
    optimizer steps, multiplied onto the user's scheduler. Groups unfrozen later get their
    own ramp from the step they start training (``rewarm_on_unfreeze``).

    When training starts, a warning says so if the ramp is not shorter than the whole run
    (``trainer.estimated_stepping_batches``, from ``max_epochs`` and ``max_steps``): the LR
    would never reach its full value.

    Args:
        warmup_steps: optimizer steps of the ramp (0: no warmup).
        start_factor: the LR multiplier at the first step, in (0, 1].
        rewarm_on_unfreeze: ramp again for groups that start training mid-run.

    Raises:
        ValueError: ``warmup_steps < 0`` or ``start_factor`` outside (0, 1].

    Example::

        trainer = Trainer(callbacks=[FreezeThenUnfreeze(), LRWarmup(warmup_steps=100)])
    """

    def __init__(
        self, warmup_steps: int = 100, start_factor: float = 0.01, rewarm_on_unfreeze: bool = True
    ) -> None:
        super().__init__(None)
        name = type(self).__name__
        expect_int(self, "warmup_steps", warmup_steps, 0)
        if not 0 < start_factor <= 1:
            raise ValueError(
                f"{name}: expected `start_factor` in (0, 1], but got {start_factor!r}."
            )
        self.warmup_steps = warmup_steps
        self.start_factor = float(start_factor)
        self.rewarm_on_unfreeze = expect_bool(self, "rewarm_on_unfreeze", rewarm_on_unfreeze)
        # group name (without torch.compile's `_orig_mod`) -> the step its ramp started
        self.start_steps: dict[str, int] = {}

    @override
    def warmup_factor(self, index: int, step: int) -> float:
        start = self.start_steps.get(canonical_group_name(self.groups[index].name), 0)
        return self.warmup_factor_at(step - start)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        length = run_length(trainer)
        if length.steps is None or self.warmup_steps < length.steps:
            return
        reached = self.warmup_factor_at(length.steps - 1)
        rank_zero_warn(
            f"{type(self).__name__}: warmup_steps={self.warmup_steps} is not shorter than the "
            f"whole run ({length.steps} optimizer steps: {length.limits}), so the LR never "
            f"reaches its full value (its last step uses {reached:.0%} of it). Lower "
            f"`warmup_steps` (a tenth of the run would be {max(1, length.steps // 10)}) or "
            "train longer (trainer.max_epochs, trainer.max_steps)."
        )

    @override
    def warmup_settings(self) -> dict[str, Any] | None:
        return {
            "steps": self.warmup_steps,
            "start_factor": self.start_factor,
            "rewarm_on_unfreeze": self.rewarm_on_unfreeze,
        }

    def warmup_factor_at(self, step: int) -> float:
        """The ramp's LR multiplier ``step`` optimizer steps after it started."""
        if self.warmup_steps == 0:
            return 1.0
        progress = min(1.0, max(0, step) / self.warmup_steps)
        return self.start_factor + (1.0 - self.start_factor) * progress

    @override
    def on_groups_unfrozen(self, indices: Sequence[int], step: int) -> None:
        if self.rewarm_on_unfreeze:
            for index in indices:
                self.start_steps[canonical_group_name(self.groups[index].name)] = step

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "start_steps": dict(self.start_steps)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("start_steps", {})
        self.start_steps = {canonical_group_name(name): step for name, step in saved.items()}
