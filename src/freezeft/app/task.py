"""What the app (``python -m freezeft.run``) asks of a task, and what it does without.

A task is a LightningModule (``model``) and a LightningDataModule (``data``) named by
``_target_`` in their configs. A plain pair that declares nothing runs: the best
checkpoint is picked by ``monitor``/``monitor_mode`` of the config, ``transfer.source``
loads tensors by name and shape (:func:`freezeft.transfer.load_matching`), and
``results.json`` holds whatever the module logged in ``test_step``. A task may declare
more, each hook optional (the speech task, :mod:`freezeft.speech`, declares them all):

On the data module:
    ``model_kwargs() -> dict``: arguments the model needs from the data (its labels).
    ``skipped_rows() -> list[(split, row)]``: rows left out (``row.source/path/kind/detail``).
    ``describe() -> dict``: what ``results.json`` records of the data (sizes, language).

On the LightningModule:
    ``check_transfer(**options)`` (static): check ``transfer.*`` before any work.
    ``transfer_from(source, **options) -> report``: its own transfer (``report.to_json``,
    ``report.summary``); ``transfer.*`` but ``source`` are the options.
    ``test_results(metrics) -> dict``: ``results.json`` entries from ``trainer.test``'s
    metrics (a ``headline`` entry ends the run's output).
    ``report_spec``: a dict ``{"rank_by": key, "mode": "min"|"max", "columns": {key:
    label}, "split_by": [key, ...]}`` telling the report which result ranks the runs.
    ``skipped_samples()``, ``describe()``: as the data module's.

This module imports nothing but the standard library: the app calls these helpers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from freezeft.text import is_number

__all__ = [
    "model_kwargs",
    "check_transfer",
    "transfer",
    "test_results",
    "report_spec",
    "skipped",
    "describe",
    "dev_key",
    "test_counterpart",
]


def model_kwargs(data: Any) -> dict[str, Any]:
    """The data's ``model_kwargs()``, or none."""
    hook = getattr(data, "model_kwargs", None)
    return dict(hook()) if callable(hook) else {}


def check_transfer(model_class: type, options: dict[str, Any]) -> None:
    """The task's ``check_transfer``; without one, by-name transfer takes no options.

    Raises:
        ValueError: an option the task does not take, or a bad value.
    """
    hook = getattr(model_class, "check_transfer", None)
    if callable(hook):
        hook(**options)
    elif options:
        raise ValueError(
            f"{model_class.__name__} declares no transfer of its own, so `transfer` takes "
            f"only `source` (tensors load by name and shape), but got "
            f"{', '.join(f'transfer.{k}' for k in options)}. Drop them (`~transfer.KEY`) or "
            "give the module a transfer_from(source, **options) method."
        )


def transfer(module: Any, source: Path, options: dict[str, Any]) -> Any:
    """Load ``source`` into ``module``: its ``transfer_from``, else by name and shape."""
    hook = getattr(module, "transfer_from", None)
    if callable(hook):
        return hook(source, **options)
    from freezeft.transfer import load_matching

    return load_matching(module, source)


def test_results(module: Any, metrics: dict[str, float]) -> dict[str, Any]:
    """The task's ``test_results``, else the test metrics as logged (``test_acc``...)."""
    hook = getattr(module, "test_results", None)
    if callable(hook):
        return dict(hook(metrics))
    results: dict[str, Any] = {key: float(value) for key, value in metrics.items()}
    shown = ", ".join(f"{key} {value:.4f}" for key, value in results.items())
    results["headline"] = shown or "no test metrics logged"
    return results


def report_spec(module: Any, monitor: str, mode: str, results: dict[str, Any]) -> dict[str, Any]:
    """How the report ranks and shows runs: the task's ``report_spec``, else by the
    monitored metric's test counterpart (``val_acc`` -> ``test_acc``) in ``mode``'s
    direction, every logged test metric a column."""
    declared = getattr(module, "report_spec", None)
    if isinstance(declared, dict):
        return {"split_by": [], **declared}
    counterpart = test_counterpart(monitor)
    tested = [k for k, v in results.items() if k.startswith(("test_", "test/")) and is_number(v)]
    if counterpart not in tested:
        counterpart = monitor if monitor in tested else (tested[0] if tested else counterpart)
    return {
        "rank_by": counterpart,
        "mode": mode,
        "columns": {key: key for key in tested},
        "split_by": [],
    }


def _stage_split(monitor: str) -> tuple[str, str]:
    """``(separator, name)`` of a validation metric: ``val_acc`` and ``val/acc`` -> acc."""
    for separator in ("_", "/"):
        if monitor.startswith(f"val{separator}"):
            return separator, monitor[4:]
    return "_", monitor


def test_counterpart(monitor: str) -> str:
    """The test metric of a validation metric: ``val_acc`` -> ``test_acc``, ``val/acc`` ->
    ``test/acc``."""
    separator, name = _stage_split(monitor)
    return f"test{separator}{name}"


def dev_key(monitor: str) -> str:
    """The ``results.json`` key of the best dev value: ``val_cer`` -> ``dev_cer``."""
    return "dev_" + _stage_split(monitor)[1].replace("/", "_")


def skipped(data: Any, module: Any) -> list[tuple[str, Any]]:
    """Rows the data and samples the module left out, if they say."""
    rows: list[tuple[str, Any]] = []
    for owner, name in ((data, "skipped_rows"), (module, "skipped_samples")):
        hook = getattr(owner, name, None)
        if callable(hook):
            rows += list(hook())
    return rows


def describe(data: Any, module: Any) -> dict[str, Any]:
    """What the data and the module say of themselves for ``results.json``."""
    described: dict[str, Any] = {}
    for owner in (data, module):
        hook = getattr(owner, "describe", None)
        if callable(hook):
            described.update(hook())
    return described
