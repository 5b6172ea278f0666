"""Optimizer surgery: the user's param groups split once per layer group (every other
hyperparameter kept, LRs scaled), their schedulers remapped to the new groups, and
parameters ``configure_optimizers`` left out joined to the group of their kind.

:class:`freezeft.plan.Plan` calls these at fit start; nothing else edits an optimizer's
param groups.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from freezeft.groups import LayerGroup

__all__ = [
    "check_optimizers",
    "home_for_missing",
    "split_by_layer_group",
    "remap_scheduler",
    "join_by_kind",
]

#: Param-group keys that hold a learning rate (torch's own names), scaled with the group.
LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
#: Scheduler attributes that are per-group learning rates, scaled with the group.
SCHEDULER_LR_LISTS = ("base_lrs", "_last_lr", "max_lrs", "base_values")
#: Other per-group scheduler attributes, copied from the group each new group came from.
SCHEDULER_PER_GROUP = ("min_lrs", "lr_lambdas", "base_momentums", "max_momentums")


def check_optimizers(optimizers: Sequence[torch.optim.Optimizer], changes_lr: bool) -> None:
    """Refuse optimizers freezeft cannot split, or whose LR it cannot change.

    Raises:
        ValueError: LBFGS (one param group only), or a param group without a numeric ``lr``
            when ``changes_lr``.
    """

    for optimizer in optimizers:
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError(
                "freezeft cannot use torch.optim.LBFGS: it supports a single param group, "
                "and freezing strategies need one per layer group (each with its own LR "
                "and frozen state). Use another optimizer with freezeft's callbacks."
            )
        if changes_lr and any(
            not isinstance(g.get("lr"), (int, float)) for g in optimizer.param_groups
        ):
            raise ValueError(
                f"freezeft: {type(optimizer).__name__} has a param group without a numeric "
                "`lr` (e.g. Adafactor with lr=None computes its own relative step), so "
                "DiscriminativeLR, encoder_lr_scale and LRWarmup cannot scale it. Give "
                "the optimizer an explicit LR (Adafactor: lr=..., relative_step=False, "
                "scale_parameter=False, warmup_init=False), or leave out the LR strategies."
            )


def home_for_missing(
    groups: Sequence[LayerGroup], optimizers: Sequence[tuple[torch.optim.Optimizer, Sequence[Any]]]
) -> tuple[torch.optim.Optimizer, int]:
    """The optimizer and param group holding most of the head (else the nearest group
    below it): parameters no optimizer holds join it."""
    for index in reversed(range(len(groups))):
        ids = {id(p) for p in groups[index].params.values()}
        best: tuple[int, torch.optim.Optimizer, int] | None = None
        for optimizer, _ in optimizers:
            for user_index, group in enumerate(optimizer.param_groups):
                count = sum(1 for p in group["params"] if id(p) in ids)
                if count and (best is None or count > best[0]):
                    best = (count, optimizer, user_index)
        if best is not None:
            return best[1], best[2]
    raise ValueError(
        "freezeft: no optimizer holds any parameter of the layer groups "
        f"{[g.name for g in groups]}, so there is no optimizer to add the ones a "
        "strategy thaws to. Return an optimizer over the model's parameters from "
        "configure_optimizers."
    )


def split_by_layer_group(
    optimizer: torch.optim.Optimizer,
    schedulers: Sequence[Any],
    groups: Sequence[LayerGroup],
    group_of: dict[int, int],
    lr_scales: Sequence[float],
    extra: Sequence[tuple[int, list[nn.Parameter]]] = (),
) -> None:
    """Split each param group of ``optimizer`` by layer group, once, scaling LRs
    (``group_of`` maps a parameter's ``id`` to its layer group's index).

    ``extra`` lists ``(user group index, parameters)``: parameters in no optimizer,
    each list added as a new param group with that group's hyperparameters, driven by
    its schedulers.
    """
    if any("freezeft_group" in g for g in optimizer.param_groups):
        return  # already split (a second fit with the same optimizer)
    n_user = len(optimizer.param_groups)
    source = list(range(n_user))  # the user group each param group's LRs come from
    for template_index, params in extra:
        template = {
            k: v for k, v in optimizer.param_groups[template_index].items() if k != "params"
        }
        base = "added" if len(extra) == 1 else f"added-pg{template_index + 1}"
        template["name"] = base
        try:
            optimizer.add_param_group({**template, "params": params})
        except Exception as error:
            raise ValueError(
                f"freezeft: {type(optimizer).__name__} cannot take the parameters a "
                "strategy thaws but configure_optimizers left out: add_param_group "
                f"failed with {error!r}. Give the optimizer all the model's parameters; "
                "frozen ones get no state and no update."
            ) from error
        source.append(template_index)
    several = len(optimizer.param_groups) > 1
    new_groups: list[dict] = []
    origin: list[tuple[int, float]] = []
    for user_index, user_group in enumerate(optimizer.param_groups):
        by_layer: dict[int, list[Tensor]] = {}
        for param in user_group["params"]:
            by_layer.setdefault(group_of.get(id(param), -1), []).append(param)
        for layer in sorted(by_layer):
            group = {k: v for k, v in user_group.items() if k != "params"}
            group["params"] = by_layer[layer]
            scale = lr_scales[layer] if layer >= 0 else 1.0
            for key in LR_KEYS:
                if isinstance(group.get(key), (int, float)):
                    group[key] = group[key] * scale
            name = groups[layer].name if layer >= 0 else "other"
            base = user_group.get("name", f"pg{user_index + 1}")
            group["name"] = f"{name}/{base}" if several else name
            group["freezeft_group"] = layer
            new_groups.append(group)
            origin.append((source[user_index], scale))
    optimizer.param_groups[:] = new_groups
    for scheduler in schedulers:
        remap_scheduler(scheduler, origin, n_user)


def remap_scheduler(scheduler: Any, origin: list[tuple[int, float]], n_old: int) -> None:
    """Give a scheduler one entry per new param group, LR lists scaled like the groups."""
    for child in getattr(scheduler, "_schedulers", []):  # SequentialLR, ChainedScheduler
        remap_scheduler(child, origin, n_old)
    for attr in SCHEDULER_LR_LISTS + SCHEDULER_PER_GROUP:
        value = getattr(scheduler, attr, None)
        if not isinstance(value, list) or len(value) != n_old:
            continue
        if attr in SCHEDULER_LR_LISTS:
            setattr(scheduler, attr, [value[i] * scale for i, scale in origin])
        else:
            setattr(scheduler, attr, [value[i] for i, _ in origin])
    steps = getattr(scheduler, "warmup_steps", None)  # timm: per group, from base_values
    if isinstance(steps, list) and len(steps) == n_old and hasattr(scheduler, "warmup_lr_init"):
        t, start = getattr(scheduler, "warmup_t", 0), scheduler.warmup_lr_init
        scheduler.warmup_steps = [(v - start) / t if t else 1 for v in scheduler.base_values]
    if len(origin) == n_old:
        return
    unknown = sorted(
        attr
        for attr, value in vars(scheduler).items()
        if not attr.startswith("_")
        and isinstance(value, list)
        and len(value) == n_old
        and all(isinstance(v, (int, float)) for v in value)
    )
    if unknown:
        warnings.warn(
            f"freezeft split {n_old} param group(s) of the optimizer into {len(origin)}, but "
            f"{type(scheduler).__name__} keeps per-group lists freezeft does not know "
            f"({unknown}): it may drive only some groups. Check its LRs (lr_schedule.csv or "
            "LearningRateMonitor), or use a torch scheduler.",
            stacklevel=2,
        )


def join_by_kind(
    root: nn.Module,
    optimizer: torch.optim.Optimizer,
    head_group: int,
    params: list[nn.Parameter],
) -> list[tuple[int, list[nn.Parameter]]]:
    """Which param group of ``optimizer`` each parameter no optimizer holds should join:
    the one holding most parameters of its kind (module type, parameter name), else the
    head's (``head_group``). Warns where that guess may not be what the user meant."""
    kind: dict[int, tuple[str, str]] = {}
    for module in root.modules():
        for name, param in module.named_parameters(recurse=False):
            kind.setdefault(id(param), (type(module).__name__, name))
    counts: dict[tuple[str, str], Counter[int]] = {}
    for index, group in enumerate(optimizer.param_groups):
        for param in group["params"]:
            counts.setdefault(kind.get(id(param), ("", "")), Counter())[index] += 1
    chosen: dict[int, list[nn.Parameter]] = {}
    for param in params:
        found = counts.get(kind.get(id(param), ("", "")))
        chosen.setdefault(found.most_common(1)[0][0] if found else head_group, []).append(param)
    empty = [i + 1 for i, g in enumerate(optimizer.param_groups) if not g["params"]]
    if empty:
        warnings.warn(
            f"freezeft: param group(s) {empty} of {type(optimizer).__name__} are empty (their "
            "parameters did not require gradients when configure_optimizers ran), so the "
            "parameters a strategy thaws joined other groups by kind and take those groups' "
            "hyperparameters. If they belong in the empty groups, give configure_optimizers "
            "all parameters: frozen ones get no state and no update.",
            stacklevel=2,
        )
    return sorted(chosen.items())
