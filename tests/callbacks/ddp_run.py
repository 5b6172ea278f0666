"""Run by test_ddp.py: FreezeThenUnfreeze + LRWarmup under 2-process DDP on CPU (gloo), or
(``schedule``) the same plan as a Schedule of inline phases.

Saves each rank's final weights and, per optimizer step, how far each gradient is from the
average of the ranks' local gradients.   usage: python ddp_run.py OUT_DIR [schedule]
"""

import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from freezeft._lightning import pl
from freezeft.callbacks import FreezeThenUnfreeze, LRWarmup, Schedule


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class LocalGradients(pl.Callback):
    """Placed before the strategies: each rank's gradients before freezeft's sync."""

    def on_after_backward(self, trainer, pl_module):
        self.local = {
            n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None
        }


class CheckAveraged(pl.Callback):
    """Placed after the strategies: the gradient the optimizer uses vs the ranks' average."""

    def __init__(self, local: LocalGradients):
        self.local, self.steps = local, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        diffs = {}
        for name, param in pl_module.named_parameters():
            if param.grad is None:
                continue
            gathered = [torch.zeros_like(param.grad) for _ in range(trainer.world_size)]
            torch.distributed.all_gather(gathered, self.local.local[name])
            average = torch.stack(gathered).mean(dim=0)
            diffs[name] = float((average - param.grad).abs().max())
        self.steps.append({"epoch": trainer.current_epoch, "diffs": diffs})


#: FreezeThenUnfreeze(head=1, unfreeze_at_epoch=1, encoder_lr_scale=0.5) + LRWarmup(2, 0.5)
SCHEDULE = {
    "warmup": {"steps": 2, "start_factor": 0.5},
    "phases": [
        {"epoch": 0, "train": ["net.4"]},
        {"epoch": 1, "train": ["*"], "lr_scale": {"net.[02]": 0.5}},
    ],
}


def main(out: Path, schedule: bool) -> None:
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(64, 6), torch.randint(0, 3, (64,))), batch_size=8)
    torch.manual_seed(1)
    model = Net()
    local = LocalGradients()
    check = CheckAveraged(local)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            local,
            *(
                [Schedule(phases=SCHEDULE)]
                if schedule
                else [
                    FreezeThenUnfreeze(head=1, unfreeze_at_epoch=1, encoder_lr_scale=0.5),
                    LRWarmup(warmup_steps=2, start_factor=0.5),
                ]
            ),
            check,
        ],
    )
    trainer.fit(model, loader)
    rank = trainer.global_rank
    torch.save(model.state_dict(), out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(check.steps))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] == ["schedule"])
