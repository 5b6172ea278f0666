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

from freezeft.groups import LayerGroup

__all__ = [
    "engine_of",
    "fsdp1_units",
    "fsdp2_units",
    "check_fsdp1",
    "check_deepspeed",
    "saved_callback_state",
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
