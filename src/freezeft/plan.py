"""The per-group plan that strategies state, and the one mechanism that applies it.

Strategies never touch the optimizer. Each states, per layer group, whether it trains
(or has no opinion), a static learning-rate scale and a dynamic warmup factor; the
:class:`Plan` combines them (trainable only if no strategy freezes it; scales and factors
multiply) and applies the result:

* ``requires_grad`` and ``grad = None`` for frozen parameters, so optimizers allocate no
  state for them and never touch them, and autograd builds no graph through a frozen prefix;
* the user's optimizer param groups are split once per layer group at fit start, keeping
  every other hyperparameter; LR scales go into the groups' and schedulers' base LRs, so
  the groups never change shape and torch schedulers and checkpoints keep working;
* warmup factors multiply the LR around each optimizer step only, so schedulers never see
  (and never compound) them;
* norm layers of frozen groups run in eval mode whatever ``model.train()`` did;
* under DDP, gradients of parameters unfrozen after the model was wrapped (which DDP's
  reducer does not own) are averaged across ranks by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from freezeft.groups import LayerGroup

__all__ = ["Plan"]

#: Param-group keys that hold a learning rate (torch's own names), scaled with the group.
LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
#: Scheduler attributes that are per-group learning rates, scaled with the group.
SCHEDULER_LR_LISTS = ("base_lrs", "_last_lr", "max_lrs")
#: Other per-group scheduler attributes, copied from the group each new group came from.
SCHEDULER_PER_GROUP = ("min_lrs", "lr_lambdas", "base_momentums", "max_momentums")


class Plan:
    """Applies the combined intent of strategies to a module and its optimizers.

    Args:
        groups: the resolved layer groups, input to output.
        bn: ``"frozen"`` keeps norm layers of frozen groups in eval mode, ``"train"`` not.
    """

    def __init__(self, groups: Sequence[LayerGroup], bn: str = "frozen") -> None:
        self.groups = list(groups)
        self.bn = bn
        self.trainable = [True] * len(self.groups)
        self._param_group: dict[int, int] = {
            id(p): index for index, g in enumerate(self.groups) for p in g.params.values()
        }
        self._stash: list[tuple[dict, float]] = []
        self._reducer_owned: set[int] | None = None
        self._norm_hooks: list[Any] = []

    # -- trainable flags ---------------------------------------------------------------
    def set_trainable(self, flags: Sequence[bool]) -> list[int]:
        """Make group ``i`` trainable iff ``flags[i]``; returns the groups newly unfrozen."""
        unfrozen = [i for i, f in enumerate(flags) if f and not self.trainable[i]]
        self.trainable = list(flags)
        for group, flag in zip(self.groups, self.trainable, strict=True):
            for param in group.params.values():
                param.requires_grad_(flag)
                if not flag:
                    param.grad = None
        return unfrozen

    def trainable_params(self) -> int:
        """Number of scalar parameters that train now."""
        return sum(g.num_params for g, t in zip(self.groups, self.trainable, strict=True) if t)

    # -- norm layers -------------------------------------------------------------------
    def install_norm_hooks(self, root: nn.Module) -> None:
        """Keep norm layers of frozen groups in eval mode (and of trainable ones in train
        mode while the model trains), checked at every forward."""
        self.remove_norm_hooks()
        if self.bn != "frozen":
            return
        for index, group in enumerate(self.groups):
            for name in group.modules:
                for module in root.get_submodule(name).modules():
                    if isinstance(module, _NormBase):
                        hook = module.register_forward_pre_hook(self._norm_hook(root, index))
                        self._norm_hooks.append(hook)

    def _norm_hook(self, root: nn.Module, index: int):
        # While the model trains, a norm layer trains iff its group does: frozen groups keep
        # their running statistics, and unfrozen ones resume updating them (Lightning
        # restores pre-validation modes, so an eval() from the frozen phase would stick).
        def hook(module: nn.Module, _inputs: Any) -> None:
            if root.training and module.training != self.trainable[index]:
                module.train(self.trainable[index])

        return hook

    def remove_norm_hooks(self) -> None:
        """Remove the norm-layer hooks (at fit end)."""
        for handle in self._norm_hooks:
            handle.remove()
        self._norm_hooks = []

    # -- optimizers and schedulers -----------------------------------------------------
    def split_optimizer(
        self,
        optimizer: torch.optim.Optimizer,
        schedulers: Sequence[Any],
        lr_scales: Sequence[float],
    ) -> None:
        """Split each param group of ``optimizer`` by layer group, once, scaling LRs."""
        if any("freezeft_group" in g for g in optimizer.param_groups):
            return  # already split (a second fit with the same optimizer)
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
                origin.append((user_index, scale))
        optimizer.param_groups[:] = new_groups
        for scheduler in schedulers:
            _remap_scheduler(scheduler, origin)

    def apply_warmup(self, optimizer: torch.optim.Optimizer, factors: Sequence[float]) -> None:
        """Multiply each group's LR by its layer group's warmup factor until :meth:`restore_lr`."""
        self.restore_lr()
        for group in optimizer.param_groups:
            layer = group.get("freezeft_group", -1)
            factor = factors[layer] if layer >= 0 else 1.0
            if factor != 1.0:
                self._stash.append((group, group["lr"]))
                group["lr"] = group["lr"] * factor

    def restore_lr(self) -> None:
        """Undo :meth:`apply_warmup` so schedulers see their own LRs."""
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


def _remap_scheduler(scheduler: Any, origin: list[tuple[int, float]]) -> None:
    """Give a scheduler one entry per new param group, LR lists scaled like the groups."""
    n_old = max(i for i, _ in origin) + 1
    for child in getattr(scheduler, "_schedulers", []):  # SequentialLR, ChainedScheduler
        _remap_scheduler(child, origin)
    for attr in SCHEDULER_LR_LISTS + SCHEDULER_PER_GROUP:
        value = getattr(scheduler, attr, None)
        if not isinstance(value, list) or len(value) != n_old:
            continue
        if attr in SCHEDULER_LR_LISTS:
            setattr(scheduler, attr, [value[i] * scale for i, scale in origin])
        else:
            setattr(scheduler, attr, [value[i] for i, _ in origin])
