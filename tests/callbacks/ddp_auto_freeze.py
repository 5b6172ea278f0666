"""Run by test_ddp.py: AutoFreeze under 2-process DDP on CPU (gloo); each rank writes its
decisions, its windows' statistics and its final weights.   usage: python ddp_auto_freeze.py
OUT_DIR [STRATEGY]"""

import json
import sys
from pathlib import Path

import torch
from ddp_run import Net
from torch.utils.data import DataLoader, TensorDataset

from freezeft._lightning import pl
from freezeft.callbacks import AutoFreeze


def main(out: Path, strategy: str) -> None:
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(64, 6), torch.randint(0, 3, (64,))), batch_size=4)
    torch.manual_seed(1)
    auto = AutoFreeze(threshold=0.5, check_every_n_steps=2, patience=1, min_epochs=0)
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
    )
    trainer.fit(Net(), loader)
    rank = trainer.global_rank
    torch.save(trainer.lightning_module.state_dict(), out / f"rank{rank}.pt")
    seen = {"decisions": auto.decisions, "windows": auto.windows}
    (out / f"rank{rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "ddp_find_unused_parameters_true")
