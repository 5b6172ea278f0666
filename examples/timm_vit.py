"""A timm Vision Transformer pretrained on one task and transferred to another.

The source task tells 4 stripe orientations apart; the target task is where a bright blob
sits (3 classes), with a new head (``reset_classifier``). freezeft discovers the ViT's
layer groups from timm's own ``group_matcher()`` (patch embedding, one group per block,
head) and GradualUnfreeze thaws one block per epoch from the top, each lower block at a
smaller LR (DiscriminativeLR).

A real run starts from pretrained weights (``timm.create_model("vit_small_patch16_224",
pretrained=True)``); here a tiny ViT is built from its config so it runs offline.

    python examples/timm_vit.py

Needs, beside freezeft: ``pip install timm``.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from timm.models import VisionTransformer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from freezeft.callbacks import DiscriminativeLR, GradualUnfreeze


def images(task: int, n: int, seed: int) -> TensorDataset:
    """Noisy 3x32x32 images: stripe orientation (task 0, 4 classes) or blob position (task 1)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4 if task == 0 else 3, (n,), generator=g)
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.5
    rows, cols = torch.arange(32.0)[:, None], torch.arange(32.0)[None, :]
    for i, label in enumerate(y.tolist()):
        if task == 0:
            x[i] += torch.sin([rows, cols, rows + cols, rows - cols][label] * 0.8)
        else:
            x[i, :, 12:20, 2 + 10 * label : 10 + 10 * label] += 2.0
    return TensorDataset(x, y)


class ImageClassifier(pl.LightningModule):
    """Any timm model as ``self.model``, with its own optimizer and schedule."""

    def __init__(self, model: nn.Module, lr: float = 2e-3) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.model(x).argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.05)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.trainer.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": schedule}


def loaders(task: int) -> tuple[DataLoader, DataLoader]:
    train = DataLoader(images(task, 512, 0), batch_size=32, shuffle=True)
    return train, DataLoader(images(task, 256, 1), batch_size=128)


def main(epochs: int = 5) -> float:
    pl.seed_everything(0)
    vit = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=4
    )
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    source = ImageClassifier(vit)
    pl.Trainer(max_epochs=epochs, enable_model_summary=False, **quiet).fit(source, *loaders(0))

    vit.reset_classifier(num_classes=3)  # the transfer: same encoder, new head
    target = ImageClassifier(vit)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[GradualUnfreeze(head=1, every_n_epochs=1), DiscriminativeLR(decay=0.7)],
        **quiet,
    )
    trainer.fit(target, *loaders(1))
    accuracy = float(trainer.callback_metrics["val_acc"])
    print(f"target accuracy after transfer: {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
