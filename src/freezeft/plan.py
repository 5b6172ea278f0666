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
  see (or compound) the factor (``on_step`` sees the LRs a finished step used: the
  coordinator records them); between steps ``param_groups`` show the scheduler's LRs, and a frozen
  group's non-zero ``lr`` (nothing of it trains);
* norm layers of frozen groups run in eval mode whatever ``model.train()`` did;
* under DDP, gradients of parameters unfrozen after the model was wrapped (which DDP's
  reducer does not own) are averaged across ranks by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from freezeft.groups import LayerGroup
from freezeft.optimizer_groups import (
    check_optimizers,
    home_for_missing,
    join_by_kind,
    split_by_layer_group,
)

__all__ = ["Plan"]


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
        #: Called with the optimizer after every optimizer step that ran, its LRs still the
        #: ones it used (warmup applied): what records the applied LRs.
        self.on_step: Callable[[torch.optim.Optimizer], None] | None = None
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
        """Take over the user's optimizers (each with its LR schedulers), once per fit:
        parameters no optimizer holds join it, every param group is split by layer group
        with its LR scaled (schedulers follow; :mod:`freezeft.optimizer_groups`), and
        warmup is applied inside every optimizer step. Returns the names of the parameters
        added.

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
        check_optimizers([optimizer for optimizer, _ in optimizers], changes_lr)
        held = {id(p) for opt, _ in optimizers for g in opt.param_groups for p in g["params"]}
        missing = [(n, p) for own in self._own for n, p in own.items() if id(p) not in held]
        home = home_for_missing(self.groups, optimizers) if missing else None
        for optimizer, schedulers in optimizers:
            extra: list[tuple[int, list[nn.Parameter]]] = []
            if home is not None and home[0] is optimizer:
                extra = join_by_kind(root, optimizer, home[1], [p for _, p in missing])
            split_by_layer_group(
                optimizer, schedulers, self.groups, self._param_group, lr_scales, extra
            )
            self._hooks.append(optimizer.register_step_pre_hook(self._warm))
            self._hooks.append(optimizer.register_step_post_hook(self._cool))
        return [name for name, _ in missing]

    @staticmethod
    def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
        """Forget every parameter's optimizer state (moments, step counts): the next step
        starts as the first one did (groups and LRs stay)."""
        optimizer.state.clear()

    def _warm(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if self.warmup_factors is not None:
            self.apply_warmup(optimizer, self.warmup_factors())

    def _cool(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if self.on_step is not None:
            self.on_step(optimizer)
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
