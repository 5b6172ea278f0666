"""On 2 GPUs: every strategy under each sharding engine, one line each.

    python benchmarks/gpu_sharded_check.py          # needs 2 CUDA devices

Engines: FSDP2 (``ModelParallelStrategy``, ``fully_shard`` in ``configure_model``), FSDP1
(``FSDPStrategy``, each Linear its own unit) and, if installed, DeepSpeed ZeRO-2. Each line
says ``trained`` with the largest weight difference from the same run on one GPU (same
global batch), or ``refused`` with freezeft's message, or ``FAILED`` with the error. The
CPU tests (tests/callbacks/test_fsdp2.py, test_sharding_checks.py) cover what runs without
GPUs; this is the check for the day two are at hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sharded_memory import Net  # noqa: E402  (the benchmark's model and data)

from freezeft._lightning import pl  # noqa: E402
from freezeft.callbacks import (  # noqa: E402
    AutoFreeze,
    DiscriminativeLR,
    FreezeThenUnfreeze,
    FrozenEncoder,
    GradualUnfreeze,
    LRWarmup,
    NaiveTransfer,
)

STRATEGIES = {
    "naive": lambda: [NaiveTransfer()],
    "frozen_encoder": lambda: [FrozenEncoder(head=1)],
    "freeze_then_unfreeze": lambda: [FreezeThenUnfreeze(head=1, unfreeze_at_epoch=1)],
    "gradual_unfreeze": lambda: [GradualUnfreeze(head=1, every_n_epochs=1)],
    "discriminative_lr+warmup": lambda: [DiscriminativeLR(decay=0.5), LRWarmup(warmup_steps=3)],
    "auto_freeze": lambda: [AutoFreeze(head=1, threshold=10.0, check_every_n_steps=2)],
}


def engine(name: str):
    strategies = pl.strategies
    if name == "fsdp2":
        return strategies.ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    if name == "fsdp1":
        return strategies.FSDPStrategy(auto_wrap_policy={torch.nn.Linear})
    if name == "deepspeed":
        return strategies.DeepSpeedStrategy(stage=2)
    return "auto"


def one_run(name: str, strategy: str, out: Path) -> None:
    """In the processes Lightning starts: train, save the full weights from rank 0."""
    model = Net(shard=name == "fsdp2")
    trainer = pl.Trainer(
        accelerator="gpu", devices=1 if name == "single" else 2, strategy=engine(name),
        max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False,
        callbacks=STRATEGIES[strategy](),
    )  # fmt: skip
    trainer.fit(model)
    state = {}
    for key, value in model.state_dict().items():
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        state[key] = value.detach().float().cpu()
    if trainer.global_rank == 0:
        torch.save(state, out / f"{name}-{strategy}.pt")


def main() -> None:
    if len(sys.argv) == 4:
        one_run(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
        return
    if torch.cuda.device_count() < 2:
        sys.exit("gpu_sharded_check: needs 2 CUDA devices")
    engines = ["fsdp2", "fsdp1"]
    try:
        import deepspeed  # noqa: F401

        engines.append("deepspeed")
    except ImportError:
        print("deepspeed: not installed, skipped")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for strategy in STRATEGIES:
            reference = None
            for name in ["single", *engines]:
                proc = subprocess.run(
                    [sys.executable, __file__, name, strategy, folder],
                    capture_output=True, text=True, env={**os.environ, "PL_DISABLE_FORK": "1"},
                )  # fmt: skip
                path = Path(folder) / f"{name}-{strategy}.pt"
                if proc.returncode == 0 and path.exists() and (name == "single" or reference):
                    weights = torch.load(path, weights_only=True)
                    if name == "single":
                        reference = weights
                        continue
                    diff = max(float((weights[k] - reference[k]).abs().max()) for k in reference)
                    line = f"trained, max |weight - one GPU| {diff:.2e}"
                else:
                    said = [ln for ln in proc.stderr.splitlines() if "freezeft:" in ln]
                    last = proc.stderr.strip().splitlines()[-1:] or ["no output"]
                    line = f"refused: {said[-1]}" if said else f"FAILED: {last[0]}"
                results[f"{name} {strategy}"] = line
                print(f"{name:10} {strategy:26} {line}", flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
