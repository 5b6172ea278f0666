"""Run by test_fsdp2.py: a strategy on a model sharded with FSDP2 (``fully_shard`` in
``configure_model``) under Lightning's ModelParallelStrategy, 2 CPU processes (gloo), or the
same model unsharded on one process with the same global batch.

usage: python fsdp2_run.py RUNS_JSON
RUNS_JSON: a list of runs, each ``{"out": DIR, "strategy": NAME, "mode": MODE, "epochs": N,
"resume": CKPT or null}``, MODE one of sharded, sharded_full (Lightning's full checkpoint
files instead of folders of shards) or ddp. They run one after another in the same pair of
processes (one launch: Lightning starts the second process once); ``main`` runs one.

Writes ``initial.pt`` and ``weights.pt`` (the full weights before and after fit, from rank
0) and ``rank<r>.json``: per optimizer step, the frozen parameters that had a gradient or
optimizer state (none may) and the optimizer's learning rates.
"""

import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from freezeft._lightning import pl
from freezeft.callbacks import (
    AutoFreeze,
    DiscriminativeLR,
    FreezeThenUnfreeze,
    FrozenEncoder,
    GradualUnfreeze,
    LRWarmup,
)

STRATEGIES = {
    "naive": lambda: [],
    "frozen_encoder": lambda: [FrozenEncoder(head=1)],
    "freeze_then_unfreeze": lambda: [FreezeThenUnfreeze(head=1, unfreeze_at_epoch=1)],
    "gradual_unfreeze": lambda: [GradualUnfreeze(head=1, every_n_epochs=1)],
    "discriminative_lr+warmup": lambda: [DiscriminativeLR(decay=0.5), LRWarmup(warmup_steps=3)],
    # a generous threshold: it freezes groups within the run (decisions are compared)
    "auto_freeze": lambda: [
        AutoFreeze(
            head=1,
            threshold=10.0,
            check_every_n_steps=2,
            patience=1,
            min_epochs=1,
            after_plateau=False,
        )
    ],
}
GLOBAL_BATCH = 16


class Net(pl.LightningModule):
    def __init__(self, shard: bool) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.encoder = nn.Sequential(
            nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12)
        )
        self.head = nn.Linear(12, 3)
        self.shard = shard

    def configure_model(self) -> None:
        if not self.shard:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for unit in (self.encoder[0], self.encoder[2], self.encoder[4], self.head):
            fully_shard(unit, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.encoder(x)), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.head(self.encoder(x)), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        # Lightning's own sampler would shuffle per rank; here rank r takes every other
        # sample from r, so the ranks' batches together are the single process' batch
        world, rank = self.trainer.world_size, self.trainer.global_rank
        torch.manual_seed(0)
        data = TensorDataset(torch.randn(96, 6), torch.randint(0, 3, (96,)))
        return DataLoader(Subset(data, range(rank, 96, world)), batch_size=GLOBAL_BATCH // world)

    def val_dataloader(self):
        return self.train_dataloader()


class FrozenProbe(pl.Callback):
    """Before each optimizer step: frozen parameters with a gradient or optimizer state."""

    def __init__(self) -> None:
        self.steps = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        frozen = [(n, p) for n, p in pl_module.named_parameters() if not p.requires_grad]
        self.steps.append(
            {
                "epoch": trainer.current_epoch,
                "frozen": sorted(n for n, _ in frozen),
                "with_grad": sorted(n for n, p in frozen if p.grad is not None),
                "with_state": sorted(n for n, p in frozen if optimizer.state.get(p)),
                "lrs": [g["lr"] for g in optimizer.param_groups],
                # this rank's bytes: a sharded tensor counts its local shard only
                "grad_bytes": sum(_bytes(p.grad) for p in pl_module.parameters()),
                "state_bytes": sum(
                    _bytes(v) for state in optimizer.state.values() for v in state.values()
                ),
            }
        )


def _bytes(tensor) -> int:
    if not isinstance(tensor, torch.Tensor):
        return 0
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def full(param: torch.Tensor) -> torch.Tensor:
    return (param.full_tensor() if hasattr(param, "full_tensor") else param).detach().clone()


def main(out: Path, strategy: str, mode: str, epochs: int = 3, resume: str | None = None) -> None:
    """``mode``: sharded or single; ``epochs``: the run's max_epochs (a checkpoint is saved
    at every epoch end into ``out/checkpoints``); ``resume``: a checkpoint to go on from."""
    sharded = mode.startswith("sharded")
    model = Net(shard=sharded)
    if mode == "ddp":
        engine = "ddp"
    elif sharded:
        engine = pl.strategies.ModelParallelStrategy(
            data_parallel_size=2,
            tensor_parallel_size=1,
            save_distributed_checkpoint=mode != "sharded_full",
        )
    else:
        engine = "auto"
    torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, out / "initial.pt")
    probe = FrozenProbe()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1 if mode == "single" else 2,
        strategy=engine,
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=[
            *STRATEGIES[strategy](),
            probe,
            pl.callbacks.ModelCheckpoint(
                dirpath=out / "checkpoints", filename="{epoch}", save_top_k=-1
            ),
        ],
    )
    trainer.fit(model, ckpt_path=resume)
    weights = {n: full(p) for n, p in model.named_parameters()}
    if trainer.global_rank == 0:
        torch.save(weights, out / "weights.pt")
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(probe.steps))
    decisions = [c.decisions for c in trainer.callbacks if isinstance(c, AutoFreeze)]
    (out / f"decisions{trainer.global_rank}.json").write_text(json.dumps(decisions))


if __name__ == "__main__":
    for run in json.loads(sys.argv[1]):
        Path(run["out"]).mkdir(parents=True, exist_ok=True)
        main(Path(run["out"]), run["strategy"], run["mode"], run["epochs"], run.get("resume"))
