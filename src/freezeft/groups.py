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
      the parameterised modules reached are the groups, in registration order. The
      module's own parts (a LightningModule's ``self.fc1``, ``self.out``, ...) are taken
      in the order a forward pass calls them, as in (d) (for (b) too: a head registered
      before the stack is still the head); where the pass cannot establish that order
      they stay in registration order and the fit warns, unless the pass calls them
      first in another order: then it is refused;
   d. a module that is none of these but calls its parameterised children one after
      another (torchaudio's ``DeepSpeech``: ``fc1, fc2, fc3, bi_rnn, fc4, out``): one group
      per child, in the order a real forward pass calls them (:class:`ForwardPass`, given
      by the caller: the coordinator watches one training batch at fit start). The order
      counts only if each child is called exactly once and takes the output of the child
      called before it (checked by following every tensor the pass computes); a child
      called twice, never, or on a parallel branch leaves the order unknown.

   A timm model met inside (b) or (c) is expanded into its own groups. Discovery that
   finds fewer than two groups is an error naming ``groups=`` (and, for (d), why the
   forward pass did not settle the order).

:func:`resolve_groups` returns the groups with ``found_by``, how they were found, which
the group table prints.

Every parameter belongs to exactly one group; a parameter outside every matched name
joins the group of its nearest matched ancestor, else the group sharing the longest name
prefix with it. A tensor registered under several names (tied weights: an LM head that
is the embedding matrix) belongs to the latest group among its names (the head), so it
trains whenever that group does; the earlier groups list it in ``tied`` and the group
table says so.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "ForwardPass",
    "GroupSpec",
    "LayerGroup",
    "ResolvedGroups",
    "confirm_order",
    "discover_groups",
    "format_group_table",
    "resolve_groups",
    "trainable_groups",
]

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


class ResolvedGroups(list):
    """The layer groups, input to output (a ``list`` of :class:`LayerGroup`), and
    ``found_by``: how they were found, in words (the group table's last line).

    ``unconfirmed``: where discovery took a module's parts in registration order and a
    forward pass could not confirm that order, why (the fit warns); ``provisional``: the
    order still waits for a forward pass (none was given), which the fit takes through
    :func:`confirm_order`."""

    def __init__(
        self,
        groups: Sequence[LayerGroup] = (),
        found_by: str = "",
        unconfirmed: str = "",
        provisional: bool = False,
    ) -> None:
        super().__init__(groups)
        self.found_by = found_by
        self.unconfirmed = unconfirmed
        self.provisional = provisional


@dataclass(frozen=True)
class ForwardPass:
    """One forward pass on real data that discovery may watch to order a module's children.

    Args:
        source: what it runs on, for messages and the group table ("one training batch").
        run: runs it; discovery stops it (an exception raised through it) once the module
            it orders has returned, so nothing after that forward is run.
    """

    source: str
    run: Callable[[], object]


def trainable_groups(
    groups: Sequence[LayerGroup], user_frozen: Collection[str] | None = None
) -> list[int]:
    """The indices of the groups holding a parameter the user left trainable: the groups
    ``head``, ``n_frozen``, stages and LR depths count. A group whose every parameter the
    user froze (a LoRA base model's embeddings, norm, ``lm_head``), or that holds none (a
    tied embedding owned by the head), is not counted.

    Args:
        groups: the resolved groups.
        user_frozen: the names of the parameters the user froze before fit (a
            :class:`~freezeft.plan.Plan`'s ``user_frozen``); ``None``: those that do not
            require gradients now.
    """
    if user_frozen is None:
        return [i for i, g in enumerate(groups) if g.trainable]
    frozen = set(user_frozen)
    return [i for i, g in enumerate(groups) if any(n not in frozen for n in g.params)]


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


#: How to name the groups where discovery cannot: the end of its errors.
NAME_THE_GROUPS = (
    "Pass the groups, input to output, as `groups=[...]` to the strategy (fnmatch patterns "
    "on module names; a list of patterns makes one group), or define `layer_groups()` on "
    "the LightningModule."
)


