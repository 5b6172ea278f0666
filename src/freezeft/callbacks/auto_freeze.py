"""AutoFreeze: freeze layer groups from the input side once training has stopped paying.

Two tests decide, and both must hold:

- **The model**: the monitored dev metric (the Trainer's checkpoint or early-stopping
  ``monitor``, or ``monitor=``) has reached a plateau: ``plateau_patience`` validations in
  a row that did not improve on the best so far. Before that, nothing freezes; on it, at
  most ``pace`` groups freeze between two validations; a new best ends it, and freezing
  waits for the next plateau (the layers still pay). All three are counted in validations,
  so the schedule does not depend on the number of steps per epoch, the data size or the
  LR schedule.
- **The group** (after AutoFreeze, Liu, Agarwal and Venkataraman, 2021): every
  ``check_every_n_steps`` optimizer steps, each trainable group's mean gradient norm over
  those steps is compared with the previous window's; the candidate's relative change
  ``rate = |norm_now - norm_before| / norm_before`` must have stayed below ``threshold``
  for ``patience`` windows in a row.

Only the first trainable group from the input side is a candidate (so no group ever trains
behind a frozen one), never a head group. Frozen groups get no backward pass, and with
``cache_frozen=True`` on a :class:`~freezeft.frozen_cache.PrefixCachable` module no forward
pass either once their outputs are cached: the cache deepens as groups freeze.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from typing_extensions import override

from freezeft._lightning import MONITORING_CALLBACKS, pl, rank_zero_info, rank_zero_warn
from freezeft.callbacks.base import expect_bool, expect_int, improves
from freezeft.callbacks.frozen_encoder import FrozenEncoder, HeadSpec
from freezeft.groups import GroupSpec, LayerGroup

__all__ = ["AutoFreeze"]


class AutoFreeze(FrozenEncoder):
    """Freeze groups input side first while the dev metric is on a plateau and the group's
    gradient norm has settled; everything else trains.

    Decisions (group, epoch, step, rate) are logged, kept in :attr:`decisions` (a run's
    ``history.json`` lists them) and saved in checkpoints with the running statistics, so a
    resumed run decides exactly as an uninterrupted one. Under DDP the statistics are
    averaged over ranks before each decision, so every rank freezes the same group at the
    same step; give the Trainer ``strategy="ddp_find_unused_parameters_true"``, since
    parameters DDP's reducer owns stop getting gradients.

    Args:
        head: groups from the top (or their names) that always train.
        threshold: freeze a group when its gradient-norm change rate between two windows
            is below this.
        check_every_n_steps: optimizer steps per window (one decision per window).
        patience: windows in a row the rate must stay below ``threshold`` (one window's
            rate is noisy with small batches).
        min_epochs: no group freezes before this epoch (the head's first epochs, when a
            re-initialised head sends large, changing gradients into the encoder).
        after_plateau: freeze only while the dev metric is on a plateau, ``pace`` groups
            per validation (``False``: on the gradient test alone, as the paper does).
        plateau_patience: validations in a row that do not improve on the best that make
            a plateau (like ``EarlyStopping``'s ``patience``; 3 keeps naive's accuracy where
            dev still improves late; 1 freezes sooner and saves more, at a risk).
        monitor: the logged dev metric whose plateau allows freezing (``None``: the
            Trainer's ``ModelCheckpoint`` or ``EarlyStopping`` monitor; if there is none,
            groups freeze on the gradient test alone, with a warning).
        mode: ``"min"`` or ``"max"``: which direction of ``monitor`` is better (``None``:
            the mode of the ``ModelCheckpoint`` or ``EarlyStopping`` that watches the same
            metric, else ``"min"``: give ``mode="max"`` for an accuracy).
        pace: at most this many groups freeze between two validations (``None``: no limit;
            without a monitor there is no limit).
        strict: a watched metric missing from the fit's first validation is an error (a
            typo caught early, as Lightning's ``EarlyStopping(strict=True)``); ``False``:
            validations that do not log it just do not count (a metric logged from a later
            epoch on).
        groups: layer-group patterns, input to output.
        bn: ``"frozen"`` keeps frozen groups' norm layers in eval mode; ``"train"`` does not.
        cache_frozen: train from cached outputs of the frozen prefix (deeper as more groups
            freeze); needs a :class:`~freezeft.frozen_cache.PrefixCachable` module and
            un-augmented inputs.
        cache_memory_gb: cached outputs kept in memory; more go to temporary files.

    Raises:
        ValueError: ``threshold`` not positive, ``check_every_n_steps`` < 1,
            ``min_epochs`` < 0, ``pace`` or ``plateau_patience`` < 1, a ``mode`` other than
            min/max or a bad ``head``;
            at the first validation, a ``monitor`` that was not logged (``strict=True``).

    Example::

        trainer = Trainer(callbacks=[AutoFreeze(head=1, monitor="val_loss")])
    """

    decides_during_fit: ClassVar[bool] = True

    def __init__(
        self,
        head: HeadSpec = 1,
        threshold: float = 0.1,
        check_every_n_steps: int = 50,
        patience: int = 2,
        min_epochs: int = 1,
        after_plateau: bool = True,
        plateau_patience: int = 3,
        monitor: str | None = None,
        mode: str | None = None,
        pace: int | None = 1,
        strict: bool = True,
        groups: Sequence[GroupSpec] | None = None,
        bn: str = "frozen",
        cache_frozen: bool = False,
        cache_memory_gb: float = 2.0,
    ) -> None:
        super().__init__(head, groups, bn, cache_frozen, cache_memory_gb)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise ValueError(f"AutoFreeze: expected a number `threshold`, but got {threshold!r}.")
        if not threshold > 0:
            raise ValueError(f"AutoFreeze: expected `threshold` > 0, but got {threshold}.")
        self.threshold = float(threshold)
        self.check_every_n_steps = expect_int(self, "check_every_n_steps", check_every_n_steps, 1)
        self.patience = expect_int(self, "patience", patience, 1)
        self.min_epochs = expect_int(self, "min_epochs", min_epochs, 0)
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(
                f"AutoFreeze: expected `monitor` to be a metric name, but got {monitor!r}."
            )
        if mode not in (None, "min", "max"):
            raise ValueError(f"AutoFreeze: expected `mode` 'min' or 'max', but got {mode!r}.")
        self.after_plateau = expect_bool(self, "after_plateau", after_plateau)
        self.plateau_patience = expect_int(self, "plateau_patience", plateau_patience, 1)
        self.monitor, self.mode = monitor, mode
        if pace is not None and (isinstance(pace, bool) or not isinstance(pace, int) or pace < 1):
            raise ValueError(
                f"AutoFreeze: expected `pace` an integer >= 1 (None: no limit), but got {pace!r}."
            )
        self.pace = pace
        self.strict = expect_bool(self, "strict", strict)
        #: groups frozen so far, counted from the input side
        self.n_frozen = 0
        #: one dict per decision: group, epoch, step, rate, norms
        self.decisions: list[dict[str, Any]] = []
        self._window = torch.zeros(0, dtype=torch.float64)  # summed grad norms per group
        self._steps = 0  # optimizer steps in the current window
        self._calm = 0  # windows in a row the candidate's rate was below the threshold
        #: one dict per window: step, epoch and each group's mean gradient norm (None: frozen)
        self.windows: list[dict[str, Any]] = []
        #: one dict per validation: epoch and the monitored value
        self.validations: list[dict[str, Any]] = []
        #: the epoch of the validation that began the current plateau (None: not on one)
        self.plateau_epoch: int | None = None
        self._watching: tuple[str, str] | None = None  # (monitor, mode) this fit follows
        self._freezes_since_validation = 0
        self._stale: Any = None  # the monitor's value before this validation
        self._warned_nan = False

    @override
    def check(self, groups: Sequence[LayerGroup]) -> None:
        super().check(groups)
        if len(self._window) != len(groups):
            self._window = torch.zeros(len(groups), dtype=torch.float64)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        ddp_options = getattr(trainer.strategy, "_ddp_kwargs", None)
        if stage == "fit" and trainer.world_size > 1 and ddp_options is not None:
            if not ddp_options.get("find_unused_parameters"):
                raise ValueError(
                    "AutoFreeze freezes layer groups mid-run, and DDP's reducer then waits "
                    "forever for gradients those parameters no longer get. Give the Trainer "
                    "strategy='ddp_find_unused_parameters_true' (or DDPStrategy("
                    "find_unused_parameters=True))."
                )
        if stage == "fit":  # a new fit starts unfrozen (a resumed one loads its state after this)
            self.n_frozen, self.decisions, self.windows = 0, [], []
            self._window.zero_()
            self._steps, self._calm = 0, 0
            self.validations, self.plateau_epoch, self._freezes_since_validation = [], None, 0
            self._warned_nan = False
            self._watching = self._find_monitor(trainer) if self.after_plateau else None
            if not self.after_plateau and (self.monitor or self.mode):
                rank_zero_warn(
                    "AutoFreeze: `monitor`/`mode` are not used with after_plateau=False (groups "
                    "freeze on the gradient test alone); drop them, or set after_plateau=True."
                )
            if self._watching is not None:
                self._check_early_stopping(trainer)
            if self.after_plateau and self._watching is None:
                rank_zero_warn(
                    "AutoFreeze: no dev metric to watch (no `monitor=` and no ModelCheckpoint or "
                    "EarlyStopping with a monitor), so groups freeze on the gradient test alone, "
                    "which can freeze layers that still improve the model. Give "
                    "AutoFreeze(monitor='val_loss') (or your validation metric), or "
                    "after_plateau=False to say that is what you want."
                )
        super().setup(trainer, pl_module, stage)

    def _find_monitor(self, trainer: pl.Trainer) -> tuple[str, str] | None:
        """The metric and mode to follow: ``monitor=``, else the first ``ModelCheckpoint``'s,
        else the first ``EarlyStopping``'s; the mode, unless given, is that of a callback
        watching the same metric (else ``"min"``)."""
        watchers = [
            callback
            for kind in MONITORING_CALLBACKS  # checkpoints first, then early stopping
            for callback in trainer.callbacks
            if isinstance(callback, kind) and getattr(callback, "monitor", None)
        ]
        monitor = self.monitor or (watchers[0].monitor if watchers else None)
        if monitor is None:
            return None
        same = [c for c in watchers if c.monitor == monitor]
        return monitor, self.mode or (getattr(same[0], "mode", "min") if same else "min")

    def _check_early_stopping(self, trainer: pl.Trainer) -> None:
        """Warn when early stopping on the watched metric ends the run no later than the
        validation that would begin a plateau: then nothing can ever freeze."""
        assert self._watching is not None
        for callback in trainer.callbacks:
            if (
                isinstance(callback, MONITORING_CALLBACKS[1])
                and callback.monitor == self._watching[0]
                and callback.patience <= self.plateau_patience
            ):
                rank_zero_warn(
                    f"AutoFreeze: EarlyStopping(patience={callback.patience}) on "
                    f"{callback.monitor!r} ends the run by the validation that would begin "
                    f"AutoFreeze's plateau (plateau_patience={self.plateau_patience}), so "
                    "nothing can freeze. Give EarlyStopping a larger patience, or AutoFreeze "
                    "a smaller plateau_patience."
                )

    # -- the model's test: the dev metric's plateau -------------------------------------
    def _follows(self, trainer: pl.Trainer) -> bool:
        """Whether this validation is one of the fit's own (not a sanity check, not a
        ``trainer.validate`` after fit)."""
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking
        return fitting and self._watching is not None and self.plan is not None

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._follows(trainer):  # what a validation that does not log the metric leaves
            self._stale = trainer.callback_metrics.get(self._watching[0])

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._follows(trainer):
            return
        monitor, mode = self._watching
        value = trainer.callback_metrics.get(monitor)
        if value is None and not self.validations and self.strict:
            raise ValueError(
                f"AutoFreeze: the dev metric it watches, {monitor!r}, was not logged at the "
                f"fit's first validation (epoch {trainer.current_epoch}); logged metrics are "
                f"{sorted(trainer.callback_metrics)}. Give AutoFreeze(monitor=...) a metric "
                "your validation_step logs, or AutoFreeze(strict=False) if it logs it only "
                "from a later validation on."
            )
        # Not logged in this validation: the value is the last one's, and no new evidence.
        fresh = None if value is None or value is self._stale else float(value)
        fresh = trainer.strategy.broadcast(fresh, src=0)  # rank 0's: one decision for all
        self._stale = None
        if fresh is None:
            return
        value = float(fresh)
        if math.isnan(value) and not self._warned_nan:
            self._warned_nan = True
            rank_zero_warn(
                f"AutoFreeze: the dev metric it watches, {monitor!r}, is NaN at epoch "
                f"{trainer.current_epoch}: a NaN never improves, so it counts toward a plateau "
                "once there is a best value."
            )
        self._freezes_since_validation = 0
        self.validations.append({"epoch": trainer.current_epoch, "value": value})
        best, since = None, 0  # the best value so far, and the validations since it
        for seen in (v["value"] for v in self.validations):
            if improves(seen, best, mode):
                best, since = seen, 0
            elif best is not None:
                since += 1
        if since >= self.plateau_patience and self.plateau_epoch is None:
            self.plateau_epoch = trainer.current_epoch
            pace = "as they settle" if self.pace is None else f"at most {self.pace} per validation"
            rank_zero_info(
                f"AutoFreeze: epoch {trainer.current_epoch}: {monitor} has not improved on its "
                f"best, {best:.4g} ({mode}), for {since} validation{'s' if since > 1 else ''}: "
                f"until it does, groups whose gradient norm has settled freeze, {pace}"
            )
        elif since == 0 and self.plateau_epoch is not None:
            self.plateau_epoch = None  # the layers still pay: freezing waits for a new plateau
            rank_zero_info(
                f"AutoFreeze: epoch {trainer.current_epoch}: {monitor} improved to {best:.4g}: "
                f"no more groups freeze until it has not improved for {self.plateau_patience} "
                f"validation{'s' if self.plateau_patience > 1 else ''} again"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batches = trainer.num_training_batches
        if self.plan is None or not isinstance(batches, int) or batches <= 0:
            return
        steps = max(1, math.ceil(batches / max(1, trainer.accumulate_grad_batches)))
        if self.check_every_n_steps > steps:
            rank_zero_warn(
                f"AutoFreeze: a window of check_every_n_steps={self.check_every_n_steps} "
                f"optimizer steps is longer than an epoch ({steps} steps), and a group freezes "
                f"only after {self.patience + 1} windows, so few groups can freeze in this run. "
                f"Give AutoFreeze(check_every_n_steps={steps}) (about one epoch) or less."
            )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._watching is not None and not self.validations:
            rank_zero_warn(
                f"AutoFreeze: no validation logged {self._watching[0]!r} in this fit, so nothing "
                "froze (it waits for that metric's plateau). Give the fit validation data, "
                "or AutoFreeze(after_plateau=False) to freeze on the gradient test alone."
            )

    @override
    def trainable(self, index: int, n_groups: int, epoch: int) -> bool | None:
        return index in self._head or index >= self.n_frozen

    @override
    def phase_trigger(self, epoch: int, step: int) -> dict[str, Any] | None:
        if not self.decisions:
            return None
        decision = self.decisions[-1]
        return {
            "auto_freeze": {
                k: decision[k]
                for k in ("group", "step", "rate", "grad_norm", "grad_norm_before", "plateau_epoch")
            }
        }

    def _candidate(self) -> int | None:
        """The next group to freeze: the first trainable one from the input side, unless
        it is a head group. Groups holding only parameters the user froze (a LoRA model's
        embeddings) are passed over: they have nothing to freeze."""
        while (
            self.plan is not None
            and self.n_frozen < len(self.groups)
            and self.n_frozen not in self._head
            and not self.plan.has_own_params(self.n_frozen)
        ):
            self.n_frozen += 1
        n = self.n_frozen
        if n >= len(self.groups) or n in self._head:
            return None
        return n

    # -- statistics: gradient norms per optimizer step --------------------------------
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self.plan is None or trainer.sanity_checking:
            return
        for index, group in enumerate(self.groups):
            if index < self.n_frozen:
                continue
            grads = [p.grad for p in group.params.values() if p.grad is not None]
            if grads:
                norm = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads])
                )
                self._window[index] += float(norm)
        self._steps += 1

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        if self.plan is None or self._steps < self.check_every_n_steps:
            return
        means = self._window / self._steps
        if trainer.world_size > 1:  # the same numbers on every rank, whatever each saw
            means = trainer.strategy.reduce(means.to(pl_module.device), reduce_op="mean").cpu()
        means = means.double()
        self._window.zero_()
        self._steps = 0
        norms = [
            float(m) if i >= self.n_frozen and self.plan.has_own_params(i) else None
            for i, m in enumerate(means)
        ]
        previous = self.windows[-1]["grad_norms"] if self.windows else None
        self.windows.append(
            {"step": trainer.global_step, "epoch": trainer.current_epoch, "grad_norms": norms}
        )
        index = self._candidate()
        if previous is None or index is None or trainer.current_epoch < self.min_epochs:
            return
        watching = self._watching is not None  # the dev metric paces the freezes
        waiting = watching and self.plateau_epoch is None
        before, now = previous[index], norms[index]
        if before is None or now is None or before <= 0 or not math.isfinite(now):
            return
        rate = abs(now - before) / before
        self._calm = self._calm + 1 if rate < self.threshold else 0
        if self._calm < self.patience or waiting:
            return
        if watching and self.pace is not None and self._freezes_since_validation >= self.pace:
            return
        self._calm = 0
        self._freezes_since_validation += 1
        self.n_frozen = index + 1
        decision = {
            "group": self.groups[index].name,
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "rate": rate,
            "grad_norm": now,
            "grad_norm_before": before,
            "plateau_epoch": self.plateau_epoch,  # None: on the gradient test alone
        }
        self.decisions.append(decision)
        rank_zero_info(
            f"AutoFreeze: step {trainer.global_step} (epoch {trainer.current_epoch}): froze "
            f"{decision['group']}: its gradient norm changed by {rate:.4f} < {self.threshold} "
            f"({before:.4g} -> {now:.4g}), {self.patience} window(s) of "
            f"{self.check_every_n_steps} steps in a row"
        )

    # -- checkpoints -------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            auto_freeze={
                "n_frozen": self.n_frozen,
                "decisions": list(self.decisions),
                "window": self._window.tolist(),
                "steps": self._steps,
                "calm": self._calm,
                "windows": list(self.windows),
                "validations": list(self.validations),
                "plateau_epoch": self.plateau_epoch,
                "freezes_since_validation": self._freezes_since_validation,
            }
        )
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("auto_freeze")
        if saved is None:
            return
        self.n_frozen = int(saved["n_frozen"])
        self.decisions = list(saved["decisions"])
        self._window = torch.tensor(saved["window"], dtype=torch.float64)
        self._steps = int(saved["steps"])
        self._calm = int(saved["calm"])
        self.windows = list(saved["windows"])
        self.validations = list(saved.get("validations", []))
        self.plateau_epoch = saved.get("plateau_epoch")
        self._freezes_since_validation = int(saved.get("freezes_since_validation", 0))
