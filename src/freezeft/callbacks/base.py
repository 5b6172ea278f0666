"""The common base of freezeft's strategies: intents per layer group, one plan applies them.

Every strategy states what it wants per group (see the ``trainable``, ``lr_scale`` and
``warmup_factor`` methods); the first strategy in ``trainer.callbacks`` leads: it resolves
the groups, combines every strategy's intent into one :class:`~freezeft.plan.Plan` and
applies it. That is why strategies compose in any order.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any, ClassVar

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from freezeft.frozen_cache import FrozenOutputCache, PrefixCachable
from freezeft.groups import GroupSpec, LayerGroup, format_group_table, resolve_groups
from freezeft.plan import Plan

__all__ = ["StrategyCallback", "HeadSpec"]

HeadSpec = int | Sequence[str]


def _callback_bases() -> tuple[type, ...]:
    """``pytorch_lightning.Callback``, and ``lightning.pytorch.Callback`` where the unified
    ``lightning`` package is installed: the strategies are callbacks of both, so both
    Trainers and both LightningCLIs take them."""
    if importlib.util.find_spec("lightning") is None:
        return (pl.Callback,)
    try:
        from lightning.pytorch import Callback as UnifiedCallback
    except ImportError:  # a broken or partial install: pytorch_lightning alone
        return (pl.Callback,)
    return (pl.Callback, UnifiedCallback)


def canonical_group_name(name: str) -> str:
    """A group name without ``torch.compile``'s ``_orig_mod`` (same layers, compiled or not)."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


