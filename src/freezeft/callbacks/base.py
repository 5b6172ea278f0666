"""The common base of freezeft's strategies: what a strategy wants, per layer group.

Every strategy states its intent per group (the ``trainable``, ``lr_scale`` and
``warmup_factor`` methods) and nothing else; one
:class:`~freezeft.callbacks.coordinator.Coordinator` per fit combines the intents of all
strategies into one plan and applies it. That is why strategies compose in any order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor
from typing_extensions import override

from freezeft._lightning import CALLBACK_BASES, pl
from freezeft.callbacks.coordinator import Coordinator
from freezeft.groups import GroupSpec, LayerGroup, trainable_groups
from freezeft.history import LRSchedule
from freezeft.plan import Plan

__all__ = ["StrategyCallback", "RunLength", "run_length"]


class StrategyCallback(*CALLBACK_BASES):  # type: ignore[misc]
    """Base class of the strategies; subclasses override the intent methods.

    Args:
        groups: the layer groups, input to output: fnmatch patterns on qualified module or
            parameter names, or lists of them (one list per group); ``None`` uses the
            module's ``layer_groups()`` or discovery (see :mod:`freezeft.groups`).
        bn: ``"frozen"``: norm layers of frozen groups run in eval mode; ``"train"``: as usual.

    Raises:
        ValueError: ``groups`` is not a non-empty list of strings, or ``bn`` is unknown.
    """

    #: True for strategies that decide which groups train (at most one per run).
    schedules_freezing: ClassVar[bool] = False
    #: True for a schedule that decides during the fit from what it measures (its flags
    #: cannot be known at fit start): the sharding checks assume any group may change.
    decides_during_fit: ClassVar[bool] = False

    def __init__(self, groups: Sequence[GroupSpec] | None = None, bn: str = "frozen") -> None:
        if groups is not None:
            if isinstance(groups, str) or not all(_is_group_spec(g) for g in groups):
                raise ValueError(
                    "Expected `groups` to be a list of module-name patterns (or of lists of "
                    f"them, one list per group), but got {groups!r}."
                )
            if not groups:
                raise ValueError("Expected `groups` to name at least one group, but got [].")
        if bn not in ("frozen", "train"):
            raise ValueError(f"Expected `bn` to be 'frozen' or 'train', but got {bn!r}.")
        self.patterns = (
            [g if isinstance(g, str) else list(g) for g in groups] if groups is not None else None
        )
        self.bn = bn
        #: Set by the fit's :class:`~freezeft.callbacks.coordinator.Coordinator` at fit start.
        self.groups: list[LayerGroup] = []
        self.plan: Plan | None = None
        self.coordinator: Coordinator | None = None
        #: Layer groups a caller already resolved on the module this strategy will fit
        #: (the app does, to check the strategy before any work): the fit uses them
        #: instead of resolving again while they hold exactly the module's parameters.
        self.resolved_groups: list[LayerGroup] | None = None

    def counted_groups(self, groups: Sequence[LayerGroup]) -> list[int]:
        """The indices of the groups ``head``, ``n_frozen``, stages and LR depths count:
        those holding a parameter the user left trainable (not a LoRA base model's
        embeddings, norm or ``lm_head``, whose every parameter the user froze)."""
        plan = self.plan
        return trainable_groups(groups, plan.user_frozen if plan is not None else None)

    # -- intents: what a strategy wants; override these --------------------------------
    def check(self, groups: Sequence[LayerGroup]) -> None:
        """Validate arguments against the resolved groups (raise ``ValueError``)."""

    def trainable(self, index: int, n_groups: int, epoch: int) -> bool | None:
        """Whether group ``index`` trains in ``epoch``; ``None``: no opinion."""
        return None

    def lr_scale(self, index: int, n_groups: int) -> float:
        """A fixed LR multiplier for group ``index``."""
        return 1.0

    def warmup_factor(self, index: int, step: int) -> float:
        """An LR multiplier for group ``index`` at optimizer step ``step``."""
        return 1.0

    def on_groups_unfrozen(self, indices: Sequence[int], step: int) -> None:
        """Told when groups start training mid-run (at optimizer step ``step``)."""

    def resets_optimizer_on_unfreeze(self) -> bool:
        """Whether the optimizer's state is forgotten when groups start training mid-run."""
        return False

    def head_size(self, n_groups: int) -> int:
        """How many of the last groups form the head (for the logged table)."""
        return 0

    def head_groups(self, n_groups: int) -> list[int]:
        """The indices of the head's groups: those a freezing schedule trains from the
        start (the last :meth:`head_size` by default)."""
        return list(range(n_groups - self.head_size(n_groups), n_groups))

    def phase_trigger(self, epoch: int, step: int) -> dict[str, Any] | None:
        """What made the freezing schedule change at ``epoch``/``step`` (recorded in the
        fit's schedule, e.g. ``{"on_plateau": {...}}``); ``None``: the epoch itself."""
        return None

    def phase_key(self, epoch: int, step: int) -> Any:
        """Which phase of a freezing schedule is in force (a phase that changes LRs but
        not which groups train is recorded when this changes); ``None``: phases are told
        apart by the groups they train."""
        return None

    def phase_extras(self, epoch: int, step: int) -> dict[str, Any]:
        """What else the fit's schedule records of the phase starting now (``Schedule``:
        ``restore_best``)."""
        return {}

    def phase_lr_factor(self, index: int) -> float:
        """A multiplier of group ``index``'s LR that holds for the current phase only (on
        top of :meth:`lr_scale`; applied through :meth:`warmup_factor`)."""
        return 1.0

    def lr_scale_changes(self) -> bool:
        """True when a later phase changes a group's LR multiplier (:meth:`lr_scale` is
        the one of the first phase that trains it; the group table says so)."""
        return False

    def warmup_settings(self) -> dict[str, Any] | None:
        """This strategy's warmup as a schedule records it (``steps``, ``start_factor``,
        ``rewarm_on_unfreeze``); ``None``: it warms nothing up."""
        return None

    def realised_schedule(self) -> dict[str, Any]:
        """The schedule the fit has followed so far (:mod:`freezeft.schedule`'s format),
        from the fit's coordinator; ``{}`` before a fit."""
        return self.coordinator.realised_schedule() if self.coordinator is not None else {}

    @property
    def applied_lr(self) -> LRSchedule:
        """The LR each optimizer param group was applied at, per optimizer step of the
        fit (the last one, after it ended), as the step used it: the user's scheduler,
        freezeft's LR multipliers and warmup included, and 0 for a group that trained
        nothing (frozen); with whether it trained. The same for every strategy of a fit
        (the coordinator records it), and the table the app writes as ``lr_schedule.csv``
        (:meth:`~freezeft.history.LRSchedule.write_csv`). Empty before a fit.

        Between steps, ``optimizer.param_groups`` shows something else: a frozen group
        keeps a non-zero ``lr`` (nothing of it trains), and warmup is applied only inside
        ``optimizer.step()``, so outside it ``lr`` is the scheduler's LR without warmup.

        Example::

            strategy = FrozenEncoder(head=1)
            trainer = Trainer(callbacks=[strategy, LRWarmup(warmup_steps=10)])
            trainer.fit(model)
            strategy.applied_lr.of("net.out")  # one LR per optimizer step
            strategy.applied_lr.write_csv("lr_schedule.csv")
        """
        coordinator = self.coordinator
        return coordinator.applied_lr if coordinator is not None else LRSchedule()

    def frozen_cache_memory_gb(self) -> float | None:
        """The memory for cached outputs of the frozen prefix, if this strategy asks for
        the frozen-output cache (``cache_frozen=True``); ``None``: no cache."""
        return None

    @property
    def warms_up(self) -> bool:
        """Whether this strategy overrides :meth:`warmup_factor`."""
        return type(self).warmup_factor is not StrategyCallback.warmup_factor

    # -- Lightning hooks: forwarded to the fit's one coordinator ------------------------
    def _leads(self) -> Coordinator | None:
        """The coordinator, if this strategy forwards the hooks to it (the first one does;
        which one changes nothing: the coordinator is one)."""
        coordinator = self.coordinator
        if coordinator is not None and coordinator.strategies[0] is self:
            return coordinator
        return None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategies = [c for c in trainer.callbacks if isinstance(c, StrategyCallback)]
        if strategies[0] is not self:
            return
        coordinator = Coordinator(strategies)
        for strategy in strategies:
            strategy.coordinator, strategy.plan = coordinator, None
        coordinator.setup(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if coordinator := self._leads():
            coordinator.fit_start(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if coordinator := self._leads():
            coordinator.epoch_start(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if coordinator := self._leads():
            coordinator.batch_start(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if coordinator := self._leads():
            coordinator.epoch_end(pl_module)

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        if coordinator := self._leads():
            coordinator.before_backward(trainer, pl_module, loss)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if coordinator := self._leads():
            coordinator.after_backward()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and (coordinator := self._leads()):
            coordinator.teardown(pl_module)

    # -- checkpoints: the coordinator's state travels with the first strategy's ----------
    @override
    def state_dict(self) -> dict[str, Any]:
        coordinator = self._leads()
        return coordinator.state_dict() if coordinator is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if coordinator := self._leads():
            coordinator.load_state_dict(state_dict)


def _is_group_spec(spec: Any) -> bool:
    if isinstance(spec, str):
        return bool(spec)
    return (
        isinstance(spec, (list, tuple))
        and bool(spec)
        and all(isinstance(p, str) and p for p in spec)
    )


def improves(value: float, best: float | None, mode: str) -> bool:
    """Whether a monitored ``value`` beats ``best`` (``None``: nothing yet) in ``mode``
    (``"min"`` or ``"max"``). A NaN never improves."""
    if math.isnan(value):
        return False
    return best is None or (value < best if mode == "min" else value > best)


def expect_int(owner: object, name: str, value: Any, minimum: int) -> int:
    """``value`` if it is an int (not a bool) >= ``minimum``; else a ValueError naming the
    strategy and the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"{type(owner).__name__}: expected `{name}` an integer >= {minimum}, but got {value!r}."
        )
    return value


def expect_bool(owner: object, name: str, value: Any) -> bool:
    """``value`` if it is a bool; else a ValueError naming the strategy and the argument
    (``bool("off")`` is True: a string must not pass for a flag)."""
    if not isinstance(value, bool):
        raise ValueError(
            f"{type(owner).__name__}: expected `{name}` true or false, but got {value!r}."
        )
    return value


@dataclass(frozen=True)
class RunLength:
    """How long a fit will run at most, for the strategies' "too short" warnings.

    Args:
        steps: optimizer steps (``trainer.estimated_stepping_batches``); ``None``: unbounded
            or unknown.
        epochs: epochs started; ``None``: unbounded or unknown.
        limits: the trainer settings behind them, for messages.
    """

    steps: int | None
    epochs: int | None
    limits: str


def run_length(trainer: pl.Trainer) -> RunLength:
    """The fit's length from ``trainer.max_epochs``, ``max_steps`` and
    ``estimated_stepping_batches``, once the train dataloader is loaded (``on_train_start``
    or later: earlier, Lightning would load it just to count)."""
    steps: float = trainer.estimated_stepping_batches
    batches = trainer.num_training_batches
    max_epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else math.inf
    per_epoch = None
    if math.isfinite(batches) and batches > 0:
        per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
    epochs = max_epochs
    if per_epoch is not None and math.isfinite(steps) and steps > 0:
        epochs = min(epochs, math.ceil(steps / per_epoch))
    limits = f"trainer.max_epochs={trainer.max_epochs}, trainer.max_steps={trainer.max_steps}"
    if per_epoch is not None:
        limits += f", {per_epoch} optimizer steps per epoch"
    return RunLength(
        steps=int(steps) if math.isfinite(steps) and steps > 0 else None,
        epochs=int(epochs) if math.isfinite(epochs) else None,
        limits=limits,
    )
