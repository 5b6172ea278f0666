"""The same classifier through LightningCLI; freezeft's callbacks come from the command line.

    python examples/cli.py fit --model.classes=3 --trainer.max_epochs=4 \
        --trainer.callbacks+=freezeft.callbacks.FreezeThenUnfreeze \
        --trainer.callbacks.unfreeze_at_epoch=2 \
        --trainer.callbacks+=freezeft.callbacks.LRWarmup --trainer.callbacks.warmup_steps=20

Needs, beside freezeft: ``pip install "jsonargparse[signatures]"`` (LightningCLI's parser).
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI
from shapes_classifier import Classifier, loaders


class Shapes(pl.LightningDataModule):
    """Task B of the shapes example (3 blob positions)."""

    def train_dataloader(self):
        return loaders(1)[0]

    def val_dataloader(self):
        return loaders(1)[1]


if __name__ == "__main__":
    LightningCLI(Classifier, Shapes, seed_everything_default=0)
