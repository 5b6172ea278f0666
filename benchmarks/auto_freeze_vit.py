"""AutoFreeze against full fine-tuning on a model that is not the speech model: a timm ViT.

    python benchmarks/auto_freeze_vit.py [--seeds 0 1 2] [--epochs 12] [--json out.json]

A tiny Vision Transformer (timm, built from its config: offline) is pretrained on one
synthetic image task (stripe orientation, 4 classes) and transferred to another (where a
faint blob sits, 3 classes; 1024 training images, so it is not solved in an epoch) with a
new head. The target module has its own AdamW and a cosine schedule (not the speech
model's plateau schedule). Per seed, the same source model is fine-tuned twice: everything
trains (``NaiveTransfer``), and ``AutoFreeze`` watching ``val_acc`` through the
``ModelCheckpoint`` (its defaults, no other setting). The best-``val_acc`` checkpoint is
tested on 1024 held-out images; ``fit`` is timed. Needs ``timm`` (``pip install timm``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from freezeft.callbacks import AutoFreeze, NaiveTransfer


def images(task: int, n: int, seed: int) -> TensorDataset:
    """Noisy 3x32x32 images: stripe orientation (task 0, 4 classes) or where a faint blob
    sits (task 1, 3 classes)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4 if task == 0 else 3, (n,), generator=g)
    x = torch.randn(n, 3, 32, 32, generator=g)
    rows, cols = torch.arange(32.0)[:, None], torch.arange(32.0)[None, :]
    for i, label in enumerate(y.tolist()):
        if task == 0:
            x[i] += torch.sin([rows, cols, rows + cols, rows - cols][label] * 0.8)
        else:
            top = int(torch.randint(4, 20, (1,), generator=g))
            x[i, :, top : top + 8, 2 + 10 * label : 10 + 10 * label] += 0.5
    return TensorDataset(x, y)


class ImageClassifier(pl.LightningModule):
    """A timm model as ``self.model``, AdamW and a cosine schedule over the run."""

    def __init__(self, model: nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.model(x).argmax(-1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self.model(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.05)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.trainer.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": schedule}


def vit(classes: int) -> nn.Module:
    from timm.models import VisionTransformer

    return VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=classes
    )


QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)


def source_model(epochs: int) -> dict[str, torch.Tensor]:
    pl.seed_everything(0)
    model = vit(4)
    train = DataLoader(images(0, 1024, 0), batch_size=64, shuffle=True)
    pl.Trainer(max_epochs=epochs, enable_checkpointing=False, **QUIET).fit(
        ImageClassifier(model), train
    )
    return {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}


def transfer(source: dict, strategy: str, seed: int, epochs: int) -> dict[str, float]:
    pl.seed_everything(seed)
    model = vit(3)
    model.load_state_dict(source, strict=False)  # a new head, the source's encoder
    module = ImageClassifier(model)
    callback = NaiveTransfer() if strategy == "naive" else AutoFreeze()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = pl.callbacks.ModelCheckpoint(folder, monitor="val_acc", mode="max")
        trainer = pl.Trainer(max_epochs=epochs, callbacks=[callback, checkpoint], **QUIET)
        g = torch.Generator().manual_seed(seed)
        train = DataLoader(images(1, 1024, 0), batch_size=32, shuffle=True, generator=g)
        dev = DataLoader(images(1, 512, 1), batch_size=256)
        start = time.perf_counter()
        trainer.fit(module, train, dev)
        seconds = time.perf_counter() - start
        test = DataLoader(images(1, 1024, 2), batch_size=256)
        (metrics,) = trainer.test(module, test, ckpt_path="best", verbose=False)
    decisions = getattr(callback, "decisions", [])
    return {
        "strategy": strategy,
        "seed": seed,
        "test_acc": float(metrics["test_acc"]),
        "fit_s": seconds,
        "frozen": [(d["group"], d["epoch"]) for d in decisions],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--source-epochs", type=int, default=6)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    source = source_model(args.source_epochs)
    runs = []
    for seed in args.seeds:
        for strategy in ("naive", "auto_freeze"):  # alternate against drift
            runs.append(transfer(source, strategy, seed, args.epochs))
            print(json.dumps(runs[-1]), flush=True)
    for strategy in ("naive", "auto_freeze"):
        mine = [r for r in runs if r["strategy"] == strategy]
        acc = [r["test_acc"] for r in mine]
        secs = [r["fit_s"] for r in mine]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(
            f"{strategy}: test acc {statistics.mean(acc):.3f} ± {sd:.3f}, "
            f"fit {statistics.mean(secs):.1f} s"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
