"""A Lightning project that knows nothing of freezeft: a classifier and its data.

Two tasks share what makes them learnable: a fixed random "teacher" network turns 20 noisy
inputs into 16 features, and each task labels inputs by a different linear read-out of
those features (8 classes for the source task, 4 for the target). A model pretrained on
the plentiful source task has learnt the features; the target task has few examples, so
transfer should beat training from scratch. Compare strategies on it with freezeft's app
(README, "Compare strategies on your own model"). It is written with the ``lightning``
package (``pip install lightning`` beside ``freezeft[app]``); the app serves either package:

    python examples/own_model/features.py pretrain source.ckpt
    python -m freezeft.run -m --config-dir examples/own_model/conf model=mynet data=mydata \\
      monitor=val_acc monitor_mode=max transfer.source=source.ckpt \\
      strategy=naive,frozen_encoder,gradual_unfreeze,scratch
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def teacher_features(x: torch.Tensor) -> torch.Tensor:
    """The features both tasks are defined on: a fixed random 2-layer network."""
    g = torch.Generator().manual_seed(1234)
    w1, w2 = torch.randn(20, 32, generator=g), torch.randn(32, 16, generator=g)
    return torch.relu(x @ w1 / 20**0.5) @ w2 / 32**0.5


def make_task(task: str, n: int, seed: int) -> TensorDataset:
    """``n`` examples of the ``source`` (8 classes) or ``target`` (4 classes) task."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    readout = torch.randn(
        16,
        8 if task == "source" else 4,
        generator=torch.Generator().manual_seed(7 if task == "source" else 11),
    )
    return TensorDataset(x, (teacher_features(x) @ readout).argmax(dim=1))


class FeatureData(pl.LightningDataModule):
    """Train, validation and test splits of one task (test and validation are plentiful)."""

    def __init__(self, task: str = "target", n_train: int = 96, batch_size: int = 32) -> None:
        super().__init__()
        if task not in ("source", "target"):
            raise ValueError(f"Expected `task` to be 'source' or 'target', but got {task!r}.")
        self.task, self.n_train, self.batch_size = task, n_train, batch_size

    def setup(self, stage: str) -> None:
        self.train = make_task(self.task, self.n_train, seed=0)
        self.val = make_task(self.task, 500, seed=1)
        self.test = make_task(self.task, 1000, seed=2)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, generator=g)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=250)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=250)


class MyNet(pl.LightningModule):
    """An MLP encoder and a linear head; logs loss and accuracy, picks its own optimizer."""

    def __init__(self, classes: int = 4, hidden: int = 64, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(
            nn.Linear(20, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def _step(self, batch: tuple, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log(f"{stage}_loss", loss, prog_bar=stage != "train")
        if stage != "train":
            self.log(f"{stage}_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)
        return loss

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def pretrain(path: str, epochs: int = 20) -> float:
    """Train on the source task (4000 examples, 8 classes) and save the checkpoint."""
    pl.seed_everything(0)
    model, data = MyNet(classes=8), FeatureData("source", n_train=4000, batch_size=64)
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(path)
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    print(f"source test accuracy {metrics['test_acc']:.3f} -> {path}")
    return metrics["test_acc"]


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "pretrain":
        sys.exit("usage: python examples/own_model/features.py pretrain OUT.ckpt")
    pretrain(sys.argv[2])