class StrategyCallback(*_callback_bases()):  # type: ignore[misc]
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
    #: Freezing strategies set this from their ``cache_frozen`` argument.
    cache_frozen: bool = False
    cache_memory_gb: float = 2.0

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
        self.groups: list[LayerGroup] = []
        self.plan: Plan | None = None
        self._peers: list[StrategyCallback] = []
        self._restored_trainable: dict[str, bool] | None = None
        self._patterns: list[GroupSpec] | None = None
        self.frozen_cache: FrozenOutputCache | None = None

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

    def head_size(self, n_groups: int) -> int:
        """How many of the last groups form the head (for the logged table)."""
        return 0

    # -- the leader's machinery ---------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        """The first strategy in ``trainer.callbacks`` applies the combined plan."""
        return bool(self._peers) and self._peers[0] is self

    def _scheduler(self) -> StrategyCallback | None:
        return next((p for p in self._peers if p.schedules_freezing), None)

    def _flags(self, epoch: int) -> list[bool] | None:
        scheduler = self._scheduler()
        if scheduler is None:
            return None
        n = len(self.groups)
        return [scheduler.trainable(i, n, epoch) is not False for i in range(n)]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._peers = [c for c in trainer.callbacks if isinstance(c, StrategyCallback)]
        if not self.is_leader:
            return
        schedulers = [p for p in self._peers if p.schedules_freezing]
        if len(schedulers) > 1:
            names = ", ".join(type(p).__name__ for p in schedulers)
            raise ValueError(
                f"Two freezing schedules in one run ({names}): each decides which layer groups "
                "train, so they conflict. Keep one of them; DiscriminativeLR and LRWarmup "
                "combine with any of them."
            )
        patterns = {repr(p.patterns): p.patterns for p in self._peers if p.patterns is not None}
        if len(patterns) > 1:
            raise ValueError(
                f"The strategies were given different `groups` ({sorted(patterns)}); give the "
                "same list to each, or to one of them."
            )
        self._patterns = next(iter(patterns.values())) if patterns else None
        for peer in self._peers:
            peer.plan = None  # a new plan per fit (a callback may serve several fits)
        if hasattr(trainer.strategy, "parallel_devices"):  # DDP and other parallel strategies
            # DDP's reducer takes the parameters that require gradients when it wraps the
            # model, right after this hook (and the module's setup()): freeze before that.
            self._build_plan(pl_module)

    def _build_plan(self, pl_module: pl.LightningModule) -> None:
        """Resolve the groups, make the plan (it notes what the user froze) and apply the
        epoch-0 flags. Single-process runs do this at fit start, after the module's
        ``setup()``, ``configure_model()`` and ``configure_optimizers()`` have run."""
        groups = resolve_groups(pl_module, self._patterns)
        scheduler = self._scheduler()
        plan = Plan(groups, bn=scheduler.bn if scheduler is not None else "frozen")
        for peer in self._peers:
            peer.groups, peer.plan = groups, plan
            peer.check(groups)
        flags = self._flags(0)
        if flags is not None:
            plan.set_trainable(flags)
        else:
            plan.trainable = [g.trainable for g in groups]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.is_leader:
            return
        if self.plan is None:
            self._build_plan(pl_module)
        plan = self.plan
        assert plan is not None
        if trainer.world_size > 1:
            plan.record_reducer_params(pl_module)
        if self._restored_trainable is not None:  # resuming: the flags as they were saved
            plan.set_trainable(self._restored_flags())
        n = len(self.groups)
        scales = [self._product(lambda p, i=i: p.lr_scale(i, n)) for i in range(n)]
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
        warms = any(
            type(p).warmup_factor is not StrategyCallback.warmup_factor for p in self._peers
        )
        changes_lr = warms or any(scale != 1.0 for scale in scales)
        added = plan.attach(optimizers, scales, pl_module, changes_lr)
        if added:
            rank_zero_info(
                f"freezeft: {len(added)} parameters that configure_optimizers left out (in "
                f"groups {sorted({g.name for g in self.groups for a in added if a in g.params})})"
                " joined the optimizer, frozen until a strategy thaws them."
            )
        plan.warmup_factors = lambda: [
            self._product(lambda p, i=i: p.warmup_factor(i, trainer.global_step)) for i in range(n)
        ]
        plan.install_norm_hooks(pl_module)
        scheduler = self._scheduler()
        if scheduler is not None and scheduler.cache_frozen:
            self._start_frozen_cache(pl_module, scheduler)
        head = max(p.head_size(n) for p in self._peers)
        names = " + ".join(type(p).__name__ for p in self._peers)
        table = format_group_table(self.groups, head=head, user_frozen=plan.user_frozen)
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
        self.frozen_cache = FrozenOutputCache(memory_gb=owner.cache_memory_gb)
        pl_module._freezeft_frozen_cache = self.frozen_cache

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.is_leader or self.plan is None:
            return
        # Lightning skips on_train_epoch_start for an epoch resumed from a checkpoint taken
        # after the previous epoch's last batch: the schedule is checked here as well.
        self._follow_schedule(trainer)
        if self.frozen_cache is None:
            return
        n_frozen = next(
            (i for i in range(len(self.groups)) if self.plan.trains(i)), len(self.groups)
        )
        prefix = [param for group in self.groups[:n_frozen] for param in group.params.values()]
        self.frozen_cache.active = self.frozen_cache.prepare(pl_module, prefix, n_frozen)

    def _product(self, intent: Any) -> float:
        result = 1.0
        for peer in self._peers:
            result *= intent(peer)
        return result

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.is_leader:
            self._follow_schedule(trainer)

    def _follow_schedule(self, trainer: pl.Trainer) -> None:
        """Apply the freezing schedule's flags for the current epoch, if they changed."""
        flags = self._flags(trainer.current_epoch)
        plan = self.plan
        if flags is None or plan is None or flags == plan.trainable:
            return
        before = plan.trainable_params()
        unfrozen = [i for i in plan.set_trainable(flags) if plan.trains(i)]
        if unfrozen:
            for peer in self._peers:
                peer.on_groups_unfrozen(unfrozen, trainer.global_step)
        rank_zero_info(
            f"{type(self._scheduler()).__name__}: epoch {trainer.current_epoch}: "
            f"unfroze {[self.groups[i].name for i in unfrozen]}; trainable parameters "
            f"{before:,} -> {plan.trainable_params():,}"
        )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.is_leader and self.plan is not None:
            pl_module.log("trainable_params", float(self.plan.trainable_params()))

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        if not self.is_leader or self.plan is None or loss.requires_grad:
            return
        plan = self.plan
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

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.is_leader and self.plan is not None:
            self.plan.sync_unowned_gradients()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.is_leader and self.plan is not None:
            self.plan.release()
        if stage == "fit" and self.frozen_cache is not None:
            self.frozen_cache.clear()
            pl_module._freezeft_frozen_cache = None

    # -- checkpoints: plain values, groups by name -------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        if not self.is_leader or self.plan is None:
            return {}
        return {
            "trainable": {g.name: t for g, t in zip(self.groups, self.plan.trainable, strict=True)}
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_trainable = (
            dict(state_dict["trainable"]) if "trainable" in state_dict else None
        )


def head_indices(head: HeadSpec, groups: Sequence[LayerGroup], owner: str) -> list[int]:
    """Indices of the head groups; validates ``head`` against the resolved groups."""
    n = len(groups)
    if n < 2:
        raise ValueError(
            f"{owner}: the module has a single layer group ({[g.name for g in groups]}), so "
            "there is no encoder to freeze. Pass at least two groups, input to output, as "
            "`groups=[...]`, or define `layer_groups()` on the LightningModule."
        )
    if isinstance(head, int):
        if head >= n:
            raise ValueError(
                f"{owner}: `head={head}` leaves no encoder group to freeze: the module has "
                f"{n} layer groups ({[g.name for g in groups]}); use a head smaller than {n}."
            )
        return list(range(n - head, n))
    names = [g.name for g in groups]
    unknown = [h for h in head if h not in names]
    if unknown:
        raise ValueError(
            f"{owner}: head groups {unknown} are not layer groups; available: {names}."
        )
    if len(set(head)) >= n:
        raise ValueError(
            f"{owner}: `head` names every layer group; leave at least one encoder group."
        )
    return sorted(names.index(h) for h in head)


def check_head(head: HeadSpec, owner: str) -> HeadSpec:
    """Validate ``head`` in ``__init__``: a positive int or a non-empty list of names."""
    if isinstance(head, bool) or not isinstance(head, (int, list, tuple)):
        raise ValueError(
            f"{owner}: expected `head` to be an int or a list of group names, but got {head!r}."
        )
    if isinstance(head, int):
        if head < 1:
            raise ValueError(f"{owner}: expected `head` >= 1, but got {head}.")
        return head
    if not head or not all(isinstance(h, str) for h in head):
        raise ValueError(f"{owner}: expected `head` to list group names, but got {head!r}.")
    return list(head)


def _is_group_spec(spec: Any) -> bool:
    if isinstance(spec, str):
        return bool(spec)
    return (
        isinstance(spec, (list, tuple))
        and bool(spec)
        and all(isinstance(p, str) and p for p in spec)
    )
