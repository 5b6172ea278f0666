"""The speech module under 2-process DDP: val_cer is the same on every rank, so a
metric-triggered strategy and a checkpoint that monitor it agree across ranks."""

from __future__ import annotations

import csv
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
    assert seen[0] == seen[1]  # same metric, phase change, best checkpoint, scorer, test
    with (german_corpus / "dev.csv").open() as handle:
        dev_words = sum(len(row["transcript"].split()) for row in csv.DictReader(handle))
    assert seen[0]["scorer"]["reference_words"] == dev_words  # both ranks' shares of dev
    assert {"test_wer", "test_greedy_wer"} <= set(seen[0]["test"])
    weights = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
