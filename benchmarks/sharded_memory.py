"""Per-rank gradient and optimizer-state bytes of FreezeThenUnfreeze under FSDP2
(Lightning's ModelParallelStrategy) and DDP: in the frozen phase and after the thaw.

A model whose encoder holds 97% of the parameters (four 256-wide layers, a 32-way head),
AdamW, 2 processes on the CPU (gloo; ``--accelerator gpu`` for 2 GPUs). Each rank counts
the bytes of the gradients and optimizer state it holds (a sharded tensor: its local
shard) before every optimizer step; the table gives the maximum over each phase's steps.
A benchmark, not a test.

    python benchmarks/sharded_memory.py            # both engines, prints a Markdown table
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from freezeft._lightning import pl
from freezeft.callbacks import FreezeThenUnfreeze

WIDTH, LAYERS, CLASSES, SAMPLES, BATCH = 256, 4, 32, 256, 32


class Net(pl.LightningModule):
    def __init__(self, shard: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)))
        self.head = nn.Linear(WIDTH, CLASSES)
        self.shard = shard

    def configure_model(self) -> None:
        if self.shard:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for unit in [*self.encoder, self.head]:
                fully_shard(unit, mesh=mesh)
            fully_shard(self, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.head(torch.relu(self.encoder(x))), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(SAMPLES, WIDTH, generator=g)
        data = TensorDataset(x, torch.randint(0, CLASSES, (SAMPLES,), generator=g))
        rank, world = self.trainer.global_rank, self.trainer.world_size
        return DataLoader(Subset(data, range(rank, SAMPLES, world)), batch_size=BATCH // world)


def _bytes(tensor) -> int:
    if not isinstance(tensor, torch.Tensor):
        return 0
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


class Count(pl.Callback):
    def __init__(self) -> None:
        self.phases: dict[str, dict[str, int]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        phase = "frozen" if trainer.current_epoch == 0 else "thawed"
        now = {
            "grads": sum(_bytes(p.grad) for p in pl_module.parameters()),
            "state": sum(_bytes(v) for s in optimizer.state.values() for v in s.values()),
            "params": sum(_bytes(p) for p in pl_module.parameters()),
        }
        seen = self.phases.setdefault(phase, dict.fromkeys(now, 0))
        for key, value in now.items():
            seen[key] = max(seen[key], value)


def run_engine(engine: str, accelerator: str, out: Path) -> None:
    model = Net(shard=engine == "fsdp2")
    strategy = (
        pl.strategies.ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        if engine == "fsdp2"
        else "ddp"
    )
    count = Count()
    trainer = pl.Trainer(
        accelerator=accelerator, devices=2, strategy=strategy, max_epochs=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[FreezeThenUnfreeze(head=1, unfreeze_at_epoch=1), count],
    )  # fmt: skip
    trainer.fit(model)
    (out / f"{engine}-rank{trainer.global_rank}.json").write_text(json.dumps(count.phases))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--engine", choices=["fsdp2", "ddp"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:  # one engine, in the processes Lightning starts
        run_engine(args.engine, args.accelerator, Path(args.out))
        return
    total = sum(p.numel() for p in Net(shard=False).parameters())
    encoder = sum(p.numel() for p in Net(shard=False).encoder.parameters())
    with tempfile.TemporaryDirectory() as folder:
        for engine in ("ddp", "fsdp2"):
            command = [sys.executable, __file__, "--engine", engine, "--out", folder,
                       "--accelerator", args.accelerator]  # fmt: skip
            subprocess.run(command, check=True, env={"PL_DISABLE_FORK": "1", **_env()})
        print(f"{total:,} parameters, encoder {encoder / total:.0%}; AdamW; bytes per rank")
        print("| engine | rank | phase | params | grads | optimizer state |")
        print("| --- | --- | --- | --- | --- | --- |")
        for engine in ("ddp", "fsdp2"):
            for rank in (0, 1):
                phases = json.loads((Path(folder) / f"{engine}-rank{rank}.json").read_text())
                for phase, seen in phases.items():
                    cells = [engine, str(rank), phase] + [
                        f"{seen[k]:,}" for k in ("params", "grads", "state")
                    ]
                    print("| " + " | ".join(cells) + " |")


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1"}


if __name__ == "__main__":
    main()