class _Returned(BaseException):
    """Raised through a watched forward pass once the module being ordered has returned
    (or, watching the whole pass, every part that trains has been called): what the pass
    does after that (a loss, logging, an optimizer step) is not needed. Not an
    ``Exception``, so a user's ``except Exception`` around the forward lets it through."""


class _DataFlow(TorchFunctionMode):
    """Follows every tensor a forward pass computes: which watched children (by index)
    each one derives from."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: dict[int, frozenset[int]] = {}
        self._alive: list[torch.Tensor] = []  # ids stay unique while the pass is watched

    def of(self, tree: Any) -> frozenset[int]:
        """The children the tensors in ``tree`` derive from."""
        found: frozenset[int] = frozenset()
        for leaf in tree_flatten(tree)[0]:
            if isinstance(leaf, torch.Tensor):
                found |= self.sources.get(id(leaf), frozenset())
        return found

    def mark(self, tree: Any, sources: frozenset[int]) -> None:
        """Note that the tensors in ``tree`` derive from ``sources`` too."""
        if not sources:
            return
        for leaf in tree_flatten(tree)[0]:
            if isinstance(leaf, torch.Tensor):
                self.sources[id(leaf)] = self.sources.get(id(leaf), frozenset()) | sources
                self._alive.append(leaf)

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        sources = self.of((args, kwargs))
        self.mark(out, sources)
        name = getattr(func, "__name__", "")
        if args and (name == "__setitem__" or (name.endswith("_") and not name.endswith("__"))):
            self.mark(args[0], sources)  # in place: the first argument holds the result
        return out


def _callable_parts(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """The parameterised children of ``module``, a ``ModuleList``/``ModuleDict`` (which a
    forward iterates, never calls) replaced by its own parts."""
    parts: list[tuple[str, nn.Module]] = []
    for name, child in _param_children(module):
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            parts += _callable_parts(child, _join(prefix, name))
        else:
            parts.append((_join(prefix, name), child))
    return parts


def _watch(
    module: nn.Module,
    parts: list[tuple[str, nn.Module]],
    forward: ForwardPass,
    whole: bool,
    contradicted: list[str],
) -> list[str] | str:
    """The qualified names of ``parts`` in the order ``forward`` calls them inside
    ``module``'s forward, or a sentence saying why that order does not hold. ``whole``:
    ``module`` is the one the pass runs on (the LightningModule), so a pass that ends
    without calling its ``forward`` (a ``training_step`` that calls the parts itself) was
    watched whole; for it, ``contradicted`` receives the parts in the order they were
    first called when that is not their registration order."""
    flow = _DataFlow()
    calls: list[int] = []
    inputs: list[frozenset[int]] = []
    returned: list[bool] = []
    inside = [0] * len(parts)  # how deep in each part's own forward the pass is
    latest: list[int] = []  # the part of the latest call seen, of it or inside it

    # A part counts as called when its forward is, or when its submodules are called one
    # run after another outside it (``self.backbone.forward_features(x)``: a method, not
    # ``__call__``, so only the submodules' hooks fire).
    def called(index: int, own: bool) -> Callable[..., None]:
        def hook(_module: nn.Module, args: Any, kwargs: Any) -> None:
            if own or (not inside[index] and latest != [index]):
                calls.append(index)
                inputs.append(flow.of((args, kwargs)))
            inside[index] += own
            latest[:] = [index]

        return hook

    # Parts whose every parameter the user froze (a teacher, an EMA copy) need no place in
    # the order: uncalled, they are no reason to doubt it.
    needed = {
        i for i, (_, part) in enumerate(parts) if any(p.requires_grad for p in part.parameters())
    }

    def finished(index: int, own: bool) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, _kwargs: Any, output: Any) -> None:
            inside[index] -= own
            flow.mark(output, frozenset({index}))
            latest[:] = [index]
            if whole and not any(inside) and needed <= set(calls):
                returned.append(True)  # every part has run: the rest of the step is not needed
                raise _Returned

        return hook

    def done(_module: nn.Module, _args: Any, _output: Any) -> None:
        returned.append(True)
        raise _Returned

    handles = [module.register_forward_hook(done)]
    for index, (_, part) in enumerate(parts):
        for sub in part.modules():
            own = sub is part
            handles.append(sub.register_forward_pre_hook(called(index, own), with_kwargs=True))
            handles.append(sub.register_forward_hook(finished(index, own), with_kwargs=True))
    error: Exception | None = None
    try:
        with flow:
            with _eager():  # compiled code would trace the hooks (and fail on them)
                forward.run()
    except _Returned:
        pass
    except Exception as caught:  # the pass itself failed: the order stays unknown
        error = caught
    finally:
        for handle in handles:
            handle.remove()
    if not returned and error is None and whole:
        returned.append(True)
    names = [name for name, _ in parts]
    first = list(dict.fromkeys(calls))
    if whole and first != sorted(first):  # called in another order than registered
        contradicted[:] = [names[i] for i in first]
    if not returned:
        if error is not None:
            message = str(error).strip().splitlines()
            return f"it raised {type(error).__name__}: {message[0] if message else ''}".rstrip(": ")
        return "it never called this module"
    twice = [
        f"{names[i]} ({calls.count(i)} times)" for i in dict.fromkeys(calls) if calls.count(i) > 1
    ]
    if twice:
        return f"parts called more than once: {', '.join(twice)}"
    never = [names[i] for i in sorted(needed) if i not in calls]
    if never:
        return f"parts never called: {', '.join(never)}"
    for k in range(1, len(calls)):
        if calls[k - 1] not in inputs[k]:
            return (
                f"{names[calls[k]]} does not take the output of {names[calls[k - 1]]}, called "
                "just before it (parallel branches)"
            )
    return [names[i] for i in calls] + [n for i, n in enumerate(names) if i not in calls]


@contextlib.contextmanager
def _eager() -> Iterator[None]:
    """``torch.compile``d modules and functions run as plain Python for the watched pass."""
    try:
        import torch._dynamo
    except ImportError:  # a torch without the compiler
        yield
        return
    with torch._dynamo.config.patch(disable=True):
        yield


def _forward_order(
    module: nn.Module, prefix: str, passes: Sequence[ForwardPass]
) -> tuple[list[str] | None, str, list[str]]:
    """The children of ``module`` in forward order and how they were found, or ``None``,
    why no pass settled the order, and (for the module a pass runs on) the order its
    parts were first called in where that contradicts their registration order."""
    parts = _callable_parts(module, prefix)
    reasons: list[str] = []
    contradicted: list[str] = []
    for forward in passes:
        outcome = _watch(module, parts, forward, not prefix, contradicted)
        if isinstance(outcome, list):
            where = prefix or type(module).__name__
            found = f"the order {where} calls its parts in, watched on {forward.source}"
            return outcome, found, []
        reasons.append(f"on {forward.source}, {outcome}")
    return None, "; ".join(reasons), contradicted


def discover_groups(module: nn.Module, forward: Sequence[ForwardPass] = ()) -> list[list[str]]:
    """The layer groups discovery finds in ``module``, each a list of qualified names.

    Args:
        module: usually the LightningModule.
        forward: forward passes on real data, tried in turn where a module's children can
            only be ordered by watching one (strategy (d) of :mod:`freezeft.groups`).

    Raises:
        ValueError: fewer than two groups were found (the message lists the module's
            top-level children and how to pass ``groups=``).
    """
    return _discover(module, forward)[0]


def _discover(
    module: nn.Module, forward: Sequence[ForwardPass] = ()
) -> tuple[list[list[str]], str, str, bool]:
    """The groups, how they were found, why their registration order is unconfirmed
    (or ""), and whether that order still waits for a forward pass."""
    prefix, inner = _unwrap(module)
    why_not = unconfirmed = ""
    provisional = False
    if _is_timm(inner):
        groups = _timm_groups(inner, prefix)
        found_by = f"timm's group_matcher() of {prefix or type(inner).__name__}"
    else:
        stack = _find_stack(inner)
        ordered = False
        if stack is not None:
            names = _stack_groups(inner, prefix, stack[0])
            path = ".".join(part for part in (prefix, *stack[0]) if part)
            blocks = len(_param_children(inner.get_submodule(".".join(stack[0]))))
            found_by = (
                f"the repeated stack {path or type(inner).__name__} ({blocks} blocks), with the "
                "modules before it and after it in registration order"
            )
        else:
            names = _containers(inner, prefix)
            found_by = "containers descended, in registration order"
            ordered = bool(
                len(names) < 2
                and prefix
                and not isinstance(inner, _CONTAINERS)
                and len(_param_children(inner)) >= 2
            )
            if ordered:
                in_order, why, _ = _forward_order(inner, prefix, forward)
                if in_order is not None:
                    names, found_by = in_order, why
                else:
                    why_not = why
        if not ordered and _unordered_parts(inner, prefix, names):
            # The LightningModule's own parts: registered in whatever order __init__ wrote
            # them. A forward pass says whether they are called in that order.
            names, found_by, unconfirmed, provisional = _order_own_parts(
                inner, names, forward, found_by
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
        order = ""
        if why_not:
            order = (
                f" Their order could not be taken from a forward pass ({why_not}), and "
                "freezeft does not guess it."
            )
        elif prefix and len(_param_children(inner)) >= 2 and not forward:
            order = (
                " (At fit start, freezeft orders such parts by watching one forward pass; "
                "here none was given.)"
            )
        raise ValueError(
            f"freezeft found {len(groups)} layer group in {where} "
            f"({[group_name(g) for g in groups]}), so no strategy can freeze part of it. "
            f"{NAME_THE_GROUPS} Its top-level parts: {children}.{order}"
        )
    return groups, found_by, unconfirmed, provisional


def _order_own_parts(
    module: nn.Module, names: list[str], forward: Sequence[ForwardPass], found_by: str
) -> tuple[list[str], str, str, bool]:
    """``names`` (groups within ``module``'s own parts) in the order a forward pass calls
    those parts, with how they were found, why their registration order is unconfirmed
    (or ""), and whether the order still waits for a pass (none was given).

    Raises:
        ValueError: the pass calls the parts first in another order than registered, and
            does not settle the order either (a part called twice, never, in parallel).
    """
    if not forward:
        return names, found_by, "", True
    in_order, why, first = _forward_order(module, "", forward)
    if in_order is not None:
        if found_by.startswith("the repeated stack"):
            return (
                _in_call_order(names, in_order),
                found_by.replace("in registration order", f"in {why}"),
                "",
                False,
            )
        return _in_call_order(names, in_order), f"{why}, containers descended", "", False
    if first:
        registered = [name for name, _ in _callable_parts(module, "")]
        raise ValueError(
            f"freezeft cannot order the layer groups of {type(module).__name__}: its parts "
            f"are registered as {registered}, a forward pass first calls them as {first}, "
            f"and the pass does not settle the order either ({why}); freezeft does not "
            f"guess it. {NAME_THE_GROUPS}"
        )
    return names, f"{found_by} (not confirmed by a forward pass: {why})", why, False


def confirm_order(
    groups: ResolvedGroups, module: nn.Module, forward: Sequence[ForwardPass]
) -> ResolvedGroups:
    """``groups`` whose order waited for a forward pass (``provisional``: resolved where
    none could run, as the app's config check does), put in the order ``forward`` calls
    the module's own parts; the same :class:`LayerGroup` objects, not resolved again.
    Groups that are not provisional are returned as they are.

    Raises:
        ValueError: as :func:`resolve_groups`, where the pass contradicts the order.
    """
    if not getattr(groups, "provisional", False):
        return groups
    by_name = {group.name: group for group in groups}
    names, found_by, unconfirmed, provisional = _order_own_parts(
        module, list(by_name), forward, groups.found_by
    )
    if names != list(by_name) and any(group.tied for group in groups):
        return resolve_groups(module, None, forward)  # a tied weight's owner is the latest
    return ResolvedGroups([by_name[n] for n in names], found_by, unconfirmed, provisional)


def _in_call_order(names: list[str], parts: list[str]) -> list[str]:
    """``names`` sorted by the position in ``parts`` (the module's own parts, in the order
    its forward pass calls them) of the part each lies in; their order within a part kept."""

    def position(name: str) -> int:
        return next(i for i, p in enumerate(parts) if name == p or name.startswith(f"{p}."))

    return sorted(names, key=position)


def _unordered_parts(module: nn.Module, prefix: str, names: list[str]) -> bool:
    """``module`` is the one discovery started at, not a container, and holds two or more
    callable parts: their registration order is not known to be their call order."""
    return (
        not prefix
        and not isinstance(module, _CONTAINERS)
        and len(names) >= 2
        and len(_callable_parts(module, prefix)) >= 2
    )


def _covers(member: str, param_name: str) -> bool:
    return param_name == member or param_name.startswith(member + ".")


# -- resolution --------------------------------------------------------------------------
def resolve_groups(
    module: nn.Module,
    patterns: Sequence[GroupSpec] | None = None,
    forward: Sequence[ForwardPass] = (),
) -> ResolvedGroups:
    """Resolve the ordered layer groups of ``module`` (input to output).

    Args:
        module: usually the LightningModule.
        patterns: one entry per group: an fnmatch pattern on qualified module or
            parameter names, or a list of them; ``None`` asks the module's
            ``layer_groups()`` and falls back to discovery.
        forward: forward passes on real data that discovery may watch to order a
            module's children (see :class:`ForwardPass`); tried in turn.

    Returns:
        the groups, with ``found_by`` saying how they were found.

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
    unconfirmed, provisional = "", False
    if patterns is None:
        specs, found_by, unconfirmed, provisional = _discover(module, forward)
    else:
        specs, found_by = list(patterns), f"{where}, as given"
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
    return ResolvedGroups(groups, found_by, unconfirmed, provisional)


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
    head: int | Collection[int] = 0,
    user_frozen: Collection[str] = (),
    lr_scales: Sequence[float] | None = None,
    found_by: str | None = None,
) -> str:
    """A plain-text table: index, group name, parameter count, trainable, each group's LR
    multiplier (``lr_scales``, shown when one is not 1: what DiscriminativeLR set),
    parameters the user froze (``user_frozen``: parameter names, shown when any), and the
    role: ``head`` or ``encoder`` (``head``: how many groups from the top, or their
    indices), ``user-frozen`` for a group whose every parameter the user froze and
    ``tied`` for one that holds none of its own; neither is counted by ``head``,
    ``n_frozen``, stages or LR depths. The last lines say how the groups were found
    (``found_by``, else the groups' own, if they are :class:`ResolvedGroups`)."""
    width = max(len("group"), *(len(g.name) for g in groups))
    frozen = set(user_frozen)
    counted = set(trainable_groups(groups, frozen))
    if isinstance(head, int):
        heads = set(range(len(groups) - head, len(groups))) if head else set()
    else:
        heads = set(head)
    roles = bool(heads) or len(counted) < len(groups)
    scaled = lr_scales is not None and any(scale != 1.0 for scale in lr_scales)
    header = f"{'#':>2}  {'group':<{width}}  {'params':>10}  trainable"
    header += f"  {'LR x':<7}" if scaled else ""
    header += "  user-frozen" if frozen else ""
    lines = [header + ("  role" if roles else "")]
    for index, group in enumerate(groups):
        role = ""
        if index not in counted:
            role = "user-frozen" if group.params else "tied"
        elif heads:
            role = "head" if index in heads else "encoder"
        line = f"{index:>2}  {group.name:<{width}}  {group.num_params:>10,}  "
        line += f"{'yes' if group.trainable else 'no':<9}"
        if scaled:
            assert lr_scales is not None
            scale = f"{lr_scales[index]:.3g}" if index in counted else "-"
            line += f"  {scale:<7}"
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
    uncounted = [groups[i].name for i in range(len(groups)) if i not in counted]
    if uncounted:
        lines.append(
            f"not counted by head, n_frozen, stages or LR depths (nothing of theirs can "
            f"train): {uncounted}"
        )
    found_by = found_by if found_by is not None else getattr(groups, "found_by", "")
    if found_by:
        lines.append(f"groups found by: {found_by}")
    return "\n".join(lines)


#: name parts that wrappers add (torch.compile, FSDP1, activation checkpointing)
_WRAPPER_PARTS = {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}


def canonical_group_name(name: str) -> str:
    """A group name without the parts wrappers add (``torch.compile``'s ``_orig_mod``,
    FSDP1's ``_fsdp_wrapped_module``): the same layers, wrapped or not."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)
