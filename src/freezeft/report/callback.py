"""The Hydra callback that writes the report at the end of every multirun."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from freezeft.report.write import write_report

log = logging.getLogger(__name__)


class ReportCallback(Callback):
    """Hydra callback: write the report at the end of every multirun (``hydra/default.yaml``)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            path = write_report(sweep_dir)
        except Exception as err:  # the jobs' own results stay; say why there is no report
            log.error(f"No sweep report: {err}")
            print(f"freezeft: no sweep report: {err}", flush=True)
            return
        print(f"freezeft: sweep report -> {path}", flush=True)
