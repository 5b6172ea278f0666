"""Two gloo ranks train the speech module with a metric-triggered FreezeThenUnfreeze and a
checkpoint on val_cer, then test it with the scorer tuned on dev; each rank writes what it
saw (run by test_speech_ddp.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

from freezeft.callbacks import FreezeThenUnfreeze
from freezeft.speech.data import SpeechDataModule
from freezeft.speech.module import SpeechModule


def main(corpus: Path, out: Path) -> None:
    pl.seed_everything(0)
    # batches of 4: the 8 dev utterances split evenly, none repeated to even out the ranks
    data = SpeechDataModule(data_dir=corpus, batch_size=4, num_workers=0)
    decoder = {"name": "beam", "vocabulary": 2000, "lm_weights": [0.5, 2.0], "word_scores": [0, 1]}
    module = SpeechModule(
        labels=data.alphabet.labels, n_hidden=32, decoder=decoder, language="de",
        scorer_dir=str(out / "scorer"),
    )  # fmt: skip
    strategy = FreezeThenUnfreeze(head=1, monitor="val_cer", patience=1)
    best = pl.callbacks.ModelCheckpoint(dirpath=out / "ckpt", monitor="val_cer", mode="min")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the data module's batch sampler shards by rank
        callbacks=[strategy, best],
    )
    trainer.fit(module, datamodule=data)
    val_cer = float(trainer.callback_metrics["val_cer"])
    (tested,) = trainer.test(module, datamodule=data, verbose=False)
    rank = trainer.global_rank
    torch.save(module.state_dict(), out / f"rank{rank}.pt")
    seen = {
        "val_cer": val_cer,
        "triggered_epoch": strategy.triggered_epoch,
        "best_model_path": best.best_model_path,
        "test": tested,  # the scorer's and greedy rates, over both ranks' shares
        "scorer": module.scorer.settings.tuned_on,  # tuned on both ranks' dev shares
    }
    (out / f"rank{rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
