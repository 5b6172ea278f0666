"""Ordered layer groups of any ``nn.Module``: what every strategy freezes, thaws and scales.

Resolution, first that applies:

1. explicit ``patterns``, one entry per group, input to output: an fnmatch pattern on
   qualified module or parameter names, or a list of them (``[["conv1", "bn1"], "layer1"]``);
2. the module's own ``layer_groups()`` returning such entries;
3. discovery, starting at the module and descending through wrappers (a module whose
   only parameterised child is another module: a LightningModule's ``self.model``, peft's
   ``PeftModel``, ``torch.compile``'s ``_orig_mod``), then the first that applies:

   a. a timm model: its own ``group_matcher()`` through timm's ``group_parameters``
      (stem, one group per block, head);
   b. a repeated stack, a ``ModuleList``/``Sequential`` whose parameterised children are
      two or more modules of one type (the largest if several; HF transformers'
      ``encoder.layer``, ``layers``, ``h``): the modules registered before it on the way
      down are the stem (one group each), each block is a group, the modules after it
      are the head (one group each, the outermost last);
   c. containers (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``) are descended;
      the parameterised modules reached are the groups, in registration order.

   A timm model met inside (b) or (c) is expanded into its own groups. Discovery that
   finds fewer than two groups is an error naming ``groups=``.

Every parameter belongs to exactly one group; a parameter outside every matched name
joins the group of its nearest matched ancestor, else the group sharing the longest name
prefix with it. A tensor registered under several names (tied weights: an LM head that
is the embedding matrix) belongs to the latest group among its names (the head), so it
trains whenever that group does; the earlier groups list it in ``tied`` and the group
table says so.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from torch import nn

__all__ = ["GroupSpec", "LayerGroup", "discover_groups", "format_group_table", "resolve_groups"]

#: One layer group as the user names it: a pattern, or a list of patterns.
GroupSpec = str | Sequence[str]


@dataclass
class LayerGroup:
    """One layer group: a name, the module or parameter names it covers, its parameters."""

    name: str
    modules: list[str] = field(default_factory=list)
    params: dict[str, nn.Parameter] = field(default_factory=dict)
    #: parameters this group's modules use that a later group owns (tied weights):
    #: the name here -> (the owning group, the name there)
    tied: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        """Number of scalar parameters in the group."""
        return sum(p.numel() for p in self.params.values())

    @property
    def trainable(self) -> bool:
        """True when any parameter of the group has ``requires_grad``."""
        return any(p.requires_grad for p in self.params.values())


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_STACKS = (nn.Sequential, nn.ModuleList)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _param_children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, child) for name, child in module.named_children() if _has_params(child)]


def _is_timm(module: nn.Module) -> bool:
    return type(module).__module__.startswith("timm.") and callable(
        getattr(module, "group_matcher", None)
    )


def group_name(spec: GroupSpec) -> str:
    """The name of a group given as a pattern or a list of patterns (joined by ``+``)."""
    return spec if isinstance(spec, str) else "+".join(spec)


def _members(spec: GroupSpec, where: str) -> list[str]:
    members = [spec] if isinstance(spec, str) else list(spec)
    if not members or not all(isinstance(m, str) and m for m in members):
        raise ValueError(
            f"Expected each layer group in {where} to be a module-name pattern or a non-empty "
            f"list of them, but got {spec!r}."
        )
    return members


# -- discovery ---------------------------------------------------------------------------
def _unwrap(module: nn.Module) -> tuple[str, nn.Module]:
    """Descend through wrappers: modules whose only parameterised part is one child."""
    prefix = ""
    while not _is_timm(module) and not isinstance(module, _CONTAINERS):
        children = _param_children(module)
        if len(children) != 1 or any(True for _ in module.parameters(recurse=False)):
            break
        name, module = children[0]
        prefix = _join(prefix, name)
    return prefix, module


def _containers(module: nn.Module, prefix: str) -> list[str]:
    """Groups by descending containers and single-child modules (strategy (c))."""
    children = _param_children(module)
    own = any(True for _ in module.parameters(recurse=False))
    descend = isinstance(module, _CONTAINERS) or (len(children) == 1 and not own)
    if prefix and (not descend or _is_timm(module)):
        return [prefix]
    found: list[str] = []
    for name, child in children:
        found += _containers(child, _join(prefix, name))
    if own and not found:
        return [prefix] if prefix else []
    return found


def _find_stack(module: nn.Module) -> tuple[list[str], int] | None:
    """The path (child names) to the largest repeated stack below ``module`` (timm models
    are not searched inside), with its size in parameters."""
    best: tuple[list[str], int] | None = None
    children = _param_children(module)
    if isinstance(module, _STACKS) and len(children) >= 2:
        if len({type(child) for _, child in children}) == 1:
            best = ([], _num_params(module))
    for name, child in children:
        if _is_timm(child):
            continue
        found = _find_stack(child)
        if found is not None and (best is None or found[1] > best[1]):
            best = ([name, *found[0]], found[1])
    return best


def _stack_groups(module: nn.Module, prefix: str, path: list[str]) -> list[str]:
    """Stem (before the stack, outer levels first), blocks, head (inner levels first)."""
    stem: list[str] = []
    heads: list[list[str]] = []
    node, node_prefix = module, prefix
    for step in path:
        names = [name for name, _ in _param_children(node)]
        at = names.index(step)
        stem += [_join(node_prefix, name) for name in names[:at]]
        heads.append([_join(node_prefix, name) for name in names[at + 1 :]])
        node, node_prefix = node.get_submodule(step), _join(node_prefix, step)
    blocks = [_join(node_prefix, name) for name, _ in _param_children(node)]
    return stem + blocks + [name for level in reversed(heads) for name in level]


def _timm_groups(model: nn.Module, prefix: str) -> list[list[str]]:
    """timm's own grouping (``group_matcher(coarse=False)``), each group named by the
    fewest module or parameter names that cover exactly its parameters."""
    from timm.models import group_parameters

    grouped = group_parameters(model, model.group_matcher(coarse=False))
    group_of = {name: gid for gid, names in grouped.items() for name in names}
    spans: dict[str, set] = {}
    for name, gid in group_of.items():
        parts = name.split(".")
        for depth in range(1, len(parts)):
            spans.setdefault(".".join(parts[:depth]), set()).add(gid)
    result: list[list[str]] = []
    for names in grouped.values():
        members: list[str] = []
        for name in names:
            parts = name.split(".")
            cover = next(
                (
                    ".".join(parts[:depth])
                    for depth in range(1, len(parts))
                    if len(spans[".".join(parts[:depth])]) == 1
                ),
                name,
            )
            if _join(prefix, cover) not in members:
                members.append(_join(prefix, cover))
        result.append(members)
    return result


def discover_groups(module: nn.Module) -> list[list[str]]:
    """The layer groups discovery finds in ``module``, each a list of qualified names.

    Raises:
        ValueError: fewer than two groups were found (the message lists the module's
            top-level children and how to pass ``groups=``).
    """
    prefix, inner = _unwrap(module)
    if _is_timm(inner):
        groups = _timm_groups(inner, prefix)
    else:
        stack = _find_stack(inner)
        names = (
            _stack_groups(inner, prefix, stack[0])
            if stack is not None
            else _containers(inner, prefix)
        )
        groups = []
        for name in names:
            child = module.get_submodule(name) if name else module
            groups += _timm_groups(child, name) if _is_timm(child) else [[name]]
    owned = [name for name, _ in module.named_parameters(remove_duplicate=False)]
    groups = [g for g in groups if any(_covers(m, p) for m in g for p in owned)]
    if len(groups) < 2:
        where = f"{type(module).__name__}" + (f".{prefix}" if prefix else "")
        children = ", ".join(
            f"{_join(prefix, name)!r} ({_num_params(child):,} params)"
            for name, child in _param_children(inner)
        ) or ", ".join(repr(_join(prefix, name)) for name, _ in inner.named_parameters())
        raise ValueError(
            f"freezeft found {len(groups)} layer group in {where} "
            f"({[group_name(g) for g in groups]}), so no strategy can freeze part of it. "
            f"Pass the groups, input to output, as `groups=[...]` to the strategy (fnmatch "
            f"patterns on module names; a list of patterns makes one group), or define "
            f"`layer_groups()` on the LightningModule. Its top-level parts: {children}."
        )
    return groups


def _covers(member: str, param_name: str) -> bool:
    return param_name == member or param_name.startswith(member + ".")


# -- resolution --------------------------------------------------------------------------
def resolve_groups(
    module: nn.Module, patterns: Sequence[GroupSpec] | None = None
) -> list[LayerGroup]:
    """Resolve the ordered layer groups of ``module`` (input to output).

    Args:
        module: usually the LightningModule.
        patterns: one entry per group: an fnmatch pattern on qualified module or
            parameter names, or a list of them; ``None`` asks the module's
            ``layer_groups()`` and falls back to discovery.

    Raises:
        ValueError: a pattern matches no module or parameter (the message lists the
            available names), two groups claim the same module, or discovery finds fewer
            than two groups.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> [g.name for g in resolve_groups(net)]
        ['0', '2']
    """
    where = "`groups`"
    if patterns is None and callable(getattr(module, "layer_groups", None)):
        patterns, where = list(module.layer_groups()), f"{type(module).__name__}.layer_groups()"
    specs = discover_groups(module) if patterns is None else list(patterns)
    module_names = [name for name, child in module.named_modules() if name and _has_params(child)]
    param_names = [name for name, _ in module.named_parameters(remove_duplicate=False)]
    candidates = module_names + param_names
    groups: list[LayerGroup] = []
    owner: dict[str, str] = {}
    for spec in specs:
        name = group_name(spec)
        matched: list[str] = []
        for pattern in _members(spec, where):
            hits = [c for c in candidates if fnmatch.fnmatchcase(c, pattern)]
            if not hits:
                raise ValueError(
                    f"Layer group {pattern!r} matches no module or parameter in "
                    f"{type(module).__name__}. Available names: {module_names}."
                )
            matched += [h for h in hits if h not in matched]
        # Keep the outermost matches: a match inside another match belongs to it already.
        matched = [n for n in matched if not any(n.startswith(m + ".") for m in matched)]
        for member in matched:
            if member in owner and owner[member] != name:
                raise ValueError(
                    f"Module {member!r} is matched by two layer groups, {owner[member]!r} and "
                    f"{name!r}; make the patterns disjoint."
                )
            owner[member] = name
        groups.append(LayerGroup(name=name, modules=matched))
    by_name = {g.name: g for g in groups}
    index = {g.name: i for i, g in enumerate(groups)}
    names_of: dict[int, list[str]] = {}
    tensors: dict[int, nn.Parameter] = {}
    for param_name, param in module.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(param_name)
        tensors[id(param)] = param
    for key, names in names_of.items():
        owners = [_owning_group(n, owner, groups) for n in names]
        last = max(range(len(names)), key=lambda i: index[owners[i]])  # the latest group
        by_name[owners[last]].params[names[last]] = tensors[key]
        for name, group in zip(names, owners, strict=True):
            if group != owners[last]:
                by_name[group].tied[name] = (owners[last], names[last])
    return groups


def _owning_group(param_name: str, owner: dict[str, str], groups: list[LayerGroup]) -> str:
    parts = param_name.split(".")
    for depth in range(len(parts), 0, -1):
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


def format_group_table(
    groups: Sequence[LayerGroup],
    head: int = 0,
    user_frozen: Collection[str] = (),
    lr_scales: Sequence[float] | None = None,
) -> str:
    """A plain-text table: index, group name, parameter count, trainable, each group's LR
    multiplier (``lr_scales``, shown when one is not 1: what DiscriminativeLR set),
    parameters the user froze (``user_frozen``: parameter names, shown when any), and the
    role (encoder or head) when ``head`` > 0."""
    width = max(len("group"), *(len(g.name) for g in groups))
    frozen = set(user_frozen)
    scaled = lr_scales is not None and any(scale != 1.0 for scale in lr_scales)
    header = f"{'#':>2}  {'group':<{width}}  {'params':>10}  trainable"
    header += f"  {'LR x':<7}" if scaled else ""
    header += "  user-frozen" if frozen else ""
    lines = [header + ("  role" if head else "")]
    for index, group in enumerate(groups):
        role = ("head" if index >= len(groups) - head else "encoder") if head else ""
        line = f"{index:>2}  {group.name:<{width}}  {group.num_params:>10,}  "
        line += f"{'yes' if group.trainable else 'no':<9}"
        if scaled:
            assert lr_scales is not None
            line += f"  {lr_scales[index]:<7.3g}"
        if frozen:
            count = sum(p.numel() for n, p in group.params.items() if n in frozen)
            line += f"  {count:>11,}"
        lines.append(f"{line}  {role}".rstrip())
    for group in groups:
        for name, (owner, there) in group.tied.items():
            lines.append(
                f"tied: {name} is {there}; it trains with {owner!r} (the later group), "
                f"whatever {group.name!r} does"
            )
    total = sum(g.num_params for g in groups)
    trainable = sum(p.numel() for g in groups for p in g.params.values() if p.requires_grad)
    summary = f"trainable parameters: {trainable:,} of {total:,}"
    if frozen:
        count = sum(p.numel() for g in groups for n, p in g.params.items() if n in frozen)
        summary += f" ({count:,} frozen by you before fit, never trained)"
    lines.append(summary)
    return "\n".join(lines)


#: name parts that wrappers add (torch.compile, FSDP1, activation checkpointing)
_WRAPPER_PARTS = {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}


def canonical_group_name(name: str) -> str:
    """A group name without the parts wrappers add (``torch.compile``'s ``_orig_mod``,
    FSDP1's ``_fsdp_wrapped_module``): the same layers, wrapped or not."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)
