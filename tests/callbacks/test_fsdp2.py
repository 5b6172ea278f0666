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


def train(tmp_path: Path, strategy: str, mode: str) -> Path:
    out = tmp_path / mode
    out.mkdir()
    run_python([str(SCRIPT), str(out), strategy, mode], cwd=tmp_path, env=ENV, timeout=300)
    return out


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
def test_a_sharded_run_trains_as_the_unsharded_one(tmp_path, strategy):
    sharded, single = train(tmp_path, strategy, "sharded"), train(tmp_path, strategy, "single")
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
    if strategy == "frozen_encoder":  # bit-identical where frozen
        initial = torch.load(sharded / "initial.pt", weights_only=True)
        for name in initial:
            if name.startswith("encoder."):
                assert torch.equal(got[name], initial[name]), name
