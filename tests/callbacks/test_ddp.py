"""Under DDP, groups unfrozen mid-run stay in sync across ranks (Lightning #20340)."""

import json
from pathlib import Path

import pytest
import torch
from pyrun import run_python

pytestmark = pytest.mark.slow  # subprocess runs

SCRIPT = Path(__file__).with_name("ddp_run.py")


def test_unfrozen_groups_stay_identical_across_ranks_and_use_averaged_gradients(tmp_path):
    run_python(
        [str(SCRIPT), str(tmp_path)],
        cwd=tmp_path,
        env={"PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # no drift between the ranks
    steps = json.loads((tmp_path / "rank0.json").read_text())
    frozen = [s for s in steps if s["epoch"] == 0]
    unfrozen = [s for s in steps if s["epoch"] >= 1]
    assert frozen and all(set(s["diffs"]) == {"net.4.weight", "net.4.bias"} for s in frozen)
    assert unfrozen and all("net.0.weight" in s["diffs"] for s in unfrozen)
    # every gradient the optimizer used is the average of the ranks' own gradients
    assert max(d for s in steps for d in s["diffs"].values()) < 1e-6
