"""The one object that runs a fit's strategies: groups, one plan, applied through the fit.

Strategies (:class:`~freezeft.callbacks.StrategyCallback`) only state intents per layer
group. At ``setup("fit")`` the first strategy in ``trainer.callbacks`` makes a
:class:`Coordinator` for all of them and forwards the Lightning hooks to it; the
coordinator refuses strategies that conflict, resolves the layer groups, combines every
intent into one :class:`~freezeft.plan.Plan`, applies it at each step of the fit and
checkpoints it. Which strategy forwards the hooks changes nothing: the coordinator is one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from freezeft._lightning import pl, rank_zero_info, rank_zero_warn
from freezeft.callbacks.forward_pass import forward_passes
from freezeft.frozen_cache import FrozenOutputCache, PrefixCachable
from freezeft.groups import (
    LayerGroup,
    canonical_group_name,
    confirm_order,
    format_group_table,
    resolve_groups,
    trainable_groups,
)
from freezeft.history import LRSchedule
from freezeft.plan import Plan
from freezeft.sharding import ShardedFit, engine_of

if TYPE_CHECKING:
    from freezeft.callbacks.base import StrategyCallback

__all__ = ["Coordinator"]


def _hold_the_parameters_of(groups: Sequence[LayerGroup], module: Any) -> bool:
    """Whether ``groups`` hold exactly ``module``'s parameters, the very tensors (not those a
    sharding engine or a reload replaced since they were resolved)."""
    held = {id(p) for group in groups for p in group.params.values()}
    return held == {id(p) for p in module.parameters()}


def _number(value: Any) -> float:
    """An LR as a float (a tensor's too); NaN for none (Adafactor's relative steps)."""
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return math.nan


class Coordinator:
    """Runs the strategies of one fit as one plan.

    Args:
        strategies: the fit's strategies, in ``trainer.callbacks`` order.

    Raises:
        ValueError: two freezing schedules, or strategies given different ``groups``. (Two
            strategies of one type are refused by Lightning itself: their state keys clash.)
    """

    def __init__(self, strategies: Sequence[StrategyCallback]) -> None:
        self.strategies = list(strategies)
        schedules = [s for s in self.strategies if s.schedules_freezing]
        if len(schedules) > 1:
            listed = ", ".join(type(s).__name__ for s in schedules)
            raise ValueError(
                f"Two freezing schedules in one run ({listed}): each decides which layer "
                "groups train, so they conflict. Keep one of them; "
                "DiscriminativeLR and LRWarmup combine with any of them."
            )
        patterns = {repr(s.patterns): s.patterns for s in self.strategies if s.patterns is not None}
        if len(patterns) > 1:
            raise ValueError(
                f"The strategies were given different `groups` ({sorted(patterns)}); give the "
                "same list to each, or to one of them."
            )
        self.patterns = next(iter(patterns.values())) if patterns else None
        self.schedule = schedules[0] if schedules else None
        self.plan: Plan | None = None
        self.frozen_cache: FrozenOutputCache | None = None
        self._restored_trainable: dict[str, bool] | None = None
        #: How the layer groups were found (the group table's last line).
        self.found_by = ""
        #: The LR each param group was applied at every optimizer step of this fit (warmup
        #: included; 0 for a group that trained nothing) and whether it trained.
        self.applied_lr = LRSchedule()
        self._sharded: ShardedFit | None = None  # the engine's part, fit start to teardown
        #: The phases this fit followed so far (schedule.yaml's), restored on resume.
        self.phases: list[dict[str, Any]] = []
        self._phase_key: Any = None  # the schedule's phase in force (Schedule: its index)
        self._scales: list[float] = []
        self._trainer: pl.Trainer | None = None  # the fit's, from fit start to teardown

    @property
    def groups(self) -> list:
        """The resolved layer groups (empty before the plan is made)."""
        return self.plan.groups if self.plan is not None else []

    # -- intents, combined -------------------------------------------------------------
    def _product(self, intent: Callable[[StrategyCallback], float]) -> float:
        result = 1.0
        for strategy in self.strategies:
            result *= intent(strategy)
        return result

    def _flags(self, epoch: int) -> list[bool] | None:
        if self.schedule is None:
            return None
        n = len(self.groups)
        return [self.schedule.trainable(i, n, epoch) is not False for i in range(n)]

    # -- the fit -----------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At ``setup("fit")``: under DDP, make the plan now, before DDP wraps the model
        (its reducer takes the parameters that require gradients then). A sharding engine
        (FSDP2 through ``ModelParallelStrategy``) replaces the parameters in
        ``configure_model``, after this hook: its plan is made at fit start, from the
        parameters the optimizer holds."""
        if engine_of(trainer.strategy) in ("ddp", "deepspeed"):
            self._make_plan(trainer, pl_module)  # DeepSpeed: frozen before it builds its engine

    def _make_plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resolve the groups, make the plan (it notes what the user froze) and apply the
        epoch-0 flags. Single-process runs do this at fit start, after the module's
        ``setup()``, ``configure_model()`` and ``configure_optimizers()`` have run."""
        given = next((s.resolved_groups for s in self.strategies if s.resolved_groups), None)
        if given is not None and _hold_the_parameters_of(given, pl_module):
            # resolved once, by whoever checked the strategies; an order that waited for a
            # forward pass is taken from one now
            given = confirm_order(given, pl_module, forward_passes(trainer, pl_module))
            groups = list(given)
        else:
            given = resolve_groups(pl_module, self.patterns, forward_passes(trainer, pl_module))
            groups = list(given)
        self.found_by = str(getattr(given, "found_by", ""))
        if getattr(given, "unconfirmed", "") or getattr(given, "provisional", False):
            why = given.unconfirmed or "no forward pass can be watched under this strategy"
            rank_zero_warn(
                f"freezeft: the layer groups of {type(pl_module).__name__} are its parts in "
                f"the order __init__ registered them, {[g.name for g in groups]}, and a "
                f"forward pass did not confirm that they are called in that order ({why}). "
                "If that is not input to output, pass the groups to the strategy, input to "
                "output: groups=[...]."
            )
        self.plan = Plan(groups, bn=self.schedule.bn if self.schedule is not None else "frozen")
        for strategy in self.strategies:
            strategy.groups, strategy.plan = groups, self.plan
            strategy.check(groups)
        self._check_something_trains(trainer)
        flags = self._flags(0)
        if flags is not None:
            self.plan.set_trainable(flags)

    def _check_something_trains(self, trainer: pl.Trainer) -> None:
        """Refuse a freezing schedule that would train nothing at some epoch of the fit:
        every group it trains then holds only parameters the user froze (LoRA's base)."""
        plan, schedule = self.plan, self.schedule
        if plan is None or schedule is None:
            return
        can = trainable_groups(self.groups, plan.user_frozen)
        if not can:
            return  # the user froze everything: no schedule's doing
        epochs = trainer.max_epochs if isinstance(trainer.max_epochs, int) else 0
        for epoch in range(min(max(epochs, 1), 1000)):
            flags = self._flags(epoch)
            if flags is None or any(flags[i] for i in can):
                continue
            names = [g.name for g in self.groups]
            chosen = [names[i] for i, flag in enumerate(flags) if flag]
            raise ValueError(
                f"freezeft: {type(schedule).__name__} would train nothing at epoch {epoch}: "
                f"the groups it trains then ({chosen}) hold only parameters you froze before "
                f"fit (a LoRA base model's, say), and the groups that can train "
                f"({[names[i] for i in can]}) are all frozen by it. Give it a `head` among "
                "the groups that can train (`head=1` counts only those), or leave "
                "parameters of the groups it trains trainable."
            )

    def fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take over the optimizers (split, scale, warm up), norm layers and the cache."""
        if self.plan is None:
            self._make_plan(trainer, pl_module)
        plan = self.plan
        assert plan is not None
        self._trainer = trainer
        self._sharded = sharded = ShardedFit(trainer, pl_module)
        sharded.load_flags_before_the_engine(self.strategies[0].state_key, self.load_state_dict)
        if trainer.world_size > 1 and engine_of(trainer.strategy) == "ddp":
            plan.record_reducer_params(pl_module)
        if self._restored_trainable is not None:  # resuming: the flags as they were saved
            plan.set_trainable(self._restored_flags())
        n = len(self.groups)
        scales = [self._product(lambda s, i=i: s.lr_scale(i, n)) for i in range(n)]
        optimizers = [
            (
                optimizer,
                [
                    c.scheduler
                    for c in trainer.lr_scheduler_configs
                    if getattr(c.scheduler, "optimizer", None) is optimizer
                ],
            )
            for optimizer in trainer.optimizers
        ]
        warms = any(s.warms_up for s in self.strategies)
        changes_lr = warms or any(scale != 1.0 for scale in scales)
        schedule = self.schedule
        sharded.check(
            pl_module,
            self.groups,
            [type(s).__name__ for s in self.strategies],
            self._flags,
            dynamic=schedule is not None and schedule.decides_during_fit,
            head=set(schedule.head_groups(n)) if schedule is not None else set(),
            scales=scales,
            changes_lr=changes_lr,
        )
        added = plan.attach(optimizers, scales, pl_module, changes_lr)
        if added:
            names = sorted({g.name for g in self.groups for a in added if a in g.params})
            rank_zero_info(
                f"freezeft: {len(added)} parameters that configure_optimizers left out (in "
                f"groups {names}) joined the optimizer, frozen until a strategy thaws them."
            )
        plan.warmup_factors = lambda: [
            self._product(lambda s, i=i: s.warmup_factor(i, trainer.global_step)) for i in range(n)
        ]
        plan.on_step = self._record_applied_lr
        plan.install_norm_hooks(pl_module)
        memory_gb = schedule.frozen_cache_memory_gb() if schedule is not None else None
        if schedule is not None and memory_gb is not None:
            if sharded.sharded:  # its outputs would be computed from one rank's shard of the model
                rank_zero_warn(
                    f"freezeft: {type(self.schedule).__name__}(cache_frozen=True) stands aside "
                    f"under {type(trainer.strategy).__name__} with sharded parameters: the "
                    "frozen groups run every step (frozen, without gradients), as with "
                    "cache_frozen=False."
                )
            else:
                self._start_frozen_cache(pl_module, schedule, memory_gb)
        head = schedule.head_groups(n) if schedule is not None and schedule.head_size(n) else []
        names = " + ".join(type(s).__name__ for s in self.strategies)
        table = format_group_table(
            self.groups,
            head=head,
            user_frozen=plan.user_frozen,
            lr_scales=scales,
            found_by=self.found_by,
        )
        if any(s.lr_scale_changes() for s in self.strategies):
            table += (
                "\nLR multipliers change from phase to phase"
                + (" ('LR x': the first phase that trains each group)" if "LR x" in table else "")
                + "; schedule.yaml lists each phase's"
            )
        rank_zero_info(f"{names}: layer groups\n{table}")
        self._scales = scales
        if not self.phases and schedule is not None:  # resumed: it came with the checkpoint
            self._phase_key = schedule.phase_key(trainer.current_epoch, trainer.global_step)
        if not self.phases:  # resumed: the phases come with the checkpoint
            self._record_phase(trainer, {"fit_start": True}, reset=False)

    def _restored_flags(self) -> list[bool]:
        """The saved trainable flags, matched to today's groups by name (``_orig_mod`` of
        ``torch.compile`` ignored); a warning names groups that do not match."""
        assert self._restored_trainable is not None
        saved = {canonical_group_name(k): v for k, v in self._restored_trainable.items()}
        names = [canonical_group_name(g.name) for g in self.groups]
        if set(saved) != set(names):
            rank_zero_warn(
                "freezeft: the checkpoint's layer groups do not match this run's: saved "
                f"{sorted(set(saved) - set(names))} are not groups now, and "
                f"{sorted(set(names) - set(saved))} were not saved (trained as at epoch 0 "
                "of the schedule). Resume with the same model and `groups`."
            )
        current = self._flags(0) or [True] * len(names)
        return [saved.get(name, flag) for name, flag in zip(names, current, strict=True)]

    def _start_frozen_cache(
        self, pl_module: pl.LightningModule, owner: StrategyCallback, memory_gb: float
    ) -> None:
        if not isinstance(pl_module, PrefixCachable):
            raise TypeError(
                f"{type(owner).__name__}(cache_frozen=True) needs the LightningModule to "
                "implement freezeft.frozen_cache.PrefixCachable (sample_keys, forward_prefix, "
                "forward_from_prefix, prefix_is_deterministic) and to call "
                f"cached_forward() in its training_step; {type(pl_module).__name__} does not. "
                "Implement it, or set cache_frozen=False."
            )
        own = getattr(pl_module, "layer_groups", None)
        if callable(own) and [g.name for g in self.groups] != list(own()):
            raise ValueError(
                f"{type(owner).__name__}(cache_frozen=True) counts frozen groups in the "
                f"module's own layer_groups() {list(own())}, but the strategies use "
                f"{[g.name for g in self.groups]}; drop `groups` or set cache_frozen=False."
            )
        self.frozen_cache = FrozenOutputCache(memory_gb=memory_gb)
        self.frozen_cache.attach(pl_module)

    def epoch_start(self, trainer: pl.Trainer) -> None:
        """Apply the freezing schedule's flags for the current epoch, if they changed. A
        group frozen mid-run gives back its optimizer state (moments it will not use)."""
        flags = self._flags(trainer.current_epoch)
        plan = self.plan
        if flags is None or plan is None:
            return
        assert self.schedule is not None
        key = self.schedule.phase_key(trainer.current_epoch, trainer.global_step)
        if flags == plan.trainable:
            if key != self._phase_key:  # a phase that changes LRs (or restores) only
                self._phase_key = key
                reset = self.schedule.resets_optimizer_on_unfreeze()
                if reset:
                    for optimizer in trainer.optimizers:
                        plan.reset_optimizer_state(optimizer)
                trigger = self.schedule.phase_trigger(trainer.current_epoch, trainer.global_step)
                self._record_phase(trainer, trigger or {"epoch": trainer.current_epoch}, reset)
            return
        self._phase_key = key
        before, was = plan.trainable_params(), list(plan.trainable)
        unfrozen = [i for i in plan.set_trainable(flags) if plan.trains(i)]
        frozen = [i for i, (a, b) in enumerate(zip(was, flags, strict=True)) if a and not b]
        for index in frozen:
            for optimizer in trainer.optimizers:
                for param in self.groups[index].params.values():
                    optimizer.state.pop(param, None)
        reset = False
        if unfrozen:
            for strategy in self.strategies:
                strategy.on_groups_unfrozen(unfrozen, trainer.global_step)
            if any(s.resets_optimizer_on_unfreeze() for s in self.strategies):
                reset = True
                for optimizer in trainer.optimizers:
                    plan.reset_optimizer_state(optimizer)
        assert self.schedule is not None
        trigger = self.schedule.phase_trigger(trainer.current_epoch, trainer.global_step)
        self._record_phase(trainer, trigger or {"epoch": trainer.current_epoch}, reset=reset)
        moves = [
            f"{verb} {[self.groups[i].name for i in indices]}"
            for verb, indices in (("unfroze", unfrozen), ("froze", frozen))
            if indices
        ]
        rank_zero_info(
            f"{type(self.schedule).__name__}: epoch {trainer.current_epoch}: "
            f"{' and '.join(moves)}; trainable parameters {before:,} -> "
            f"{plan.trainable_params():,} (step {trainer.global_step})"
        )

    def batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The schedule again (Lightning skips ``on_train_epoch_start`` for an epoch resumed
        from a checkpoint taken after the previous epoch's last batch), then the cache."""
        if self.plan is None:
            return
        self.epoch_start(trainer)
        if self._sharded is not None:
            self._sharded.flags_changed(self.plan.trainable)
        if self.frozen_cache is None:
            return
        n = len(self.groups)
        # the cached prefix ends at the first group that trains, or that uses a tensor a
        # later group trains (tied weights): its outputs would change under the cache
        n_frozen = next((i for i in range(n) if self.plan.trains(i) or self.groups[i].tied), n)
        prefix = [param for group in self.groups[:n_frozen] for param in group.params.values()]
        self.frozen_cache.prepare(pl_module, prefix, n_frozen)

    def epoch_end(self, pl_module: pl.LightningModule) -> None:
        """Log how many parameters trained this epoch (``trainable_params``)."""
        if self.plan is not None:
            pl_module.log("trainable_params", float(self.plan.trainable_params()), sync_dist=True)

    def before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        """Explain a loss without gradient when freezeft's freezing is why."""
        plan = self.plan
        if plan is None or loss.requires_grad:
            return
        can = trainable_groups(self.groups, plan.user_frozen)
        frozen = [self.groups[i].name for i in can if not plan.trains(i)]
        if not frozen:
            return  # nothing freezeft froze: not ours to explain
        training = [g.name for i, g in enumerate(self.groups) if plan.trains(i)]
        yours = [g.name for i, g in enumerate(self.groups) if i not in can]
        state = f"Frozen now: {frozen}; training: {training}" + (
            f"; frozen by you (never trained): {yours}" if yours else ""
        )
        if getattr(pl_module, "automatic_optimization", True) is False:
            advice = (
                "With manual optimization and toggle_optimizer(), an optimizer whose "
                "parameters are all in frozen groups has nothing to train: skip its backward "
                "and step while they are frozen (e.g. `if loss.requires_grad:`), or give the "
                "strategy other `head` groups."
            )
        else:
            advice = (
                "The loss does not reach the groups that train: check that training_step's "
                "loss is computed from their outputs (nothing detached, no torch.no_grad() "
                "around them), or give the strategy `head` groups the loss depends on."
            )
        raise RuntimeError(
            f"freezeft: the loss passed to backward does not depend on any trainable "
            f"parameter at epoch {trainer.current_epoch}. {state}. {advice}"
        )

    def _record_applied_lr(self, optimizer: Any) -> None:
        """After each optimizer step, before warmup is undone: the LR each param group used
        and whether it trained (:attr:`applied_lr`)."""
        trainer = self._trainer
        if trainer is None:
            return
        entries = [
            (
                str(group.get("name", f"pg{index + 1}")),
                _number(group.get("lr")),
                any(p.requires_grad for p in group["params"]),
            )
            for index, group in enumerate(optimizer.param_groups)
        ]
        self.applied_lr.record(trainer.global_step, trainer.current_epoch, entries)

    def after_backward(self) -> None:
        """Average across DDP ranks the gradients the reducer does not own."""
        if self.plan is not None:
            self.plan.sync_unowned_gradients()

    def teardown(self, pl_module: pl.LightningModule) -> None:
        """At fit end: flags, LRs, hooks and norm modes as they were; the cache dropped."""
        if self._sharded is not None:
            self._sharded.remove()
        self._sharded, self._trainer = None, None
        if self.plan is not None:
            self.plan.release()
        if self.frozen_cache is not None:
            self.frozen_cache.detach(pl_module)

    # -- the schedule this fit followed (schedule.yaml) ---------------------------------
    @property
    def global_step(self) -> int:
        """The fit's optimizer steps so far (0 before fit start)."""
        return self._trainer.global_step if self._trainer is not None else 0

    @property
    def current_epoch(self) -> int:
        """The fit's current epoch (0 before fit start)."""
        return self._trainer.current_epoch if self._trainer is not None else 0

    def _record_phase(self, trainer: pl.Trainer, trigger: dict[str, Any], reset: bool) -> None:
        assert self.plan is not None
        training = [i for i in range(len(self.groups)) if self.plan.trainable[i]]
        phase: dict[str, Any] = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "train": [self.groups[i].name for i in training],
            "lr_scale": {
                self.groups[i].name: float(
                    self._scales[i] * self._product(lambda s, i=i: s.phase_lr_factor(i))
                )
                for i in training
            },
        }
        if reset:
            phase["reset_optimizer"] = True
        if self.schedule is not None:
            phase.update(self.schedule.phase_extras(trainer.current_epoch, trainer.global_step))
        phase["trigger"] = trigger
        self.phases.append(phase)

    def realised_schedule(self) -> dict[str, Any]:
        """The schedule this fit has followed so far, in the format
        :class:`~freezeft.callbacks.Schedule` runs (:mod:`freezeft.schedule`): the groups
        input to output, the warmup, and each phase's start (epoch and optimizer step),
        trained groups, LR multipliers (every strategy's, multiplied), optimizer reset and
        what triggered it. Given back to ``Schedule``, it replays the fit's plan."""
        schedule: dict[str, Any] = {"groups": [g.name for g in self.groups]}
        warmups = [s.warmup_settings() for s in self.strategies if s.warmup_settings()]
        if warmups:
            schedule["warmup"] = warmups[0]
        schedule["phases"] = [dict(p) for p in self.phases]
        schedule["written_by"] = " + ".join(type(s).__name__ for s in self.strategies)
        return schedule

    # -- checkpoints: plain values, groups by name -------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The trainable flag of each group, by name."""
        if self.plan is None:
            return {}
        return {
            "trainable": {g.name: t for g, t in zip(self.groups, self.plan.trainable, strict=True)},
            "phases": [dict(p) for p in self.phases],
            "phase_key": self._phase_key,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Flags to apply at fit start, matched to the groups by name; or at once, when the
        engine restores checkpoints after fit start (sharded engines)."""
        if "trainable" not in state_dict:
            return
        if state_dict.get("phases"):
            self.phases = [dict(p) for p in state_dict["phases"]]
            self._phase_key = state_dict.get("phase_key")
        saved, before = dict(state_dict["trainable"]), self._restored_trainable
        self._restored_trainable = saved
        # after fit start (a sharded engine loading); not a test's or predict's checkpoint
        if self.plan is not None and self._trainer is not None and saved != before:
            self.plan.set_trainable(self._restored_flags())
            training = [g.name for i, g in enumerate(self.groups) if self.plan.trains(i)]
            rank_zero_info(  # the table at fit start showed the schedule's epoch 0
                f"freezeft: resumed with the checkpoint's layer groups: training {training}, "
                f"the rest frozen"
            )
