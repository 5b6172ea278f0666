"""What each sharding engine can do with a plan, checked at fit start in freezeft's words.

* FSDP2 (``fully_shard``, Lightning's ``ModelParallelStrategy``) shards per parameter:
  every strategy works (the coordinator reshards frozen units, see there).
* FSDP1 (``FSDPStrategy``) flattens each wrapped unit's parameters into one. With
  ``use_orig_params=False`` (not Lightning's default) a unit is one tensor to the
  optimizer and to ``requires_grad``, so freezing or scaling part of it is impossible:
  refused. With ``use_orig_params=True`` (the default) it works, but a frozen parameter
  that shares a unit with trainable ones still costs gradient memory: one warning names
  the units.
* DeepSpeed builds its engine and optimizer from the parameters that require gradients
  when it initialises, and ignores ``requires_grad`` changes and param-group edits after
  that: a strategy that thaws, or that changes LRs per group, is refused.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from freezeft._lightning import rank_zero_warn
from freezeft.groups import LayerGroup

__all__ = [
    "engine_of",
    "fsdp1_units",
    "fsdp2_units",
    "check_fsdp1",
    "check_deepspeed",
    "saved_callback_state",
    "ShardedFit",
]


def engine_of(strategy: Any) -> str | None:
    """``"ddp"``, ``"fsdp1"``, ``"deepspeed"`` or ``None`` (FSDP2, a single device) for a
    Lightning strategy, by its class (of either Lightning package; DeepSpeedStrategy is a
    DDPStrategy subclass that reduces its own way)."""
    names = {c.__name__ for c in type(strategy).__mro__}
    if "DeepSpeedStrategy" in names:
        return "deepspeed"
    if "FSDPStrategy" in names:
        return "fsdp1"
    if "DDPStrategy" in names:
        return "ddp"
    return None


def fsdp2_units(module: Any) -> list[tuple[Any, list[Any]]]:
    """The modules ``fully_shard`` (FSDP2) made units of, each with the parameters it
    manages itself (not those of the units inside it)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return []

    def own(node: Any) -> list[Any]:
        params = list(node.parameters(recurse=False))
        for child in node.children():
            if not isinstance(child, FSDPModule):
                params += own(child)
        return params

    return [(m, own(m)) for m in module.modules() if isinstance(m, FSDPModule)]


