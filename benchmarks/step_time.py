"""Training step time of the default speech model under each strategy (CPU or GPU).

    python benchmarks/step_time.py [--steps 40] [--warmup 5] [--accelerator cpu]

Runs one process, the same model size, corpus and batches for every variant; reports the
median time of a training step (forward, backward, optimizer) and its ratio to naive
fine-tuning. Timed on real batches of the embedded German corpus (built if missing).
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytorch_lightning as pl
import torch

from freezeft.callbacks import DiscriminativeLR, FreezeThenUnfreeze, FrozenEncoder, NaiveTransfer
from freezeft.speech.corpus import SynthCorpus
from freezeft.speech.data import SpeechDataModule
from freezeft.speech.module import SpeechModule


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, *args):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)


def measure(callbacks: list, data: SpeechDataModule, args) -> float:
    pl.seed_everything(0)
    module = SpeechModule(labels=data.alphabet.labels, n_hidden=256)
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=1, max_epochs=1,
        limit_train_batches=args.steps + args.warmup, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[*callbacks, timer],
    )
    trainer.fit(module, datamodule=data)
    return statistics.median(timer.times[args.warmup :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args()
    data = SpeechDataModule(corpus=SynthCorpus(language="de", n_train=1500, n_dev=200, n_test=300))
    data.prepare_data()
    variants = {
        "plain Lightning (no callback)": [],
        "NaiveTransfer": [NaiveTransfer()],
        "FrozenEncoder(head=1)": [FrozenEncoder(head=1)],
        "FreezeThenUnfreeze phase 1": [FreezeThenUnfreeze(head=1, unfreeze_at_epoch=99)],
        "NaiveTransfer + DiscriminativeLR": [NaiveTransfer(), DiscriminativeLR(0.7)],
    }
    results = {name: measure(cbs, data, args) for name, cbs in variants.items()}
    base = results["NaiveTransfer"]
    print(f"\nmedian step time over {args.steps} steps, batch 32, n_hidden 256, {args.accelerator}")
    for name, seconds in results.items():
        print(f"{name:<36} {seconds * 1000:8.1f} ms   {seconds / base:5.2f}x naive")


if __name__ == "__main__":
    main()
