"""Run a freezing schedule given as data: a ``schedule.yaml`` a fit wrote, or one a user
wrote by hand (:mod:`freezeft.schedule` has the format)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from typing_extensions import override

from freezeft._lightning import pl, rank_zero_info, rank_zero_warn
from freezeft.callbacks.base import StrategyCallback, improves
from freezeft.callbacks.warmup import LRWarmup
from freezeft.groups import GroupSpec, LayerGroup
from freezeft.schedule import Phase, ScheduleSpec, check_groups, read_schedule

__all__ = ["Schedule"]


class Schedule(StrategyCallback):
    """Phases of trained groups, read from a file or given inline: each phase starts at
    an epoch, at an optimizer step, or when a metric plateaus, and trains the groups its
    ``train`` names (patterns) at its ``lr_scale``; every other group is frozen.

    A ``schedule.yaml`` that a fit wrote (the app writes one into every run dir; library
    users get it from :meth:`realised_schedule` or :class:`freezeft.schedule.ScheduleLog`)
    replays that fit: the same groups train at the same steps with the same LRs (its
    ``lr_scale`` already holds every strategy's multipliers, its ``warmup`` the LRWarmup's:
    replay it alone, without those add-ons). It composes with DiscriminativeLR and
    LRWarmup as the other freezing strategies do.

    Args:
        path: a schedule file (YAML).
        phases: the phases inline instead (a list, or ``{"phases": [...], "warmup": ...}``).
        groups: layer-group patterns, input to output (as for every strategy).
        bn: ``"frozen"`` keeps frozen groups' norm layers in eval mode; ``"train"`` not.

    Raises:
        ValueError: neither or both of ``path`` and ``phases``; a file that is not a
            schedule (an unknown key, phases out of order, an empty phase: one line naming
            the file, the phase and the key). Names that match no group are refused at fit
            start, before any training, listing the groups.

    Example::

        trainer = Trainer(callbacks=[Schedule("run/schedule.yaml")])
    """

    schedules_freezing: ClassVar[bool] = True

    def __init__(
        self,
        path: str | Path | None = None,
        phases: Sequence[Any] | dict[str, Any] | None = None,
        groups: Sequence[GroupSpec] | None = None,
        bn: str = "frozen",
    ) -> None:
        super().__init__(groups, bn)
        if (path is None) == (phases is None):
            raise ValueError(
                "Schedule: give either `path` (a schedule file) or `phases` (inline), "
                f"not {'both' if path is not None else 'neither'}."
            )
        if phases is not None and not isinstance(phases, (list, tuple, dict)):
            raise ValueError(f"Schedule: `phases` must be a list of phases, got {phases!r}.")
        spec = phases if phases is not None else path
        if isinstance(spec, tuple):
            spec = list(spec)
        self.spec: ScheduleSpec = read_schedule(spec)  # type: ignore[arg-type]
        self.phases: list[Phase] = self.spec.phases
        #: the epoch each ``on_plateau`` phase was triggered to start at (by phase index)
        self.triggered: dict[int, int] = {}
        self._best = math.nan
        self._wait = 0
        self._restored: set[int] = set()  # phases whose best checkpoint was restored
        self._static: list[float] = []
        self._names: list[str] = []
        warmup = self.spec.warmup
        self._warmup = (
            LRWarmup(warmup["steps"], warmup["start_factor"], warmup["rewarm_on_unfreeze"])
            if warmup
            else None
        )

    @property
    def decides_during_fit(self) -> bool:  # type: ignore[override]
        """A phase waits for a plateau or starts mid-epoch."""
        return any(p.on_plateau is not None or p.step is not None for p in self.phases)

    # -- the groups ------------------------------------------------------------------------
    @override
    def check(self, groups: Sequence[LayerGroup]) -> None:
        names = [g.name for g in groups]
        check_groups(self.spec, names)
        if self.spec.groups is not None and self.spec.groups != names:
            rank_zero_warn(
                f"Schedule: {self.spec.source} was written for the groups {self.spec.groups}; "
                f"this model's are {names}. Its phases are matched by name."
            )
        self._names = names
        self._static = []
        for name in names:
            first = next((p for p in self.phases if p.trains(name)), None)
            self._static.append(first.scale(name) if first is not None else 1.0)
        if self._warmup is not None:
            self._warmup.groups = list(groups)

    # -- which phase -----------------------------------------------------------------------
    def _started(self, index: int, epoch: int, step: int) -> bool:
        phase = self.phases[index]
        if phase.step is not None:
            return step >= phase.step
        if phase.on_plateau is not None:
            start = self.triggered.get(index)
            return start is not None and epoch >= start
        return epoch >= (phase.epoch or 0)

    def current_phase(self, epoch: int, step: int | None = None) -> int:
        """The index of the phase in force at ``epoch`` and optimizer step ``step``."""
        if step is None:
            step = self.coordinator.global_step if self.coordinator is not None else 0
        current = 0
        for index in range(1, len(self.phases)):
            if not self._started(index, epoch, step):
                break
            current = index
        return current

    def _phase_now(self) -> Phase:
        epoch = self.coordinator.current_epoch if self.coordinator is not None else 0
        return self.phases[self.current_phase(epoch)]

    # -- intents ---------------------------------------------------------------------------
    @override
    def trainable(self, index: int, n_groups: int, epoch: int) -> bool | None:
        return self.phases[self.current_phase(epoch)].trains(self._names[index])

    @override
    def lr_scale(self, index: int, n_groups: int) -> float:
        return self._static[index]

    @override
    def lr_scale_changes(self) -> bool:
        return any(
            phase.scale(name) != static
            for name, static in zip(self._names, self._static, strict=True)
            for phase in self.phases
            if phase.trains(name)
        )

    @override
    def phase_lr_factor(self, index: int) -> float:
        phase = self._phase_now()
        name = self._names[index]
        return phase.scale(name) / self._static[index] if phase.trains(name) else 1.0

    @override
    def warmup_factor(self, index: int, step: int) -> float:
        ramp = self._warmup.warmup_factor(index, step) if self._warmup is not None else 1.0
        return ramp * self.phase_lr_factor(index)

    @override
    def warmup_settings(self) -> dict[str, Any] | None:
        return dict(self.spec.warmup) if self.spec.warmup else None

    @override
    def on_groups_unfrozen(self, indices: Sequence[int], step: int) -> None:
        if self._warmup is not None:
            self._warmup.on_groups_unfrozen(indices, step)

    @override
    def resets_optimizer_on_unfreeze(self) -> bool:
        return self._phase_now().reset_optimizer

    @override
    def phase_key(self, epoch: int, step: int) -> Any:
        return self.current_phase(epoch, step)

    @override
    def phase_extras(self, epoch: int, step: int) -> dict[str, Any]:
        return (
            {"restore_best": True}
            if self.phases[self.current_phase(epoch, step)].restore_best
            else {}
        )

    @override
    def phase_trigger(self, epoch: int, step: int) -> dict[str, Any] | None:
        index = self.current_phase(epoch, step)
        phase = self.phases[index]
        if phase.on_plateau is not None:
            return {"on_plateau": {**phase.on_plateau, "best": self._best}}
        return {"schedule": {"phase": index, "source": self.spec.source}}

    # -- plateaus and restored checkpoints -------------------------------------------------
    @override
    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logged = set(trainer.callback_metrics)
        for index, phase in enumerate(self.phases):
            if (
                phase.on_plateau is not None
                and logged
                and phase.on_plateau["monitor"] not in logged
            ):
                raise ValueError(
                    f"Schedule: {self.spec.source}: phase {index} waits for a plateau of "
                    f"{phase.on_plateau['monitor']!r}, which the validation does not log; it "
                    f"logs {sorted(logged)}. Name one of those in `on_plateau.monitor`."
                )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epochs = trainer.max_epochs
        if not isinstance(epochs, int) or epochs < 0:
            return
        late = [i for i, p in enumerate(self.phases) if p.epoch is not None and p.step is None
                and p.epoch >= epochs]  # fmt: skip
        if late:
            rank_zero_warn(
                f"Schedule: {self.spec.source}: phase(s) {late} start at epoch "
                f"{self.phases[late[0]].epoch} or later, but the fit has {epochs} epoch(s) "
                f"(0..{epochs - 1}): they never run. Train longer (Trainer(max_epochs=N); "
                f"python -m freezeft.run: trainer.max_epochs="
                f"{max(self.phases[i].epoch or 0 for i in late) + 1}) or start them earlier."
            )

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        now = self.current_phase(trainer.current_epoch, trainer.global_step)
        following = now + 1
        if following >= len(self.phases) or self.phases[following].on_plateau is None:
            return
        if following in self.triggered:
            return
        plateau = self.phases[following].on_plateau
        assert plateau is not None
        value = trainer.callback_metrics.get(plateau["monitor"])
        if value is None:
            raise ValueError(
                f"Schedule: {self.spec.source}: phase {following} waits for a plateau of "
                f"{plateau['monitor']!r}, which was not logged; logged metrics are "
                f"{sorted(trainer.callback_metrics)}."
            )
        value = float(value)
        if math.isnan(self._best) or improves(value, self._best, plateau["mode"]):
            self._best, self._wait = value, 0
        else:
            self._wait += 1
        if self._wait >= plateau["patience"]:
            self.triggered[following] = trainer.current_epoch + 1
            self._best, self._wait = math.nan, 0
            rank_zero_info(
                f"Schedule: {plateau['monitor']} did not improve for {plateau['patience']} "
                f"validations; phase {following} starts at epoch {trainer.current_epoch + 1}."
            )

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        index = self.current_phase(trainer.current_epoch, trainer.global_step)
        phase = self.phases[index]
        if phase.restore_best and index not in self._restored:
            self._restored.add(index)
            self._restore_best(trainer, pl_module, index)
        super().on_train_epoch_start(trainer, pl_module)

    def _restore_best(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int) -> None:
        callback = trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", "") if callback is not None else ""
        if not best or not Path(best).is_file():
            rank_zero_warn(
                f"Schedule: phase {index} asks for the best checkpoint (restore_best), but "
                "none was saved yet; it starts from the current weights."
            )
            return
        checkpoint = torch.load(best, map_location="cpu", weights_only=True)
        pl_module.load_state_dict(checkpoint["state_dict"])
        rank_zero_info(f"Schedule: phase {index} starts from the best checkpoint, {best}.")

    # -- checkpoints -----------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["schedule"] = {
            "triggered": {str(k): v for k, v in self.triggered.items()},
            "best": self._best,
            "wait": self._wait,
            "restored": sorted(self._restored),
            "warmup": self._warmup.start_steps if self._warmup is not None else {},
        }
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("schedule")
        if not saved:
            return
        self.triggered = {int(k): int(v) for k, v in saved["triggered"].items()}
        self._best, self._wait = float(saved["best"]), int(saved["wait"])
        self._restored = set(saved["restored"])
        if self._warmup is not None:
            self._warmup.start_steps = dict(saved["warmup"])
