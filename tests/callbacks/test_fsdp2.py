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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``get(strategy, mode)``: the out dir of that run, each made once per module. The
    sharded runs are 2-process launches; the unsharded reference runs in this process."""
    done: dict[tuple[str, str], Path] = {}

    def get(strategy: str, mode: str) -> Path:
        if (strategy, mode) not in done:
            out = tmp_path_factory.mktemp(f"{strategy}-{mode}".replace("+", "_"))
            if mode == "single":
                import fsdp2_run

                fsdp2_run.main(out, strategy, mode)
            else:
                run_python([str(SCRIPT), str(out), strategy, mode], cwd=out, env=ENV,
                           timeout=300)  # fmt: skip
            done[strategy, mode] = out
        return done[strategy, mode]

    return get


@pytest.mark.parametrize(
    "strategy",
    [
        "frozen_encoder",
        "freeze_then_unfreeze",
        "gradual_unfreeze",
        "discriminative_lr+warmup",
        "auto_freeze",
    ],
)
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


@pytest.mark.parametrize(
    ("strategy", "checkpoints"),
    [
        # after the first thaw, before the next: the thawed group's optimizer state comes back
        ("gradual_unfreeze", "sharded"),
        # after groups froze: a checkpoint without their state (Lightning's full file)
        ("auto_freeze", "sharded_full"),
    ],
)
def test_a_sharded_run_resumed_mid_schedule_equals_the_uninterrupted_one(
    runs, tmp_path, strategy, checkpoints
):
    """A run cut after epoch 1, then a new pair of processes resumes its checkpoint (a
    folder of shards, or one full file): the weights bit-identical to the uninterrupted
    sharded run, the same LRs and optimizer state per step, frozen parameters with none.
    Sharded engines load the optimizer before the callbacks: the saved flags must be known
    before, or the state of groups thawed by then is lost (found by a stranger's test)."""
    whole = runs(strategy, "sharded")
    cut, resumed = tmp_path / "cut", tmp_path / "resumed"
    for out, args in ((cut, ["2"]), (resumed, ["4", str(cut / "checkpoints" / "epoch=1.ckpt")])):
        out.mkdir()
        run_python([str(SCRIPT), str(out), strategy, checkpoints, *args], cwd=tmp_path, env=ENV,
                   timeout=300)  # fmt: skip
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
