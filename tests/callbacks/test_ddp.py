"""Under DDP, groups unfrozen mid-run stay in sync across ranks (Lightning #20340)."""

import json
from pathlib import Path

import pytest
import torch
from pyrun import run_python

pytestmark = [pytest.mark.library, pytest.mark.slow]  # torch and Lightning only; subprocesses
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


def test_a_schedule_under_ddp_keeps_ranks_in_sync_and_matches_its_strategies(tmp_path):
    """The same plan as inline Schedule phases: ranks identical, averaged gradients, and
    the very weights FreezeThenUnfreeze + LRWarmup give under DDP."""
    env = {"PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1"}
    for name, extra in (("strategies", []), ("schedule", ["schedule"])):
        (tmp_path / name).mkdir()
        run_python([str(SCRIPT), str(tmp_path / name), *extra], cwd=tmp_path, env=env, timeout=300)
    load = lambda name, r: torch.load(tmp_path / name / f"rank{r}.pt", weights_only=True)  # noqa: E731
    schedule, strategies = load("schedule", 0), load("strategies", 0)
    for key in schedule:
        assert torch.equal(schedule[key], load("schedule", 1)[key]), key
        assert torch.equal(schedule[key], strategies[key]), key
    steps = json.loads((tmp_path / "schedule" / "rank0.json").read_text())
    assert max(d for s in steps for d in s["diffs"].values()) < 1e-6


def test_auto_freeze_decides_the_same_on_every_rank(tmp_path):
    script = Path(__file__).with_name("ddp_auto_freeze.py")
    env = {"PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1"}
    run_python([str(script), str(tmp_path)], cwd=tmp_path, env=env, timeout=300)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0]["decisions"] and seen[0] == seen[1]  # same statistics, same freezes
    assert seen[1]["plateau"] == 1  # rank 0's dev metric decided, for both ranks
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key


def test_auto_freeze_under_plain_ddp_says_which_strategy_it_needs(tmp_path):
    script = Path(__file__).with_name("ddp_auto_freeze.py")
    env = {"PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1"}
    proc = run_python([str(script), str(tmp_path), "ddp"], cwd=tmp_path, env=env, timeout=300,
                      check=False)  # fmt: skip
    assert proc.returncode != 0 and "ddp_find_unused_parameters_true" in proc.stderr
