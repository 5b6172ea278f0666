"""A small Lightning project that knows nothing of freezeft, transferred with its callbacks.

A CNN learns to tell 4 kinds of synthetic 16x16 images apart (task A), then is transferred
to a new 3-class task (task B) with a new head: first with the head alone, then everything.

    python examples/shapes_classifier.py
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from freezeft.callbacks import FreezeThenUnfreeze, LRWarmup


def images(task: int, n: int = 512, seed: int = 0) -> TensorDataset:
    """Noisy images whose class is a stripe orientation (task 0) or a blob position (task 1)."""
    g = torch.Generator().manual_seed(seed)
    classes = 4 if task == 0 else 3
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 1, 16, 16, generator=g) * 0.5
    grid = torch.arange(16.0)
    for i, label in enumerate(y.tolist()):
        if task == 0:  # stripes: horizontal, vertical, two diagonals
            rows, cols = grid[:, None], grid[None, :]
            pattern = [rows, cols, rows + cols, rows - cols][label]
            x[i, 0] += torch.sin(pattern * 1.2)
        else:  # a bright blob on the left, in the middle or on the right
            x[i, 0, 6:10, 2 + 5 * label : 6 + 5 * label] += 2.0
    return TensorDataset(x, y)


class Classifier(pl.LightningModule):
    """An ordinary LightningModule: conv encoder + linear head, its own optimizer."""

    def __init__(self, classes: int = 4, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.encoder(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=1e-2)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)}


def loaders(task: int) -> tuple[DataLoader, DataLoader]:
    return (
        DataLoader(images(task, 512, 0), batch_size=32, shuffle=True),
        DataLoader(images(task, 256, 1), batch_size=64),
    )


def main(epochs: int = 6) -> float:
    pl.seed_everything(0)
    source = Classifier(classes=4)
    pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False).fit(source, *loaders(0))

    target = Classifier(classes=3)
    target.encoder.load_state_dict(source.encoder.state_dict())  # transfer; new head
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        # Discovery finds the groups encoder.0, encoder.1, encoder.4, encoder.5 and head.
        callbacks=[
            FreezeThenUnfreeze(head=1, unfreeze_at_epoch=2, encoder_lr_scale=0.1),
            LRWarmup(warmup_steps=20),
        ],
    )
    trainer.fit(target, *loaders(1))
    accuracy = float(trainer.callback_metrics["val_acc"])
    print(f"target accuracy after transfer: {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
