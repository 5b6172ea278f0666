"""``python -m freezeft.run stage=schedule``: a model's layer groups, and a starter
schedule to edit (finetuning-scheduler's generated schedule, in freezeft's format)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from freezeft.app.build import build_fit
from freezeft.groups import format_group_table, resolve_groups
from freezeft.schedule import starter_schedule, write_schedule

__all__ = ["write_starter_schedule"]

log = logging.getLogger(__name__)


def write_starter_schedule(cfg: DictConfig, output_dir: Path) -> Path:
    """Build ``cfg``'s model (its data's constructor only: nothing is synthesised or read
    but what the model's size needs), print its layer groups and write
    ``output_dir/schedule.yaml``: the last group alone, then one more group per epoch, the
    lower ones at half the LR of those above. Returns the file's path."""
    parts = build_fit(cfg, cfg.data, with_strategies=False)
    groups = resolve_groups(parts.model, None)
    names = [g.name for g in groups]
    path = output_dir / "schedule.yaml"
    output_dir.mkdir(parents=True, exist_ok=True)
    header = (
        f"# A starter freezing schedule for {type(parts.model).__name__}'s {len(names)} layer\n"
        "# groups (input to output). Edit it, then run it with:\n"
        f"#   python -m freezeft.run strategy=schedule strategy.path={path}\n"
        "# Each phase: when it starts (epoch, step, or on_plateau: {monitor, patience, mode}),\n"
        "# which groups train (names or fnmatch patterns; every other group is frozen), their\n"
        "# lr_scale (a number or {pattern: number}); reset_optimizer, restore_best: true|false.\n"
    )
    write_schedule(path, starter_schedule(names), header)
    log.info(f"Layer groups of {type(parts.model).__name__}:\n{format_group_table(groups)}")
    return path
