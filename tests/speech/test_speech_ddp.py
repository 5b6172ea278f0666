"""The speech module under 2-process DDP: val_cer is the same on every rank, so a
metric-triggered strategy and a checkpoint that monitor it agree across ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pyrun import run_python

pytestmark = pytest.mark.slow  # subprocess runs

SCRIPT = Path(__file__).with_name("ddp_speech_run.py")


def test_ranks_monitor_the_same_val_cer_and_stay_identical(tmp_path, german_corpus):
    run_python(
        [str(SCRIPT), str(german_corpus), str(tmp_path)],
        cwd=tmp_path,
        env={"PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] == seen[1]  # same metric, same phase change, same best checkpoint
    weights = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
