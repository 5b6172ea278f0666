"""Strategies on a model sharded with FSDP2 (``fully_shard`` in ``configure_model``) under
Lightning's ModelParallelStrategy: 2 CPU processes (gloo) train as one unsharded process
with the same global batch (weights within 1e-6, the same LRs, AutoFreeze's decisions at
the same steps), frozen parameters get no gradient and no optimizer state on either rank,
and a group thawed mid-run trains (issue 22)."""

import json
from pathlib import Path

import pytest
import torch
from pyrun import run_python

pytestmark = [pytest.mark.library, pytest.mark.slow]  # subprocess runs

SCRIPT = Path(__file__).with_name("fsdp2_run.py")
ENV = {"PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1"}


TESTED = [
    "frozen_encoder",
    "freeze_then_unfreeze",
    "gradual_unfreeze",
    "discriminative_lr+warmup",
    "auto_freeze",
]
#: the resume cases: a strategy and the checkpoints its sharded run saves
RESUMED = [
    # after the first thaw, before the next: the thawed group's optimizer state comes back
    ("gradual_unfreeze", "sharded"),
    # after groups froze: a checkpoint without their state (Lightning's full file)
    ("auto_freeze", "sharded_full"),
]


def launch(runs: list[dict]) -> None:
    """The runs one after another in one pair of processes (2 CPU ranks, gloo)."""
    cwd = Path(runs[0]["out"]).parent
    run_python([str(SCRIPT), json.dumps(runs)], cwd=cwd, env=ENV, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``get(strategy, mode)``: the out dir of that run. Every sharded run is made by one
    launch, the first time one is asked for; the unsharded reference runs in this process."""
    root = tmp_path_factory.mktemp("fsdp2")
    done: dict[tuple[str, str], Path] = {}

    def get(strategy: str, mode: str) -> Path:
        if mode == "sharded" and (strategy, mode) not in done:
            batch = [
                {"out": str(root / f"{name}-sharded".replace("+", "_")), "strategy": name,
                 "mode": "sharded", "epochs": 3}
                for name in TESTED
            ]  # fmt: skip
            launch(batch)
            done.update({(r["strategy"], "sharded"): Path(r["out"]) for r in batch})
        if (strategy, mode) not in done:
            import fsdp2_run

            out = root / f"{strategy}-{mode}".replace("+", "_")
            out.mkdir()
            fsdp2_run.main(out, strategy, mode)
            done[strategy, mode] = out
        return done[strategy, mode]

    return get


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Each resume case cut after epoch 1 (``cut``: 2 epochs), then resumed from that
    checkpoint by a new pair of processes to the whole run's 3 epochs: one launch cuts
    every case, one resumes them."""
    root = tmp_path_factory.mktemp("resumed")
    dirs = {}
    for strategy, checkpoints in RESUMED:
        name = strategy.replace("+", "_")
        dirs[strategy, checkpoints] = (root / f"{name}-cut", root / f"{name}-resumed")
    launch([
        {"out": str(cut), "strategy": s, "mode": m, "epochs": 2}
        for (s, m), (cut, _) in dirs.items()
    ])  # fmt: skip
    launch([
        {"out": str(again), "strategy": s, "mode": m, "epochs": 3,
         "resume": str(cut / "checkpoints" / "epoch=1.ckpt")}
        for (s, m), (cut, again) in dirs.items()
    ])  # fmt: skip
    return dirs


@pytest.mark.parametrize("strategy", TESTED)
def test_a_sharded_run_trains_as_the_unsharded_one(runs, strategy):
    sharded, single = runs(strategy, "sharded"), runs(strategy, "single")
    got = torch.load(sharded / "weights.pt", weights_only=True)
    want = torch.load(single / "weights.pt", weights_only=True)
    # float32 sums in another order (a reduce-scatter of two half batches): 1e-6
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6, rtol=0), name
    for rank in (0, 1):
        steps = json.loads((sharded / f"rank{rank}.json").read_text())
        assert not any(s["with_grad"] or s["with_state"] for s in steps)  # frozen: nothing
        assert [s["lrs"] for s in steps] == [
            s["lrs"] for s in json.loads((single / "rank0.json").read_text())
        ]
    steps = json.loads((sharded / "rank0.json").read_text())
    if strategy == "auto_freeze":  # gradient norms of sharded gradients: the same decisions
        decided = [json.loads((sharded / f"decisions{r}.json").read_text())[0] for r in (0, 1)]
        reference = json.loads((single / "decisions0.json").read_text())[0]
        assert decided[0] == decided[1] and len(reference) == 3  # encoder.0, .2 and .4
        assert [d["step"] for d in decided[0]] == [d["step"] for d in reference]
        for got_one, want_one in zip(decided[0], reference, strict=True):
            assert got_one["grad_norm"] == pytest.approx(want_one["grad_norm"], rel=1e-6)
    if strategy == "freeze_then_unfreeze":  # the encoder thaws after epoch 0, and trains
        assert steps[0]["frozen"] and not steps[-1]["frozen"]
        initial = torch.load(sharded / "initial.pt", weights_only=True)
        assert not torch.equal(got["encoder.0.weight"], initial["encoder.0.weight"])


@pytest.mark.parametrize(("strategy", "checkpoints"), RESUMED)
def test_a_sharded_run_resumed_mid_schedule_equals_the_uninterrupted_one(
    runs, resumed, strategy, checkpoints
):
    """A run cut after epoch 1, then a new pair of processes resumes its checkpoint (a
    folder of shards, or one full file): the weights bit-identical to the uninterrupted
    sharded run, the same LRs and optimizer state per step, frozen parameters with none.
    Sharded engines load the optimizer before the callbacks: the saved flags must be known
    before, or the state of groups thawed by then is lost (found by a stranger's test)."""
    whole = runs(strategy, "sharded")
    cut, resumed = resumed[strategy, checkpoints]
    saved = cut / "checkpoints" / "epoch=1.ckpt"
    assert saved.is_dir() == (checkpoints == "sharded")  # a folder of shards, or one file
    got = torch.load(resumed / "weights.pt", weights_only=True)
    want = torch.load(whole / "weights.pt", weights_only=True)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    for rank in (0, 1):
        steps = [json.loads((d / f"rank{rank}.json").read_text()) for d in (whole, resumed)]
        after_epoch_1 = [s for s in steps[0] if s["epoch"] >= 2]
        keys = ("frozen", "lrs", "state_bytes")
        assert [[s[k] for k in keys] for s in after_epoch_1] == [
            [s[k] for k in keys] for s in steps[1]
        ]
        assert not any(s["with_grad"] or s["with_state"] for s in steps[1])
