"""Metric names checked before training is spent: every metric the run watches (the
best checkpoint's ``monitor``, early stopping, a strategy's plateau, a plateau scheduler)
must be one the module logs."""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from freezeft._lightning import CALLBACK_BASES, pl

__all__ = ["WatchedMetricsCheck"]


class WatchedMetricsCheck(*CALLBACK_BASES):  # type: ignore[misc]
    """Refuse a run whose watched metrics are not logged, naming the keys it does log.

    Validation metrics are checked after Lightning's sanity-check validation (a batch or
    two, before any training); a watched metric that is not a validation metric, or a run
    without a sanity check (``trainer.num_sanity_val_steps=0``), is checked when the first
    training epoch ends. A plain Lightning run would train a whole epoch and then stop in
    ModelCheckpoint or EarlyStopping's words, or never pick a best checkpoint at all.

    Args:
        monitor: the run's ``monitor`` key (what picks the best checkpoint).
    """

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self._pending: dict[str, str] = {}
        self._sanity_checked = False

    def _watched(self, trainer: pl.Trainer) -> dict[str, str]:
        """Metric -> who watches it."""
        watched = {self.monitor: "monitor"}
        for callback in trainer.callbacks:
            key = getattr(callback, "monitor", None)
            if isinstance(key, str) and key and callback is not self:
                watched.setdefault(key, f"{type(callback).__name__}(monitor=...)")
        for config in getattr(trainer, "lr_scheduler_configs", None) or []:
            if config.reduce_on_plateau and config.monitor:
                watched.setdefault(
                    config.monitor, f"{type(config.scheduler).__name__}'s monitor (the model's)"
                )
        return watched

    @override
    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logged = set(trainer.callback_metrics)
        missing = {k: w for k, w in self._watched(trainer).items() if k not in logged}
        now = {k: w for k, w in missing.items() if _is_validation(k)}
        self._refuse(now, logged, "the sanity-check validation")
        self._pending = {k: w for k, w in missing.items() if k not in now}
        self._sanity_checked = True

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._sanity_checked:  # trainer.num_sanity_val_steps=0, or no validation
            self._pending = self._watched(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # without a sanity check: the first validation, before ModelCheckpoint (which runs
        # after every other callback) saves on a metric that is not there
        if trainer.sanity_checking or not self._pending:
            return
        logged = set(trainer.callback_metrics)
        now = {k: w for k, w in self._pending.items() if _is_validation(k) and k not in logged}
        self._refuse(now, logged, "the first validation")
        self._pending = {k: w for k, w in self._pending.items() if not _is_validation(k)}

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pending = {k: w for k, w in self._pending.items() if not _is_validation(k)}
        if pending:
            logged = set(trainer.callback_metrics)
            self._refuse(
                {k: w for k, w in pending.items() if k not in logged},
                logged,
                "the first training epoch",
            )
        self._pending = {k: w for k, w in self._pending.items() if _is_validation(k)}

    @staticmethod
    def _refuse(missing: dict[str, str], logged: set[str], when: str) -> None:
        if not missing:
            return
        names = ", ".join(f"`{k}` ({w})" for k, w in missing.items())
        shown = ", ".join(sorted(logged)) or "none"
        raise ValueError(
            f"The run watches {names}, which the model does not log: after {when} it had "
            f"logged {shown}. Set monitor= (and monitor_mode=) to one of those, or log the "
            "metric in the LightningModule (self.log(...) in validation_step)."
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {}


def _is_validation(key: str) -> bool:
    """A metric a validation logs, by Lightning's naming habits (val_loss, valid/acc)."""
    return key.startswith(("val", "dev"))
