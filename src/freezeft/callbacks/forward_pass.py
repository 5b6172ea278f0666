"""One forward pass on real data at fit start, leaving nothing behind.

Layer-group discovery watches it to order a module whose parameterised children are
called one after another (torchaudio's ``DeepSpeech``: see :mod:`freezeft.groups`). Only
a module that needs it runs it, once per fit, before the plan is made:

* the LightningModule's ``example_input_array`` through its ``forward``, as Lightning's
  model summary runs it; else
* one batch of the training data (the train dataloader asked once more) through
  ``training_step``, stopped as soon as the module being ordered has returned, so the
  loss, ``self.log`` and any optimizer call after it never run.

Either runs without gradients, every module in eval mode (no norm statistics move, no
dropout), ``self.log`` silenced, ``self.optimizers()``/``self.lr_schedulers()`` and
``manual_backward`` inert (manual optimization steps nothing), and every random state
(Python, numpy, torch, CUDA and the dataloader's own generators), buffer and
``requires_grad`` flag put back: the fit that follows is the one it would have been
without it. (What your code keeps in plain Python attributes, a counter it adds to in
``forward``, it adds to once more; pass ``groups=`` and no pass runs.)
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy
import torch
from torch.utils._pytree import tree_flatten

from freezeft._lightning import pl
from freezeft.groups import ForwardPass
from freezeft.sharding import engine_of, fsdp2_units

__all__ = ["forward_passes"]


def forward_passes(trainer: Any, pl_module: Any) -> list[ForwardPass]:
    """The forward passes discovery may watch in this fit, in the order to try them (none
    under a sharding engine, whose forward needs every rank and must not stop halfway)."""
    if engine_of(trainer.strategy) == "fsdp1" or fsdp2_units(pl_module):
        return []
    passes = []
    if getattr(pl_module, "example_input_array", None) is not None:
        passes.append(
            ForwardPass("the module's example_input_array", lambda: _run_example(pl_module))
        )
    passes.append(
        ForwardPass(
            "one training batch (training_step at fit start)",
            lambda: _run_training_batch(trainer, pl_module),
        )
    )
    return passes


def _device(pl_module: Any) -> torch.device:
    param = next(pl_module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _run_example(pl_module: Any) -> None:
    trainer = pl_module.trainer
    example = pl_module._on_before_batch_transfer(pl_module.example_input_array)
    example = pl_module._apply_batch_transfer_handler(example, device=_device(pl_module))
    with _untouched(pl_module, None), trainer.precision_plugin.forward_context():
        if isinstance(example, (list, tuple)):
            pl_module(*example)
        elif isinstance(example, dict):
            pl_module(**example)
        else:
            pl_module(example)


def _run_training_batch(trainer: Any, pl_module: Any) -> None:
    loaders = trainer.fit_loop._data_source.dataloader()
    with _untouched(pl_module, loaders):
        combined = pl.utilities.CombinedLoader(loaders, "max_size_cycle")
        batch, _, _ = next(iter(combined))  # its workers end with the iterator
        batch = trainer.precision_plugin.convert_input(batch)
        batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
        batch = trainer.strategy.batch_to_device(batch, device=_device(pl_module))
        with trainer.precision_plugin.train_step_context():
            pl_module.training_step(batch, 0)


def _generators(loaders: Any) -> list[torch.Generator]:
    """The random generators a dataloader (or a collection of them) draws from."""
    found: list[torch.Generator] = []
    for loader in tree_flatten(loaders)[0]:
        sampler = getattr(loader, "sampler", None)
        batch_sampler = getattr(loader, "batch_sampler", None)
        for owner in (loader, sampler, batch_sampler, getattr(batch_sampler, "sampler", None)):
            generator = getattr(owner, "generator", None)
            if isinstance(generator, torch.Generator) and generator not in found:
                found.append(generator)
    return found


@contextlib.contextmanager
def _untouched(pl_module: Any, loaders: Any) -> Iterator[None]:
    """No gradients, eval mode, ``self.log`` silenced; random states, modes and
    ``requires_grad`` flags as they were afterwards."""
    modes = [(module, module.training) for module in pl_module.modules()]
    flags = [(param, param.requires_grad) for param in pl_module.parameters()]
    buffers = [(buffer, buffer.clone()) for buffer in pl_module.buffers()]
    generators = [(g, g.get_state()) for g in _generators(loaders)]
    stand_ins = _stand_ins(pl_module)
    silenced = [name for name in stand_ins if name not in vars(pl_module)]
    for name in silenced:
        setattr(pl_module, name, stand_ins[name])
    states = _random_states()
    try:
        with torch.no_grad():
            pl_module.eval()
            yield
    finally:
        _set_random_states(states)
        for name in silenced:
            vars(pl_module).pop(name, None)
        for buffer, value in buffers:  # a step counter, an EMA the module keeps by hand
            buffer.copy_(value)
        for module, training in modes:
            module.training = training
        for param, flag in flags:
            param.requires_grad_(flag)
        for generator, state in generators:
            generator.set_state(state)


def _random_states() -> tuple[Any, ...]:
    """Python's, numpy's, torch's and (where started) CUDA's random states."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return random.getstate(), numpy.random.get_state(), torch.get_rng_state(), cuda


def _set_random_states(states: tuple[Any, ...]) -> None:
    python, numpy_state, torch_state, cuda = states
    random.setstate(python)
    numpy.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _ignore(*args: Any, **kwargs: Any) -> None:
    """``self.log`` (and the other stand-ins) during the watched pass: nothing happens."""


class _InertOptimizer:
    """What ``self.optimizers()`` and ``self.lr_schedulers()`` give during the watched
    pass: ``zero_grad()``, ``step()`` and every other call do nothing."""

    param_groups: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return _ignore


def _stand_ins(pl_module: Any) -> dict[str, Any]:
    """The LightningModule methods that, during the watched pass, must not log, step an
    optimizer or scheduler, or run a backward (manual optimization): their stand-ins."""
    trainer = getattr(pl_module, "_trainer", None)
    n_optimizers = len(getattr(trainer, "optimizers", None) or []) or 1  # none yet: DDP setup
    n_schedulers = len(getattr(trainer, "lr_scheduler_configs", None) or [])

    def several(n: int) -> Callable[..., Any]:
        inert = [_InertOptimizer() for _ in range(n)]
        return lambda *args, **kwargs: inert[0] if len(inert) == 1 else inert

    return {
        "log": _ignore,
        "log_dict": _ignore,
        "manual_backward": _ignore,
        "toggle_optimizer": _ignore,
        "untoggle_optimizer": _ignore,
        "clip_gradients": _ignore,
        "optimizers": several(n_optimizers),
        "lr_schedulers": several(n_schedulers or 1),
    }
