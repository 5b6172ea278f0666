"""The one object that runs a fit's strategies: groups, one plan, applied through the fit.

Strategies (:class:`~freezeft.callbacks.StrategyCallback`) only state intents per layer
group. At ``setup("fit")`` the first strategy in ``trainer.callbacks`` makes a
:class:`Coordinator` for all of them and forwards the Lightning hooks to it; the
coordinator refuses strategies that conflict, resolves the layer groups, combines every
intent into one :class:`~freezeft.plan.Plan`, applies it at each step of the fit and
checkpoints it. Which strategy forwards the hooks changes nothing: the coordinator is one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from freezeft._lightning import pl, rank_zero_info, rank_zero_warn
from freezeft.frozen_cache import FrozenOutputCache, PrefixCachable
from freezeft.groups import format_group_table, resolve_groups
from freezeft.plan import Plan
from freezeft.sharding import (
    check_deepspeed,
    check_fsdp1,
    engine_of,
    fsdp1_units,
    fsdp2_units,
    saved_callback_state,
)

if TYPE_CHECKING:
    from freezeft.callbacks.base import StrategyCallback

__all__ = ["Coordinator", "canonical_group_name"]


#: name parts that wrappers add (torch.compile, FSDP1, activation checkpointing)
_WRAPPER_PARTS = {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}


def _reshard_if_frozen(own: list[Any]) -> Callable[..., None]:
    """A forward hook that frees an FSDP2 unit's gathered parameters when none of its own
    parameters trains: FSDP2 would keep them gathered until the unit's backward, which a
    frozen unit never runs (it gathers them again if a backward passes through it)."""

    def hook(unit: Any, inputs: Any, output: Any) -> None:
        if not any(p.requires_grad for p in own):
            unit.reshard()

    return hook


def canonical_group_name(name: str) -> str:
    """A group name without the parts wrappers add (``torch.compile``'s ``_orig_mod``,
    FSDP1's ``_fsdp_wrapped_module``): the same layers, wrapped or not."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def _epochs(trainer: pl.Trainer) -> int:
    """The epochs a fixed schedule is looked at over (``max_epochs``, at most 1000)."""
    max_epochs = trainer.max_epochs
    return min(max_epochs, 1000) if isinstance(max_epochs, int) and max_epochs > 0 else 1000


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
        self._fsdp_units: list[tuple[Any, list[Any]]] = []
        self._fsdp_flags: list[bool] | None = None  # the flags the units were gathered with
        self._hooks: list[Any] = []  # removed at teardown
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
            self._make_plan(pl_module)  # DeepSpeed: frozen before it builds its engine

    def _make_plan(self, pl_module: pl.LightningModule) -> None:
        """Resolve the groups, make the plan (it notes what the user froze) and apply the
        epoch-0 flags. Single-process runs do this at fit start, after the module's
        ``setup()``, ``configure_model()`` and ``configure_optimizers()`` have run."""
        groups = resolve_groups(pl_module, self.patterns)
        self.plan = Plan(groups, bn=self.schedule.bn if self.schedule is not None else "frozen")
        for strategy in self.strategies:
            strategy.groups, strategy.plan = groups, self.plan
            strategy.check(groups)
        flags = self._flags(0)
        if flags is not None:
            self.plan.set_trainable(flags)

    def fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take over the optimizers (split, scale, warm up), norm layers and the cache."""
        if self.plan is None:
            self._make_plan(pl_module)
        plan = self.plan
        assert plan is not None
        self._trainer = trainer
        self._read_flags_before_the_engine_loads(trainer)
        self._fsdp_units = fsdp2_units(pl_module)
        for unit, own in self._fsdp_units:  # FSDP2 does not reshard a frozen unit itself
            self._hooks.append(unit.register_forward_hook(_reshard_if_frozen(own)))
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
        self._check_engine(trainer, pl_module, scales, changes_lr)
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
        plan.install_norm_hooks(pl_module)
        if self.schedule is not None and getattr(self.schedule, "cache_frozen", False):
            sharded = self._fsdp_units or engine_of(trainer.strategy) in ("fsdp1", "deepspeed")
            if sharded:  # its outputs would be computed from one rank's shard of the model
                rank_zero_warn(
                    f"freezeft: {type(self.schedule).__name__}(cache_frozen=True) stands aside "
                    f"under {type(trainer.strategy).__name__} with sharded parameters: the "
                    "frozen groups run every step (frozen, without gradients), as with "
                    "cache_frozen=False."
                )
            else:
                self._start_frozen_cache(pl_module, self.schedule)
        head = max(s.head_size(n) for s in self.strategies)
        names = " + ".join(type(s).__name__ for s in self.strategies)
        table = format_group_table(
            self.groups, head=head, user_frozen=plan.user_frozen, lr_scales=scales
        )
        rank_zero_info(f"{names}: layer groups\n{table}")

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

    def _start_frozen_cache(self, pl_module: pl.LightningModule, owner: StrategyCallback) -> None:
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
        # cache_frozen comes with cache_memory_gb: the FrozenEncoder family has both
        memory_gb = owner.cache_memory_gb  # type: ignore[attr-defined]
        self.frozen_cache = FrozenOutputCache(memory_gb=memory_gb)
        self.frozen_cache.attach(pl_module)

    def epoch_start(self, trainer: pl.Trainer) -> None:
        """Apply the freezing schedule's flags for the current epoch, if they changed. A
        group frozen mid-run gives back its optimizer state (moments it will not use)."""
        flags = self._flags(trainer.current_epoch)
        plan = self.plan
        if flags is None or plan is None or flags == plan.trainable:
            return
        before, was = plan.trainable_params(), list(plan.trainable)
        unfrozen = [i for i in plan.set_trainable(flags) if plan.trains(i)]
        frozen = [i for i, (a, b) in enumerate(zip(was, flags, strict=True)) if a and not b]
        for index in frozen:
            for optimizer in trainer.optimizers:
                for param in self.groups[index].params.values():
                    optimizer.state.pop(param, None)
        if unfrozen:
            for strategy in self.strategies:
                strategy.on_groups_unfrozen(unfrozen, trainer.global_step)
            if any(s.resets_optimizer_on_unfreeze() for s in self.strategies):
                for optimizer in trainer.optimizers:
                    plan.reset_optimizer_state(optimizer)
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
        self._reshard_fsdp_units()
        if self.frozen_cache is None:
            return
        n = len(self.groups)
        # the cached prefix ends at the first group that trains, or that uses a tensor a
        # later group trains (tied weights): its outputs would change under the cache
        n_frozen = next((i for i in range(n) if self.plan.trains(i) or self.groups[i].tied), n)
        prefix = [param for group in self.groups[:n_frozen] for param in group.params.values()]
        self.frozen_cache.prepare(pl_module, prefix, n_frozen)

    def _check_engine(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, scales: list[float],
        changes_lr: bool,
    ) -> None:  # fmt: skip
        """Refuse, or warn once about, what the trainer's sharding engine cannot do with
        this plan (:mod:`freezeft.sharding`)."""
        engine = engine_of(trainer.strategy)
        if engine not in ("fsdp1", "deepspeed"):  # DDP, FSDP2 and one device take any plan
            return
        names = [type(s).__name__ for s in self.strategies]
        epochs = _epochs(trainer)
        flags = [self._flags(e) for e in range(epochs)] if self.schedule is not None else []
        dynamic = self.schedule is not None and self.schedule.decides_during_fit
        if engine == "deepspeed":
            thaws = dynamic or any(f != flags[0] for f in flags)
            check_deepspeed(thaws, changes_lr, names)
        elif engine == "fsdp1":
            options = getattr(trainer.strategy, "kwargs", {}) or {}
            head = set(getattr(self.schedule, "_head", ())) if dynamic else set()

            def differ(i: int, j: int) -> bool:
                if scales[i] != scales[j]:
                    return True
                if dynamic:
                    return not {i, j} <= head
                return any(f is not None and f[i] != f[j] for f in flags)

            model = getattr(trainer.strategy, "model", None) or pl_module
            for message in check_fsdp1(
                fsdp1_units(model), self.groups, differ, options.get("use_orig_params", True)
            ):
                rank_zero_warn(message)

    def _reshard_fsdp_units(self) -> None:
        """After the flags changed, reshard every FSDP2 unit: a unit still gathered (a root
        kept gathered after a validation forward) would train with the ``requires_grad``
        its parameters were gathered with. (Frozen units are resharded after each forward
        by :func:`_reshard_if_frozen`.)"""
        if not self._fsdp_units or self.plan is None or self.plan.trainable == self._fsdp_flags:
            return
        self._fsdp_flags = list(self.plan.trainable)
        for unit, _ in self._fsdp_units:
            unit.reshard()

    def epoch_end(self, pl_module: pl.LightningModule) -> None:
        """Log how many parameters trained this epoch (``trainable_params``)."""
        if self.plan is not None:
            pl_module.log("trainable_params", float(self.plan.trainable_params()), sync_dist=True)

    def before_backward(self, trainer: pl.Trainer, loss: Tensor) -> None:
        """Explain a loss without gradient when freezeft's freezing is why."""
        plan = self.plan
        if plan is None or loss.requires_grad:
            return
        frozen = [g.name for i, g in enumerate(self.groups) if not plan.trains(i)]
        if not frozen:
            return  # nothing freezeft froze: not ours to explain
        training = [g.name for i, g in enumerate(self.groups) if plan.trains(i)]
        raise RuntimeError(
            f"freezeft: the loss passed to backward does not depend on any trainable "
            f"parameter at epoch {trainer.current_epoch}. Frozen now: {frozen}; training: "
            f"{training}. With manual optimization and toggle_optimizer(), an optimizer "
            "whose parameters are all in frozen groups has nothing to train: skip its "
            "backward and step while they are frozen (e.g. `if loss.requires_grad:`), or "
            "give the strategy other `head` groups."
        )

    def after_backward(self) -> None:
        """Average across DDP ranks the gradients the reducer does not own."""
        if self.plan is not None:
            self.plan.sync_unowned_gradients()

    def teardown(self, pl_module: pl.LightningModule) -> None:
        """At fit end: flags, LRs, hooks and norm modes as they were; the cache dropped."""
        for handle in self._hooks:
            handle.remove()
        if self._trainer is not None:  # fit ended without loading a checkpoint
            self._trainer.strategy.__dict__.pop("load_checkpoint", None)
        self._hooks, self._trainer = [], None
        if self.plan is not None:
            self.plan.release()
        if self.frozen_cache is not None:
            self.frozen_cache.detach(pl_module)

    # -- checkpoints: plain values, groups by name -------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The trainable flag of each group, by name."""
        if self.plan is None:
            return {}
        return {
            "trainable": {g.name: t for g, t in zip(self.groups, self.plan.trainable, strict=True)}
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Flags to apply at fit start, matched to the groups by name; or at once, when the
        engine restores checkpoints after fit start (sharded engines)."""
        if "trainable" not in state_dict:
            return
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

    def _read_flags_before_the_engine_loads(self, trainer: pl.Trainer) -> None:
        """Sharded engines (FSDP2's ``ModelParallelStrategy``, ``FSDPStrategy``) load a
        checkpoint after fit start, the optimizer's state before the callbacks' states, and
        they load it for the parameters that require gradients then. So the saved flags are
        read from the checkpoint, and applied, just before the engine loads it: the groups
        a resumed run trains get their optimizer state back, and groups frozen since hold
        none (the engine would refuse the checkpoint for lacking it)."""
        strategy = trainer.strategy
        if not strategy.restore_checkpoint_after_setup or strategy.lightning_restore_optimizer:
            return
        key = self.strategies[0].state_key
        load = strategy.load_checkpoint

        def load_with_the_saved_flags(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
            strategy.__dict__.pop("load_checkpoint", None)  # once: the class' own again
            state = saved_callback_state(checkpoint_path, key)
            if state is not None:
                self.load_state_dict(state)
            return load(checkpoint_path, *args, **kwargs)

        strategy.load_checkpoint = load_with_the_saved_flags  # type: ignore[method-assign]