def fsdp1_units(module: Any) -> list[tuple[str, list[int]]]:
    """Every FSDP1 unit in ``module``: its name (wrapper names left out) and the ids of
    the parameters it flattens (the original parameters, with ``use_orig_params=True``)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    units = []
    for name, child in module.named_modules():
        handle = getattr(child, "_handle", None)
        if not isinstance(child, FullyShardedDataParallel) or handle is None:
            continue
        clean = ".".join(p for p in name.split(".") if p != "_fsdp_wrapped_module")
        params = getattr(handle.flat_param, "_params", None) or []
        units.append((clean or "(root)", [id(p) for p in params]))
    return units


def check_fsdp1(
    units: Sequence[tuple[str, list[int]]],
    groups: Sequence[LayerGroup],
    differ: Callable[[int, int], bool],
    use_orig_params: bool,
) -> list[str]:
    """Refuse what FSDP1 cannot do with the plan; return a warning per unit that mixes
    groups the plan treats differently (``differ(i, j)``: groups ``i`` and ``j`` are ever
    frozen apart or trained with other LRs).

    Raises:
        ValueError: ``use_orig_params=False`` (it flattens parameters out of reach).
    """
    if not use_orig_params:
        raise ValueError(
            "freezeft: FSDPStrategy(use_orig_params=False) flattens each wrapped unit's "
            "parameters into one tensor, so no strategy can freeze or scale a layer group "
            "inside it. Keep Lightning's default use_orig_params=True, or shard with "
            "ModelParallelStrategy (FSDP2: fully_shard in configure_model), which shards "
            "per parameter."
        )
    group_of = {id(p): index for index, g in enumerate(groups) for p in g.params.values()}
    warnings = []
    for unit, params in units:
        inside = sorted({group_of[p] for p in params if p in group_of})
        apart = [(i, j) for i, j in combinations(inside, 2) if differ(i, j)]
        if apart:
            names = sorted({groups[k].name for pair in apart for k in pair})
            warnings.append(
                f"freezeft: the FSDP unit {unit!r} holds layer groups the strategy treats "
                f"differently ({', '.join(names)}): it trains correctly, but its frozen "
                "parameters still take gradient memory in the unit's flat buffer. Wrap each "
                "layer group as its own unit (auto_wrap_policy / configure_model) to save it."
            )
    return warnings


def check_deepspeed(thaws: bool, changes_lr: bool, strategies: Sequence[str]) -> None:
    """Refuse under DeepSpeed what it ignores after initialising.

    Raises:
        ValueError: a strategy thaws groups during the fit or sets per-group LRs.
    """
    if thaws or changes_lr:
        what = "thaws layer groups during the fit" if thaws else "sets per-group learning rates"
        raise ValueError(
            f"freezeft: {', '.join(strategies)} {what}, which DeepSpeed ignores: it builds "
            "its engine and optimizer from the parameters that require gradients when it "
            "initialises and does not see later changes. Under DeepSpeedStrategy use "
            "FrozenEncoder (frozen before DeepSpeed starts) or NaiveTransfer, or train with "
            "ModelParallelStrategy (FSDP2), where every strategy works."
        )


def saved_callback_state(checkpoint_path: Any, state_key: str) -> dict[str, Any] | None:
    """The state a callback saved under ``state_key`` in a Lightning checkpoint: a file, or
    a sharded engine's folder (its ``meta.pt``). Read weights-only (the file's tensors are
    memory-mapped, not read); ``None`` where it is not a local checkpoint or holds no such
    state (Lightning's own load then says what is wrong)."""
    path = Path(str(checkpoint_path))
    meta = path / "meta.pt" if path.is_dir() else path
    if not meta.is_file():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checkpoint = torch.load(meta, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not ours to report: Lightning's load will
        return None
    state = checkpoint.get("callbacks", {}).get(state_key) if isinstance(checkpoint, dict) else None
    return state if isinstance(state, dict) else None


def _reshard_if_frozen(own: list[Any]) -> Callable[..., None]:
    """A forward hook that frees an FSDP2 unit's gathered parameters when none of its own
    parameters trains: FSDP2 would keep them gathered until the unit's backward, which a
    frozen unit never runs (it gathers them again if a backward passes through it)."""

    def hook(unit: Any, inputs: Any, output: Any) -> None:
        if not any(p.requires_grad for p in own):
            unit.reshard()

    return hook


def _epochs(trainer: Any) -> int:
    """The epochs a fixed schedule is looked at over (``max_epochs``, at most 1000)."""
    max_epochs = trainer.max_epochs
    return min(max_epochs, 1000) if isinstance(max_epochs, int) and max_epochs > 0 else 1000


class ShardedFit:
    """What one fit needs of the trainer's sharding engine, so the coordinator needs none
    of its specifics: FSDP2's units resharded when frozen, the engine's limits checked
    against the plan, and the saved flags applied before an engine loads a checkpoint.

    Args:
        trainer: the fit's trainer.
        pl_module: the LightningModule (its FSDP2 units, if any, are found in it).
    """

    def __init__(self, trainer: Any, pl_module: Any) -> None:
        self.trainer = trainer
        self.engine = engine_of(trainer.strategy)
        self.fsdp2 = fsdp2_units(pl_module)
        # FSDP2 does not reshard a frozen unit itself
        self._hooks = [
            unit.register_forward_hook(_reshard_if_frozen(own)) for unit, own in self.fsdp2
        ]
        self._flags: list[bool] | None = None  # the flags the units were gathered with

    @property
    def sharded(self) -> bool:
        """Whether parameters are sharded across ranks (FSDP2, FSDP1, DeepSpeed)."""
        return bool(self.fsdp2) or self.engine in ("fsdp1", "deepspeed")

    def check(
        self,
        pl_module: Any,
        groups: Sequence[LayerGroup],
        strategies: Sequence[str],
        flags: Callable[[int], list[bool] | None],
        dynamic: bool,
        head: set[int],
        scales: list[float],
        changes_lr: bool,
    ) -> None:
        """Refuse, or warn once about, what the engine cannot do with this plan.

        Args:
            flags: the trainable flags a fixed schedule gives at an epoch (None: no schedule).
            dynamic: whether the schedule decides during the fit (a metric trigger).
            head: the groups a dynamic schedule trains from the start.
        """
        if self.engine not in ("fsdp1", "deepspeed"):  # DDP, FSDP2 and one device take any plan
            return
        per_epoch = [flags(e) for e in range(_epochs(self.trainer))]
        per_epoch = [f for f in per_epoch if f is not None]
        if self.engine == "deepspeed":
            thaws = dynamic or any(f != per_epoch[0] for f in per_epoch)
            check_deepspeed(thaws, changes_lr, strategies)
            return
        options = getattr(self.trainer.strategy, "kwargs", {}) or {}

        def differ(i: int, j: int) -> bool:
            if scales[i] != scales[j]:
                return True
            if dynamic:
                return not {i, j} <= head
            return any(f[i] != f[j] for f in per_epoch)

        model = getattr(self.trainer.strategy, "model", None) or pl_module
        for message in check_fsdp1(
            fsdp1_units(model), groups, differ, options.get("use_orig_params", True)
        ):
            rank_zero_warn(message)

    def flags_changed(self, trainable: list[bool]) -> None:
        """After the flags changed, reshard every FSDP2 unit: a unit still gathered (a root
        kept gathered after a validation forward) would train with the ``requires_grad``
        its parameters were gathered with. (Frozen units are resharded after each forward
        by :func:`_reshard_if_frozen`.)"""
        if not self.fsdp2 or trainable == self._flags:
            return
        self._flags = list(trainable)
        for unit, _ in self.fsdp2:
            unit.reshard()

    def load_flags_before_the_engine(
        self, state_key: str, load_state: Callable[[dict[str, Any]], None]
    ) -> None:
        """Sharded engines (FSDP2's ``ModelParallelStrategy``, ``FSDPStrategy``) load a
        checkpoint after fit start, the optimizer's state before the callbacks' states, and
        they load it for the parameters that require gradients then. So the saved state
        (``state_key``'s) is read from the checkpoint and given to ``load_state`` just
        before the engine loads it: the groups a resumed run trains get their optimizer
        state back, and groups frozen since hold none (the engine would refuse the
        checkpoint for lacking it)."""
        strategy = self.trainer.strategy
        if not strategy.restore_checkpoint_after_setup or strategy.lightning_restore_optimizer:
            return
        load = strategy.load_checkpoint

        def load_with_the_saved_flags(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
            strategy.__dict__.pop("load_checkpoint", None)  # once: the class' own again
            state = saved_callback_state(checkpoint_path, state_key)
            if state is not None:
                load_state(state)
            return load(checkpoint_path, *args, **kwargs)

        strategy.load_checkpoint = load_with_the_saved_flags

    def remove(self) -> None:
        """At fit end: the hooks removed, the engine's own ``load_checkpoint`` again."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.trainer.strategy.__dict__.pop("load_checkpoint", None)
