"""The per-group plan that strategies state, and the one mechanism that applies it.

Strategies never touch the optimizer. Each states, per layer group, whether it trains
(or has no opinion), a static learning-rate scale and a dynamic warmup factor; the
:class:`Plan` combines them (trainable only if no strategy freezes it; scales and factors
multiply) and applies the result:

* ``requires_grad`` and ``grad = None`` for frozen parameters, so optimizers allocate no
  state for them and never touch them, and autograd builds no graph through a frozen prefix;
  parameters the user froze before fit (a LoRA base model) are never thawed;
* the user's optimizer param groups are split once per layer group at fit start, keeping
  every other hyperparameter; LR scales go into the groups' and schedulers' base LRs, so
  the groups never change shape and torch schedulers and checkpoints keep working;
  parameters the user left out of the optimizer (a ``requires_grad`` filter) join it then
  as new groups that the user's schedulers drive like the others;
* warmup factors multiply the LR inside each optimizer step only (torch's step pre- and
  post-hooks), so the step uses the scheduler's LR times the factor and schedulers never
  see (or compound) the factor;
* norm layers of frozen groups run in eval mode whatever ``model.train()`` did;
* under DDP, gradients of parameters unfrozen after the model was wrapped (which DDP's
  reducer does not own) are averaged across ranks by hand.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from freezeft.groups import LayerGroup

__all__ = ["Plan"]

#: Param-group keys that hold a learning rate (torch's own names), scaled with the group.
LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
#: Scheduler attributes that are per-group learning rates, scaled with the group.
SCHEDULER_LR_LISTS = ("base_lrs", "_last_lr", "max_lrs", "base_values")
#: Other per-group scheduler attributes, copied from the group each new group came from.
SCHEDULER_PER_GROUP = ("min_lrs", "lr_lambdas", "base_momentums", "max_momentums")


class Plan:
    """Applies the combined intent of strategies to a module and its optimizers.

    Parameters that do not require gradients when the plan is made (frozen by the user,
    e.g. a LoRA base model) are never trained: the plan freezes and thaws only the others.

    Args:
        groups: the resolved layer groups, input to output.
        bn: ``"frozen"`` keeps norm layers of frozen groups in eval mode, ``"train"`` not.

    Example::

        >>> from torch import nn
        >>> from freezeft.groups import resolve_groups
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = net[2].bias.requires_grad_(False)  # frozen by the user: never trained
        >>> plan = Plan(resolve_groups(net))
        >>> plan.set_trainable([False, True])  # freeze group '0'
        []
        >>> [p.requires_grad for p in net.parameters()]
        [False, False, True, False]
        >>> plan.trainable_params()
        16
    """

    def __init__(self, groups: Sequence[LayerGroup], bn: str = "frozen") -> None:
        self.groups = list(groups)
        self.bn = bn
        self.trainable = [True] * len(self.groups)
        #: Names of the parameters the user froze before fit: never trained, never thawed.
        self.user_frozen: set[str] = {
            name for g in self.groups for name, p in g.params.items() if not p.requires_grad
        }
        #: Called at every optimizer step: each layer group's warmup factor.
        self.warmup_factors: Callable[[], Sequence[float]] | None = None
        #: Per group, the parameters the plan may freeze and thaw (the user's frozen ones
        #: left out), by name: fixed for the plan's life.
        self._own: list[dict[str, nn.Parameter]] = [
            {n: p for n, p in g.params.items() if n not in self.user_frozen} for g in self.groups
        ]
        self._param_group: dict[int, int] = {
            id(p): index for index, g in enumerate(self.groups) for p in g.params.values()
        }
        self._stash: list[tuple[dict, float]] = []
        self._reducer_owned: set[int] | None = None
        self._hooks: list[Any] = []
        self._norm_modes: list[tuple[nn.Module, bool]] = []

    # -- trainable flags ---------------------------------------------------------------
    def set_trainable(self, flags: Sequence[bool]) -> list[int]:
        """Make group ``i`` trainable iff ``flags[i]`` (parameters the user froze stay
        frozen); returns the groups newly unfrozen."""
        unfrozen = [i for i, f in enumerate(flags) if f and not self.trainable[i]]
        self.trainable = list(flags)
        for index, flag in enumerate(self.trainable):
            for param in self._own[index].values():
                param.requires_grad_(flag)
                if not flag:
                    param.grad = None
        return unfrozen

    def has_own_params(self, index: int) -> bool:
        """Whether group ``index`` has parameters the user did not freeze."""
        return bool(self._own[index])

    def trains(self, index: int) -> bool:
        """Whether group ``index`` has parameters that train now."""
        return self.trainable[index] and bool(self._own[index])

    def trainable_params(self) -> int:
        """Number of scalar parameters that train now."""
        return sum(
            p.numel() for i, t in enumerate(self.trainable) if t for p in self._own[i].values()
        )

    def release(self) -> None:
        """At fit end: thaw what the plan froze, undo warmup, remove every hook and give
        norm layers their modes back, so the module leaves fit with the ``requires_grad``
        flags and modes it came with (its weights trained)."""
        self.set_trainable([True] * len(self.groups))
        self.restore_lr()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for module, training in self._norm_modes:
            module.train(training)
        self._norm_modes = []

    # -- norm layers -------------------------------------------------------------------
    def install_norm_hooks(self, root: nn.Module) -> None:
        """Keep norm layers of frozen groups in eval mode (and of trainable ones in train
        mode while the model trains), checked at every forward. A norm layer belongs to the
        group that owns its parameters (or, without parameters, to the group whose module
        contains it), also where explicit ``groups`` left its module out."""
        if self.bn != "frozen":
            return
        for name, module in root.named_modules():
            if not isinstance(module, _NormBase):
                continue
            index = self._group_of_module(name, module)
            if index is None:
                continue
            self._hooks.append(module.register_forward_pre_hook(self._norm_hook(root, index)))
            self._norm_modes.append((module, module.training))

    def _group_of_module(self, name: str, module: nn.Module) -> int | None:
        for param in module.parameters():
            if id(param) in self._param_group:
                return self._param_group[id(param)]
        owners = [
            (len(member), index)
            for index, group in enumerate(self.groups)
            for member in group.modules
            if name == member or name.startswith(member + ".")
        ]
        return max(owners)[1] if owners else None

    def _norm_hook(self, root: nn.Module, index: int):
        # While the model trains, a norm layer trains iff its group does: frozen groups keep
        # their running statistics, and unfrozen ones resume updating them (Lightning
        # restores pre-validation modes, so an eval() from the frozen phase would stick).
        def hook(module: nn.Module, _inputs: Any) -> None:
            if root.training and module.training != self.trainable[index]:
                module.train(self.trainable[index])

        return hook

    # -- optimizers and schedulers -----------------------------------------------------
    def attach(
        self,
        optimizers: Sequence[tuple[torch.optim.Optimizer, Sequence[Any]]],
        lr_scales: Sequence[float],
        root: nn.Module,
        changes_lr: bool = True,
    ) -> list[str]:
        """Take over the user's optimizers (each with its LR schedulers), once per fit.

        Parameters that no optimizer holds and that the plan may thaw are added to the
        optimizer holding the head: each joins the param group holding parameters of its
        kind (same module type and parameter name: a ``Linear.bias`` joins the group of the
        other ``Linear`` biases, e.g. a no-decay group), else the group holding the head.
        Then every param group is split by layer group with its LR scaled (schedulers
        follow), and warmup is applied inside every optimizer step. Returns the names of
        the parameters added.

        Args:
            optimizers: each optimizer with the LR schedulers that drive it.
            lr_scales: the LR multiplier of each layer group.
            root: the module the groups were resolved on.
            changes_lr: whether a strategy scales or warms up LRs (refused for param groups
                without a numeric ``lr``, such as Adafactor's relative steps).

        Raises:
            ValueError: an optimizer cannot be split, take new param groups or have its LR
                changed.
        """
        for optimizer, _ in optimizers:
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
        held = {id(p) for opt, _ in optimizers for g in opt.param_groups for p in g["params"]}
        missing = [(n, p) for own in self._own for n, p in own.items() if id(p) not in held]
        home = self._home_for_missing(optimizers) if missing else None
        for optimizer, schedulers in optimizers:
            extra: list[tuple[int, list[nn.Parameter]]] = []
            if home is not None and home[0] is optimizer:
                extra = _join_by_kind(root, optimizer, home[1], [p for _, p in missing])
            self.split_optimizer(optimizer, schedulers, lr_scales, extra)
            self._hooks.append(optimizer.register_step_pre_hook(self._warm))
            self._hooks.append(optimizer.register_step_post_hook(self._cool))
        return [name for name, _ in missing]

    def _home_for_missing(
        self, optimizers: Sequence[tuple[torch.optim.Optimizer, Sequence[Any]]]
    ) -> tuple[torch.optim.Optimizer, int]:
        """The optimizer and param group holding most of the head (else the nearest group
        below it): parameters no optimizer holds join it."""
        for index in reversed(range(len(self.groups))):
            ids = {id(p) for p in self.groups[index].params.values()}
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
            f"{[g.name for g in self.groups]}, so there is no optimizer to add the ones a "
            "strategy thaws to. Return an optimizer over the model's parameters from "
            "configure_optimizers."
        )

    def split_optimizer(
        self,
        optimizer: torch.optim.Optimizer,
        schedulers: Sequence[Any],
        lr_scales: Sequence[float],
        extra: Sequence[tuple[int, list[nn.Parameter]]] = (),
    ) -> None:
        """Split each param group of ``optimizer`` by layer group, once, scaling LRs.

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
                by_layer.setdefault(self._param_group.get(id(param), -1), []).append(param)
            for layer in sorted(by_layer):
                group = {k: v for k, v in user_group.items() if k != "params"}
                group["params"] = by_layer[layer]
                scale = lr_scales[layer] if layer >= 0 else 1.0
                for key in LR_KEYS:
                    if isinstance(group.get(key), (int, float)):
                        group[key] = group[key] * scale
                name = self.groups[layer].name if layer >= 0 else "other"
                base = user_group.get("name", f"pg{user_index + 1}")
                group["name"] = f"{name}/{base}" if several else name
                group["freezeft_group"] = layer
                new_groups.append(group)
                origin.append((source[user_index], scale))
        optimizer.param_groups[:] = new_groups
        for scheduler in schedulers:
            _remap_scheduler(scheduler, origin, n_user)

    @staticmethod
    def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
        """Forget every parameter's optimizer state (moments, step counts): the next step
        starts as the first one did (groups and LRs stay)."""
        optimizer.state.clear()

    def _warm(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if self.warmup_factors is not None:
            self.apply_warmup(optimizer, self.warmup_factors())

    def _cool(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        self.restore_lr()

    def apply_warmup(self, optimizer: torch.optim.Optimizer, factors: Sequence[float]) -> None:
        """Multiply each group's LR by its layer group's warmup factor until :meth:`restore_lr`
        (the plan does both around every optimizer step, so the step uses the scheduler's
        LR times the factor, and schedulers only ever see their own LRs)."""
        self.restore_lr()
        for group in optimizer.param_groups:
            layer = group.get("freezeft_group", -1)
            factor = factors[layer] if layer >= 0 else 1.0
            if factor != 1.0:
                self._stash.append((group, group["lr"]))
                group["lr"] = group["lr"] * factor

    def restore_lr(self) -> None:
        """Undo :meth:`apply_warmup`."""
        for group, lr in self._stash:
            group["lr"] = lr
        self._stash = []

    # -- DDP ---------------------------------------------------------------------------
    def record_reducer_params(self, module: nn.Module) -> None:
        """Remember which parameters DDP's reducer owns: those trainable when it was built."""
        self._reducer_owned = {id(p) for p in module.parameters() if p.requires_grad}

    def sync_unowned_gradients(self) -> None:
        """Average across ranks the gradients DDP's reducer does not own (unfrozen later)."""
        if self._reducer_owned is None or not torch.distributed.is_initialized():
            return
        grads = [
            p.grad
            for g, t in zip(self.groups, self.trainable, strict=True)
            if t
            for p in g.params.values()
            if id(p) not in self._reducer_owned and p.grad is not None
        ]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= torch.distributed.get_world_size()
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def _remap_scheduler(scheduler: Any, origin: list[tuple[int, float]], n_old: int) -> None:
    """Give a scheduler one entry per new param group, LR lists scaled like the groups."""
    for child in getattr(scheduler, "_schedulers", []):  # SequentialLR, ChainedScheduler
        _remap_scheduler(child, origin, n_old)
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


def _join_by_kind(
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
