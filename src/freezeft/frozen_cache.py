"""Compute a frozen prefix's outputs once per sample and train the head from them.

When the first ``n`` layer groups are frozen and deterministic (dropout off in them, no
random augmentation), their output for a sample never changes, so every epoch after the
first can skip them. Augmentation drawn from a few choices per batch (speed perturbation's
speeds) keeps that true when the module puts the draw in each sample's key: the cache then
holds one output per sample and draw. The fit's validation reuses the cache too, since the
prefix's outputs are the same in eval mode. ``FrozenEncoder``, ``FreezeThenUnfreeze``,
``GradualUnfreeze`` and ``AutoFreeze`` do this with ``cache_frozen=True`` for a module that
implements :class:`PrefixCachable`; the cache is kept valid and dropped when its
assumptions break:

* the frozen prefix shrinks (a group is unfrozen); when it grows, the outputs it holds are
  carried through the newly frozen groups on their next use if the module has
  ``advance_prefix`` (the cache deepens), and dropped otherwise,
* the module stops being deterministic (``prefix_is_deterministic()`` turns False,
  e.g. augmentation switched on),
* a frozen weight changes (loaded, or edited in place),
* the device or dtype of the outputs changes.

The fit's coordinator attaches the cache to the module (:meth:`FrozenOutputCache.attach`)
and :meth:`~FrozenOutputCache.prepare` prepares it before each batch; the module's
``training_step`` asks :func:`cached_forward`.

Outputs stay in memory up to ``memory_gb`` and go to files in a temporary folder past it
(``freezeft-frozen-<pid>@<host>-*`` in ``$TMPDIR``), removed when the cache is cleared, when it is
garbage-collected or the process exits (an error, Ctrl+C or SIGTERM through Lightning),
and, for a process killed outright, by the next cache of the machine that spills there.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import tempfile
import weakref
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from freezeft._lightning import rank_zero_warn
from freezeft.files import WriteError, describe_write_error, is_disk_full

__all__ = ["PrefixCachable", "FrozenOutputCache", "cached_forward"]

log = logging.getLogger(__name__)


@runtime_checkable
class PrefixCachable(Protocol):
    """What a LightningModule provides so the outputs of its frozen prefix can be cached.

    Its ``training_step`` (and, to skip the prefix in validation too, its
    ``validation_step``) calls :func:`cached_forward` first and falls back to its usual
    forward when that returns ``None`` (no cache this batch).

    The cache calls ``forward_prefix`` (and ``advance_prefix``) with the module in eval
    mode, so dropout in the frozen groups is off in what it caches; an uncached run keeps
    the module's mode.

    A module may also define ``advance_prefix(outputs, start, stop) -> list[Tensor]``: the
    per-sample outputs of the first ``stop`` groups from those of the first ``start``
    (deterministically). With it, outputs cached before more groups froze are carried
    forward instead of recomputed from the input.
    """

    def sample_keys(self, batch: Any) -> Sequence[Hashable]:
        """One stable key per sample of ``batch`` (e.g. its audio path), which must hold
        everything the prefix's output depends on besides the weights (e.g. the batch's
        drawn speed)."""

    def forward_prefix(self, batch: Any, n_groups: int) -> list[Tensor]:
        """Per-sample outputs of the first ``n_groups`` layer groups, deterministically."""

    def forward_from_prefix(self, outputs: Sequence[Tensor], batch: Any, n_groups: int) -> Any:
        """The rest of the forward pass from per-sample prefix outputs."""

    def prefix_is_deterministic(self) -> bool:
        """False while something random that the keys do not hold changes the prefix's
        output (noise, masks)."""


class FrozenOutputCache:
    """Per-sample outputs of a frozen prefix, valid for one prefix and one set of weights.

    Args:
        memory_gb: outputs kept in memory (on their device) up to this size; more spill
            to ``.pt`` files in a temporary folder under ``spill_dir``.
        spill_dir: where that folder goes (``None``: the system's temporary folder).
    """

    def __init__(self, memory_gb: float = 2.0, spill_dir: str | Path | None = None) -> None:
        if memory_gb < 0:
            raise ValueError(f"Expected `memory_gb` >= 0, but got {memory_gb}.")
        self.memory_bytes = int(memory_gb * 2**30)
        self.spill_root = spill_dir
        self.n_groups = 0
        self.fingerprint: tuple | None = None
        self.memory: dict[Hashable, Tensor] = {}
        self.on_disk: dict[Hashable, Path] = {}
        #: how many groups each held output has been through (less than
        #: :attr:`n_groups` for outputs cached before the prefix grew)
        self.depth: dict[Hashable, int] = {}
        self.bytes_in_memory = 0
        self.hits = 0
        self.misses = 0
        #: hits whose output was carried through newly frozen groups first
        self.advanced = 0
        self.invalidations: list[str] = []
        self._said_augmented = False  # the "cannot cache augmented input" warning, once
        #: Whether :func:`cached_forward` uses the cache for the coming batch (set by
        #: :meth:`prepare` each batch).
        self.active = False
        self._spill: Path | None = None
        self._remove_spill: weakref.finalize | None = None  # at exit or garbage collection
        self._files = 0  # spilled files written (their names)

    def __len__(self) -> int:
        return len(self.memory) + len(self.on_disk)

    # -- validity ------------------------------------------------------------------------
    def prepare(self, module: nn.Module, prefix: Sequence[nn.Parameter], n_groups: int) -> bool:
        """Check the cache still fits ``n_groups`` frozen groups with these weights.

        Returns whether it is usable now; drops stale outputs (with the reason logged).
        """
        self.active = False
        if n_groups == 0:
            self.clear(f"the frozen prefix changed from {self.n_groups} to 0 groups")
            self.n_groups = 0
            return False
        if not module.prefix_is_deterministic():  # type: ignore[attr-defined]
            self.clear("the frozen prefix is not deterministic (augmentation is on)")
            if not self._said_augmented:
                self._said_augmented = True
                rank_zero_warn(
                    "cache_frozen=True: the training input is augmented at random (noise, "
                    "SpecAugment), so the frozen layers' outputs change every epoch and "
                    "cannot be cached; they run forward each step (still without backward). "
                    "A draw that sample_keys() includes (a speed per batch) does not prevent it."
                )
            return False
        fingerprint = _fingerprint(prefix)
        if n_groups != self.n_groups:
            grows = (
                0 < self.n_groups < n_groups
                and callable(getattr(module, "advance_prefix", None))
                and self.fingerprint == fingerprint[: len(self.fingerprint or ())]
            )
            if grows and len(self):
                log.info(
                    f"Frozen-output cache deepens from {self.n_groups} to {n_groups} groups: "
                    f"its {len(self)} outputs go through the new ones on their next use"
                )
            elif not grows:
                self.clear(f"the frozen prefix changed from {self.n_groups} to {n_groups} groups")
        elif fingerprint != self.fingerprint:
            self.clear("a frozen weight changed")
        self.n_groups, self.fingerprint = n_groups, fingerprint
        self.active = True
        return True

    # -- the module it serves ------------------------------------------------------------
    def attach(self, module: nn.Module) -> None:
        """Serve ``module``'s :func:`cached_forward` calls from this cache."""
        _ATTACHED[module] = self

    def detach(self, module: nn.Module) -> None:
        """Stop serving ``module`` and forget every output (at fit end)."""
        if _ATTACHED.get(module) is self:
            del _ATTACHED[module]
        self.clear()

    @staticmethod
    def of(module: nn.Module) -> FrozenOutputCache | None:
        """The cache attached to ``module``, if any."""
        return _ATTACHED.get(module)

    def clear(self, reason: str = "") -> None:
        """Forget every output (``reason`` is logged and kept in :attr:`invalidations`)."""
        if reason and len(self):
            log.info(f"Frozen-output cache cleared ({len(self)} samples): {reason}")
            self.invalidations.append(reason)
        self.memory.clear()
        self.on_disk.clear()
        self.depth.clear()
        self.bytes_in_memory = 0
        if self._remove_spill is not None:
            self._remove_spill()  # removes the folder, once
            self._remove_spill = None
        self._spill = None

    # -- storage -------------------------------------------------------------------------
    def get(self, key: Hashable, device: torch.device) -> Tensor | None:
        if key in self.memory:
            return self.memory[key]
        if key in self.on_disk:
            return torch.load(self.on_disk[key], map_location=device, weights_only=True)
        return None

    def put(self, key: Hashable, output: Tensor) -> None:
        """Hold ``output`` of the first :attr:`n_groups` groups for ``key`` (replacing any)."""
        output = output.detach()
        self.depth[key] = self.n_groups
        old = self.memory.pop(key, None)
        if old is not None:
            self.bytes_in_memory -= old.numel() * old.element_size()
        size = output.numel() * output.element_size()
        if self.bytes_in_memory + size <= self.memory_bytes:
            spilled = self.on_disk.pop(key, None)
            if spilled is not None:  # a deepened output that fits in memory now
                spilled.unlink(missing_ok=True)
            self.memory[key] = output
            self.bytes_in_memory += size
            return
        path = None
        try:
            if self._spill is None:
                self._spill = self._make_spill_folder()
            path = self.on_disk.get(key)
            if path is None:
                self._files += 1
                path = self._spill / f"{self._files}.pt"
            with open(path, "wb") as stream:  # a full disk raises OSError, not torch's
                torch.save(output.cpu().clone(), stream)  # RuntimeError without a reason
        except (OSError, RuntimeError) as err:
            target = path or Path(self.spill_root or tempfile.gettempdir()) / "freezeft-frozen-*"
            self.clear()  # the spill folder goes with it
            if not is_disk_full(err, target.parent):
                raise
            raise WriteError(
                errno.ENOSPC,
                "the frozen-output cache could not spill the outputs past cache_memory_gb to "
                f"disk: {describe_write_error(err, target)} (its folder is removed). Set TMPDIR "
                "to a folder with room (the spill folder goes there), raise the strategy's "
                "cache_memory_gb, or set cache_frozen=False",
                target,
            ) from None
        self.on_disk[key] = path

    def _make_spill_folder(self) -> Path:
        """A fresh spill folder; those of killed processes of this machine there go."""
        root = Path(self.spill_root or tempfile.gettempdir())
        host = socket.gethostname()
        for stale in root.glob(f"freezeft-frozen-*@{host}-*"):  # TMPDIR may be shared
            pid = stale.name[len("freezeft-frozen-") :].split("@")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        prefix = f"freezeft-frozen-{os.getpid()}@{host}-"
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
        self._remove_spill = weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)
        return folder

    def forward(self, module: Any, batch: Any) -> Any:
        """The module's output for ``batch``, its prefix from the cache where it can."""
        # training and evaluation samples apart, whatever the module's keys look like
        mode = "train" if module.training else "eval"
        keys = [(mode, key) for key in module.sample_keys(batch)]
        device = module.device
        outputs = [self.get(key, device) for key in keys]
        missing = {i for i, out in enumerate(outputs) if out is None}
        if missing:
            with torch.no_grad(), _evaluating(module):
                fresh = module.forward_prefix(batch, self.n_groups)
            for i in sorted(missing):
                outputs[i] = fresh[i]
                self.put(keys[i], fresh[i])
        # outputs cached before the prefix grew: through the newly frozen groups, once
        for depth in sorted({self.depth[key] for key in keys} - {self.n_groups}):
            behind = [i for i, key in enumerate(keys) if self.depth[key] == depth]
            with torch.no_grad(), _evaluating(module):
                deeper = module.advance_prefix([outputs[i] for i in behind], depth, self.n_groups)
            for i, output in zip(behind, deeper, strict=True):
                outputs[i] = output
                self.put(keys[i], output)
            self.advanced += len(behind)
        if len({(out.dtype, out.device.type) for out in outputs}) > 1:
            # cached outputs from another device or precision than the fresh ones: start again
            self.clear("the outputs' device or dtype changed")
            with torch.no_grad(), _evaluating(module):
                outputs = module.forward_prefix(batch, self.n_groups)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        return module.forward_from_prefix(outputs, batch, self.n_groups)


#: Module -> the cache serving it; weak keys, so no attribute is set on the user's module.
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, FrozenOutputCache] = weakref.WeakKeyDictionary()


@contextmanager
def _evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode (dropout off), every submodule's own mode restored after: a
    cached output must be the same each time it could have been computed."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _fingerprint(params: Sequence[nn.Parameter]) -> tuple:
    # in-place edits bump a tensor's version counter; loading new tensors changes the pointer
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)


def cached_forward(module: Any, batch: Any) -> Any | None:
    """The module's forward through its frozen-output cache, or ``None`` when no strategy
    caches this batch (the module then runs its usual forward). Training batches and the
    fit's validation batches are served; nothing outside a fit is."""
    cache = FrozenOutputCache.of(module)
    if cache is None or not cache.active:
        return None
    return cache.forward(module, batch)
