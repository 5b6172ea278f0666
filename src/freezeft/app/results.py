"""What a run writes about itself: ``results.json``, ``skipped_samples.csv``, its label."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from freezeft.files import EXIT_SIGTERM, atomic_write, write_text_atomic

__all__ = ["write_json", "write_skipped", "strategy_label", "stop_before_results"]

log = logging.getLogger(__name__)


def stop_before_results(output_dir: Path, exit_code: int = EXIT_SIGTERM) -> None:
    """SIGINT/SIGTERM after training finished: say how to get the results, exit with
    ``exit_code`` (130 for Ctrl+C, 143 for SIGTERM)."""
    print(
        "freezeft: interrupted before the results were written; training had finished and "
        f"its checkpoints are in {output_dir / 'checkpoints'}. Run the same command with "
        f"resume={output_dir} to test again and write results.json.",
        flush=True,
    )
    raise SystemExit(exit_code) from None


def _standard_json(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by ``None`` and, beside it in its dict,
    ``<key>_not_finite``: ``"nan"``, ``"inf"`` or ``"-inf"`` (JSON has no such numbers)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if isinstance(item, float) and not math.isfinite(item):
                out[key], out[f"{key}_not_finite"] = None, str(item)
            else:
                out[key] = _standard_json(item)
        return out
    if isinstance(value, (list, tuple)):
        return [None if isinstance(v, float) and not math.isfinite(v) else _standard_json(v)
                for v in value]  # fmt: skip
    return value


def write_json(path: Path, results: dict[str, Any]) -> None:
    """Write ``results`` as standard JSON (non-finite numbers as ``null``, see above),
    atomically: a full disk leaves the previous file or none, never a partial one.

    Raises:
        freezeft.files.WriteError: the file could not be written (the message names it).
    """
    text = json.dumps(_standard_json(results), indent=2, ensure_ascii=False, allow_nan=False)
    write_text_atomic(path, text)


def write_skipped(rows: list[tuple[str, Any]], output_dir: Path) -> None:
    """``skipped_samples.csv``: every row the data left out and why, with a summary."""
    if not rows:
        return
    with atomic_write(output_dir / "skipped_samples.csv", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["split", "row", "file", "kind", "detail"])
        writer.writerows([split, r.source, r.path, r.kind, r.detail] for split, r in rows)
    kinds = Counter(row.kind for _, row in rows)
    counted = ", ".join(f"{n} {k}" for k, n in kinds.most_common())
    log.warning(
        f"Skipped {len(rows)} row{'' if len(rows) == 1 else 's'} ({counted}); "
        f"each one with its reason: {output_dir / 'skipped_samples.csv'}"
    )


def strategy_label(cfg: DictConfig) -> str:
    """The strategy's name, with any add-ons: ``freeze_then_unfreeze+warmup``."""
    return "+".join([cfg.strategy.name, *cfg.strategy.get("addons", {}).keys()])
