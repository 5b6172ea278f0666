"""A freezing schedule as data: the file a fit writes (``schedule.yaml``) and the
:class:`~freezeft.callbacks.Schedule` strategy runs.

The format (every key but ``phases`` optional)::

    groups: [model.layer_1, ..., model.layer_6]   # the layer groups, input to output
    warmup: {steps: 100, start_factor: 0.01, rewarm_on_unfreeze: true}
    phases:
      - epoch: 0
        train: [model.layer_6]             # group names or fnmatch patterns; the rest frozen
      - epoch: 2
        train: [model.layer_5, model.layer_6]
      - epoch: 3
        train: ["*"]
        lr_scale: 0.5                      # or {pattern: number}; 1 where not given
        reset_optimizer: true              # forget the optimizer's state as it starts
        restore_best: true                 # the best checkpoint's weights first
      - on_plateau: {monitor: val_cer, patience: 2, mode: min}   # instead of an epoch
        train: ["*"]

A phase starts at ``epoch`` (0-based), at optimizer step ``step`` (a mid-epoch change, as
AutoFreeze makes them) or, with ``on_plateau``, at the epoch after ``monitor`` has not
improved for ``patience`` validations of the phase before. ``trigger`` records what
started a phase in the run that wrote it (read, never acted on). Phases are in order; each
trains at least one group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml

from freezeft.files import write_text_atomic

__all__ = ["Phase", "ScheduleSpec", "read_schedule", "schedule_text", "starter_schedule"]

PHASE_KEYS = {"epoch", "step", "on_plateau", "train", "lr_scale", "reset_optimizer",
              "restore_best", "trigger"}  # fmt: skip
TOP_KEYS = {"groups", "warmup", "phases", "written_by"}
WARMUP_KEYS = {"steps", "start_factor", "rewarm_on_unfreeze"}
PLATEAU_KEYS = {"monitor", "patience", "mode"}


@dataclass
class Phase:
    """One phase: which groups train from when, at which LR multipliers."""

    train: list[str]
    epoch: int | None = None
    step: int | None = None
    on_plateau: dict[str, Any] | None = None
    lr_scale: float | dict[str, float] = 1.0
    reset_optimizer: bool = False
    restore_best: bool = False
    trigger: dict[str, Any] | None = None

    def trains(self, name: str) -> bool:
        """Whether the group ``name`` trains in this phase."""
        return any(fnmatchcase(name, pattern) for pattern in self.train)

    def scale(self, name: str) -> float:
        """The LR multiplier of the group ``name`` in this phase."""
        if isinstance(self.lr_scale, dict):
            return next((float(v) for p, v in self.lr_scale.items() if fnmatchcase(name, p)), 1.0)
        return float(self.lr_scale)


@dataclass
class ScheduleSpec:
    """A whole schedule: its phases, the groups it was written for, its warmup."""

    phases: list[Phase]
    groups: list[str] | None = None
    warmup: dict[str, Any] | None = None
    source: str = "the schedule"  # where it came from, for messages
    extra: dict[str, Any] = field(default_factory=dict)


def _refuse(where: str, what: str) -> ValueError:
    return ValueError(f"{where}: {what}")


def _refuse_unknown_keys(where: str, mapping: dict[Any, Any], known: list[str]) -> None:
    """Refuse the first key of ``mapping`` that is not in ``known``, listing ``known``."""
    unknown = sorted(set(map(str, mapping)) - set(known))
    if unknown:
        raise _refuse(where, f"unknown key {unknown[0]!r} (known: {', '.join(known)})")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_schedule(spec: str | Path | dict[str, Any] | list[Any]) -> ScheduleSpec:
    """A schedule from a YAML file, a dict (``{"phases": [...]}``) or a list of phases,
    checked: known keys only, phases in order, each training something.

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line naming the file, the phase and the key at fault.
    """
    source = "the schedule"
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        source = str(path)
        if path.is_dir():
            raise ValueError(
                f"{path} is a folder, not a schedule file; give the schedule.yaml in it "
                f"({path / 'schedule.yaml'}) or another YAML file."
            )
        if not path.is_file():
            raise FileNotFoundError(
                f"Schedule file {path} does not exist; write one (python -m freezeft.run "
                "stage=schedule writes a starter) or give the schedule's phases inline."
            )
        try:
            spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = getattr(err, "problem", None) or first
            raise _refuse(source, f"not readable YAML ({where}{problem})") from None
        if isinstance(spec, list):
            raise _refuse(
                source,
                "a list, not a schedule: put the phases under `phases:` (a mapping)",
            )
    if isinstance(spec, list):
        spec = {"phases": spec}
    if not isinstance(spec, dict):
        raise _refuse(source, f"expected a mapping with `phases`, got {type(spec).__name__}")
    _refuse_unknown_keys(source, spec, sorted(TOP_KEYS))
    raw = spec.get("phases")
    if not isinstance(raw, list) or not raw:
        raise _refuse(source, "`phases` must be a non-empty list of phases")
    groups = spec.get("groups")
    if groups is not None and (
        not isinstance(groups, list) or not all(isinstance(g, str) for g in groups)
    ):
        raise _refuse(source, "`groups` must be a list of group names")
    warmup = spec.get("warmup")
    if warmup is not None:
        warmup = _warmup(source, warmup)
    phases = [_phase(source, i, p) for i, p in enumerate(raw)]
    _check_order(source, phases)
    return ScheduleSpec(phases=phases, groups=groups, warmup=warmup, source=source)


def _warmup(source: str, warmup: Any) -> dict[str, Any]:
    where = f"{source}: warmup"
    if not isinstance(warmup, dict):
        raise _refuse(where, "expected {steps: N, start_factor: F}")
    _refuse_unknown_keys(where, warmup, sorted(WARMUP_KEYS))
    steps = warmup.get("steps", 100)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise _refuse(where, f"`steps` must be an integer >= 0, got {steps!r}")
    start = warmup.get("start_factor", 0.01)
    if not _number(start) or not 0 < start <= 1:
        raise _refuse(where, f"`start_factor` must be in (0, 1], got {start!r}")
    rewarm = warmup.get("rewarm_on_unfreeze", True)
    if not isinstance(rewarm, bool):
        raise _refuse(where, f"`rewarm_on_unfreeze` must be true or false, got {rewarm!r}")
    return {"steps": steps, "start_factor": float(start), "rewarm_on_unfreeze": rewarm}


def _phase(source: str, index: int, raw: Any) -> Phase:
    where = f"{source}: phase {index}"
    if not isinstance(raw, dict):
        raise _refuse(where, f"expected a mapping (epoch, train, ...), got {raw!r}")
    _refuse_unknown_keys(where, raw, sorted(PHASE_KEYS))
    train = raw.get("train")
    if isinstance(train, str):
        train = [train]
    if not isinstance(train, list) or not all(isinstance(t, str) for t in train):
        raise _refuse(where, "`train` must be a list of group names or patterns")
    if not train:
        raise _refuse(where, "`train` is empty: a phase must train at least one group")
    starts = [k for k in ("epoch", "step", "on_plateau") if raw.get(k) is not None]
    if index == 0 and not starts:
        raw = {**raw, "epoch": 0}
        starts = ["epoch"]
    if not starts:
        raise _refuse(where, "says not when it starts: give `epoch`, `step` or `on_plateau`")
    if "on_plateau" in starts and len(starts) > 1:
        raise _refuse(where, "`on_plateau` starts a phase by itself: drop `epoch`/`step`")
    for key in ("epoch", "step"):
        value = raw.get(key)
        bad_int = not isinstance(value, int) or isinstance(value, bool) or value < 0
        if value is not None and bad_int:
            raise _refuse(where, f"`{key}` must be an integer >= 0, got {value!r}")
    plateau = raw.get("on_plateau")
    if plateau is not None:
        if not isinstance(plateau, dict) or not isinstance(plateau.get("monitor"), str):
            raise _refuse(where, "`on_plateau` must be {monitor: NAME, patience: N, mode: min|max}")
        _refuse_unknown_keys(f"{where}: on_plateau", plateau, ["monitor", "patience", "mode"])
        patience = plateau.get("patience", 1)
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            what = f"on_plateau: `patience` must be an integer >= 1, got {patience!r}"
            raise _refuse(where, what)
        if plateau.get("mode", "min") not in ("min", "max"):
            what = f"on_plateau: `mode` must be min or max, got {plateau.get('mode')!r}"
            raise _refuse(where, what)
        mode = plateau.get("mode", "min")
        plateau = {"monitor": plateau["monitor"], "patience": patience, "mode": mode}
    scale = raw.get("lr_scale", 1.0)
    values = list(scale.values()) if isinstance(scale, dict) else [scale]
    if not all(_number(v) and v > 0 for v in values) or (
        isinstance(scale, dict) and not all(isinstance(k, str) for k in scale)
    ):
        what = f"`lr_scale` must be a number > 0 or {{pattern: number > 0}}, got {scale!r}"
        raise _refuse(where, what)
    for key in ("reset_optimizer", "restore_best"):
        if not isinstance(raw.get(key, False), bool):
            raise _refuse(where, f"`{key}` must be true or false, got {raw.get(key)!r}")
    trigger = raw.get("trigger")
    if trigger is not None and not isinstance(trigger, dict):
        raise _refuse(where, "`trigger` (what started the phase, as written) must be a mapping")
    return Phase(
        train=list(train),
        epoch=raw.get("epoch"),
        step=raw.get("step"),
        on_plateau=plateau,
        lr_scale=dict(scale) if isinstance(scale, dict) else float(scale),
        reset_optimizer=raw.get("reset_optimizer", False),
        restore_best=raw.get("restore_best", False),
        trigger=trigger,
    )


def _check_order(source: str, phases: list[Phase]) -> None:
    last_epoch, last_step = -1, -1
    for index, phase in enumerate(phases):
        where = f"{source}: phase {index}"
        if phase.epoch is not None:
            later_step = phase.step is not None and phase.step > last_step
            if phase.epoch <= last_epoch and not later_step:
                raise _refuse(
                    where,
                    f"`epoch: {phase.epoch}` is not after the phase before (epoch "
                    f"{last_epoch}): phases must be in order",
                )
            last_epoch = phase.epoch
        if phase.step is not None:
            if phase.step <= last_step:
                raise _refuse(
                    where,
                    f"`step: {phase.step}` is not after the phase before (step {last_step}): "
                    "phases must be in order",
                )
            last_step = phase.step
    if phases[0].on_plateau is not None:
        raise _refuse(f"{source}: phase 0", "the first phase cannot wait for a plateau")


def check_groups(spec: ScheduleSpec, names: list[str]) -> None:
    """Refuse a schedule naming groups the model does not have, listing those it has.

    Raises:
        ValueError: a name or pattern in a phase's ``train`` or ``lr_scale`` that matches no
            group.
    """
    for index, phase in enumerate(spec.phases):
        patterns = list(phase.train)
        if isinstance(phase.lr_scale, dict):
            patterns += list(phase.lr_scale)
        for pattern in patterns:
            if not any(fnmatchcase(name, pattern) for name in names):
                raise ValueError(
                    f"{spec.source}: phase {index}: {pattern!r} is no layer group of this "
                    f"model; its groups are {names}"
                )


def schedule_text(schedule: dict[str, Any], header: str = "") -> str:
    """A schedule (``{"groups": ..., "phases": [...]}``) as the YAML a schedule file holds."""
    text = yaml.safe_dump(schedule, sort_keys=False, default_flow_style=None, width=100)
    return (header + text) if header else text


def write_schedule(path: str | Path, schedule: dict[str, Any], header: str = "") -> None:
    """Write ``schedule`` to ``path`` atomically (a kill never leaves half a file)."""
    write_text_atomic(path, schedule_text(schedule, header))


def starter_schedule(names: list[str]) -> dict[str, Any]:
    """A schedule to edit for groups ``names`` (input to output): the last group alone,
    then one more group down per epoch (ULMFiT's gradual unfreezing), everything at the
    end; the lower groups at half the LR of the groups above them."""
    phases = []
    n = len(names)
    for k in range(1, n + 1):
        train = names[n - k :] if k < n else ["*"]
        scales = {name: round(0.5 ** (n - 1 - i), 6) for i, name in enumerate(names) if i >= n - k}
        phases.append({"epoch": k - 1, "train": list(train), "lr_scale": scales})
    return {"groups": list(names), "phases": phases}
