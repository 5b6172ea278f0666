"""Run by test_ddp.py: AutoFreeze under 2-process DDP on CPU (gloo), watching a dev metric
each rank sees differently (rank 0's plateaus at epoch 1, rank 1's never); each rank writes
its decisions, its windows' statistics, its plateau and its final weights.
usage: python ddp_auto_freeze.py OUT_DIR [STRATEGY]"""

import json
import sys
from pathlib import Path

import torch
from ddp_run import Net
from torch.utils.data import DataLoader, TensorDataset

from freezeft._lightning import pl
from freezeft.callbacks import AutoFreeze


class Watched(Net):
    def validation_step(self, batch, batch_idx):
        script = [0.5, 0.6, 0.55] if self.global_rank == 0 else [0.5, 0.4, 0.3]
        self.log("val_score", script[self.current_epoch])  # not synced, on purpose


def main(out: Path, strategy: str) -> None:
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(64, 6), torch.randint(0, 3, (64,))), batch_size=4)
    torch.manual_seed(1)
    auto = AutoFreeze(
        monitor="val_score", threshold=10.0, check_every_n_steps=2, patience=1, plateau_patience=1
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[auto],
        num_sanity_val_steps=0,
    )
    trainer.fit(Watched(), loader, loader)
    rank = trainer.global_rank
    torch.save(trainer.lightning_module.state_dict(), out / f"rank{rank}.pt")
    seen = {"decisions": auto.decisions, "windows": auto.windows, "plateau": auto.plateau_epoch}
    (out / f"rank{rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "ddp_find_unused_parameters_true")
