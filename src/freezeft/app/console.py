"""A quiet console for app runs: known, harmless third-party noise left out, warnings as
one line each on stderr (and in ``run.log``), and log lines that never land inside a
progress bar."""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

__all__ = ["quiet_console"]

#: Lightning's and torch's messages that say nothing about the user's run
_NOISE = (
    "Tip: For seamless cloud logging",  # Lightning's advertisement for its platform
    "GPU available:",
    "TPU available:",
    "HPU available:",
    # which checkpoint is read: the app says it in its own words (resuming, testing)
    "Restoring states from the checkpoint path at",
    "Loaded model weights from the checkpoint at",
    "`weights_only` was not set",  # the app reads every checkpoint weights-only first
    "Seed set to",  # results.json and the run's config have the seed
)
#: warnings known to be harmless here: (message regex, module regex)
_HARMLESS_WARNINGS = [
    # Lightning 2.6 on torch >= 2.10: its own pytree helper uses a deprecated torch check
    (r".*isinstance\(treespec, LeafSpec\)", ""),
    # the app loads every checkpoint weights-only itself, before Lightning reads it
    (r".*weights_only", r"(lightning_fabric|pytorch_lightning|lightning)\..*"),
    # the app's loaders are sized on purpose (num_workers=auto)
    (r".*does not have many workers", ""),
    # a resumed run writes into its own checkpoints/ again, on purpose
    (r"Checkpoint directory .* exists and is not empty", ""),
    # the report's plots: matplotlib's layout hint on small figures
    (r"Tight layout not applied", ""),
]


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in _NOISE)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """A warning as one line on stderr (not the file and source line it came from), and
    in the run's ``run.log``."""
    text = f"{category.__name__}: {message}"
    print(text, file=file or sys.stderr, flush=True)
    record = logging.LogRecord("py.warnings", logging.WARNING, filename, lineno, text, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


class _AboveProgressBars(logging.Handler):
    """A console handler that writes through ``tqdm.write``: the line goes above any
    progress bar instead of into it."""

    def __init__(self, inner: logging.StreamHandler) -> None:  # type: ignore[type-arg]
        super().__init__(inner.level)
        self.inner = inner
        self.setFormatter(inner.formatter)
        for keep in inner.filters:
            self.addFilter(keep)

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.inner.stream)
        except Exception:  # noqa: BLE001 - logging must not fail a run
            self.handleError(record)


def quiet_console() -> None:
    """Apply to the logging Hydra configured for this run (call it first in the job)."""
    for message, module in _HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
    warnings.showwarning = _show_warning
    root = logging.getLogger()
    for index, handler in enumerate(root.handlers):
        if type(handler) is logging.StreamHandler:
            handler = root.handlers[index] = _AboveProgressBars(handler)
        if not any(isinstance(f, _DropNoise) for f in handler.filters):
            handler.addFilter(_DropNoise())
