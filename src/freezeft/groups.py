"""Ordered layer groups of any ``nn.Module``: what every strategy freezes, thaws and scales.

Resolution, first that applies:

1. explicit ``patterns``: fnmatch patterns on qualified module names, input to output;
2. the module's own ``layer_groups()`` returning such patterns;
3. discovery: descend through containers (``nn.Sequential``, ``nn.ModuleList``,
   ``nn.ModuleDict``) and through modules with a single parameterised child; the
   parameterised modules reached are the groups, in registration order.

Every parameter belongs to exactly one group; a parameter outside every matched module
joins the group of its nearest matched ancestor-or-sibling prefix, or the first group.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

__all__ = ["LayerGroup", "resolve_groups", "format_group_table"]


@dataclass
class LayerGroup:
    """One layer group: a name, the modules it covers and their parameters by name."""

    name: str
    modules: list[str] = field(default_factory=list)
    params: dict[str, nn.Parameter] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        """Number of scalar parameters in the group."""
        return sum(p.numel() for p in self.params.values())

    @property
    def trainable(self) -> bool:
        """True when any parameter of the group has ``requires_grad``."""
        return any(p.requires_grad for p in self.params.values())


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _discover(module: nn.Module, prefix: str = "") -> list[str]:
    children = [(name, child) for name, child in module.named_children() if _has_params(child)]
    own = [name for name, _ in module.named_parameters(recurse=False)]
    descend = isinstance(module, _CONTAINERS) or (len(children) == 1 and not own)
    if prefix and not descend:
        return [prefix]
    found: list[str] = []
    for name, child in children:
        found += _discover(child, f"{prefix}.{name}" if prefix else name)
    if own and not found:
        return [prefix] if prefix else []
    return found


def resolve_groups(module: nn.Module, patterns: Sequence[str] | None = None) -> list[LayerGroup]:
    """Resolve the ordered layer groups of ``module`` (input to output).

    Args:
        module: usually the LightningModule.
        patterns: fnmatch patterns on qualified module names; ``None`` asks the module's
            ``layer_groups()`` and falls back to discovery.

    Raises:
        ValueError: a pattern matches no module with parameters (the message lists the
            available names), two patterns claim the same module, or nothing has parameters.
    """
    if patterns is None and callable(getattr(module, "layer_groups", None)):
        patterns = list(module.layer_groups())
    named = dict(module.named_modules())
    if patterns is None:
        patterns = _discover(module)
        if not patterns:
            raise ValueError(
                f"{type(module).__name__} has no parameters, so it has no layer groups to resolve."
            )
    candidates = [name for name, child in named.items() if name and _has_params(child)]
    groups: list[LayerGroup] = []
    owner: dict[str, str] = {}
    for pattern in patterns:
        matched = [name for name in candidates if fnmatch.fnmatchcase(name, pattern)]
        # Keep the outermost matches: a match inside another match belongs to it already.
        matched = [n for n in matched if not any(n.startswith(m + ".") for m in matched)]
        if not matched:
            raise ValueError(
                f"Layer group {pattern!r} matches no module with parameters in "
                f"{type(module).__name__}. Available names: {_available(module)}."
            )
        for name in matched:
            if name in owner:
                raise ValueError(
                    f"Module {name!r} is matched by two layer groups, {owner[name]!r} and "
                    f"{pattern!r}; make the patterns disjoint."
                )
            owner[name] = pattern
        groups.append(LayerGroup(name=pattern, modules=matched))
    by_name = {g.name: g for g in groups}
    for param_name, param in module.named_parameters():
        by_name[_owning_group(param_name, owner, groups)].params[param_name] = param
    return groups


def _owning_group(param_name: str, owner: dict[str, str], groups: list[LayerGroup]) -> str:
    parts = param_name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:depth])
        if prefix in owner:
            return owner[prefix]
    # Not inside any group: attach to the group whose modules share the longest prefix.
    best, best_len = groups[0].name, -1
    for group in groups:
        for name in group.modules:
            common = 0
            for a, b in zip(name.split("."), parts, strict=False):
                if a != b:
                    break
                common += 1
            if common > best_len:
                best, best_len = group.name, common
    return best


def _available(module: nn.Module) -> list[str]:
    return [name for name, child in module.named_modules() if name and _has_params(child)]


def format_group_table(groups: Sequence[LayerGroup], head: int = 0) -> str:
    """A plain-text table: index, group name, parameter count, trainable, and the role
    (encoder or head) when ``head`` > 0."""
    width = max(len("group"), *(len(g.name) for g in groups))
    header = f"{'#':>2}  {'group':<{width}}  {'params':>10}  trainable"
    lines = [header + ("  role" if head else "")]
    for index, group in enumerate(groups):
        role = ("head" if index >= len(groups) - head else "encoder") if head else ""
        lines.append(
            f"{index:>2}  {group.name:<{width}}  {group.num_params:>10,}  "
            f"{'yes' if group.trainable else 'no':<9}  {role}".rstrip()
        )
    total = sum(g.num_params for g in groups)
    trainable = sum(p.numel() for g in groups for p in g.params.values() if p.requires_grad)
    lines.append(f"trainable parameters: {trainable:,} of {total:,}")
    return "\n".join(lines)
