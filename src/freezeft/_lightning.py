"""The Lightning package freezeft runs with: ``pytorch_lightning`` or ``lightning.pytorch``.

freezeft depends on ``pytorch-lightning`` (which ``lightning`` 2.6 requires too) and imports
``pytorch_lightning`` first, ``lightning.pytorch`` where only that one loads. The
strategies are callbacks of every installed package (:data:`CALLBACK_BASES`), so both
Trainers take them; the app builds its Trainer from the package of the user's module
(:func:`package_of`).
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

__all__ = [
    "pl",
    "PACKAGE",
    "CALLBACK_BASES",
    "rank_zero_info",
    "rank_zero_warn",
    "SIGTERM_EXCEPTIONS",
    "MONITORING_CALLBACKS",
    "MISCONFIGURATION_EXCEPTIONS",
    "package_of",
    "fabric_of",
]

PACKAGES = ("pytorch_lightning", "lightning.pytorch")

INSTALL_HINT = (
    "freezeft needs PyTorch Lightning 2.6 or newer: `pip install lightning` or "
    "`pip install pytorch-lightning` (freezeft works with modules of either package)."
)


def _available() -> list[ModuleType]:
    found = []
    for name in PACKAGES:
        try:
            found.append(importlib.import_module(name))
        except ImportError:  # not installed, or a partial install: use the other one
            continue
    if not found:
        raise ImportError(INSTALL_HINT)
    return found


_FOUND = _available()
#: The package freezeft's own code uses (``pytorch_lightning`` where both are installed).
pl: ModuleType = _FOUND[0]
PACKAGE: str = pl.__name__
# Both packages point lightning_utilities' shared rank-zero logger at their own on import;
# the one imported last wins. Keep it on the package freezeft speaks through, so its
# messages go where they went before the other package was imported (a run's log).
importlib.import_module("lightning_utilities.core.rank_zero").log = logging.getLogger(
    f"{PACKAGE}.utilities.rank_zero"
)
#: ``Callback`` of every installed Lightning package: the strategies subclass all of them.
CALLBACK_BASES: tuple[type, ...] = tuple(package.Callback for package in _FOUND)

rank_zero_info = pl.utilities.rank_zero_info
rank_zero_warn = pl.utilities.rank_zero_warn
#: Lightning's ``SIGTERMException`` of every installed package (a Trainer raises its own).
SIGTERM_EXCEPTIONS: tuple[type[BaseException], ...] = tuple(
    importlib.import_module(f"{package.__name__}.utilities.exceptions").SIGTERMException
    for package in _FOUND
)


#: ``ModelCheckpoint`` and ``EarlyStopping`` of every installed package, in that order.
MONITORING_CALLBACKS: tuple[tuple[type, ...], ...] = (
    tuple(package.callbacks.ModelCheckpoint for package in _FOUND),
    tuple(package.callbacks.EarlyStopping for package in _FOUND),
)


#: Lightning's ``MisconfigurationException`` of every installed package.
MISCONFIGURATION_EXCEPTIONS: tuple[type[BaseException], ...] = tuple(
    importlib.import_module(f"{package.__name__}.utilities.exceptions").MisconfigurationException
    for package in _FOUND
)


def package_of(module: object) -> str:
    """The Lightning package a LightningModule (or Trainer) belongs to, by its class."""
    for cls in type(module).__mro__:
        for name in PACKAGES:
            if cls.__module__ == name or cls.__module__.startswith(name + "."):
                return name
    return PACKAGE


def fabric_of(package: str) -> ModuleType:
    """``lightning_fabric`` for ``pytorch_lightning``, ``lightning.fabric`` for ``lightning``."""
    return importlib.import_module(
        "lightning_fabric" if package == PACKAGES[0] else "lightning.fabric"
    )
