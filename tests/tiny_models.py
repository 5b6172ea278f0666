"""What users bring, built tiny from configs (no downloads): HF BERT and wav2vec2, timm
ResNet and ViT, peft LoRA; wrapped the usual way (``self.model``) in one LightningModule
with the user's own optimizer, optionally over ``requires_grad`` parameters only. And the
tests' quiet Trainer (:func:`quiet_trainer`, :data:`QUIET`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from freezeft._lightning import pl


def bert(layers: int = 3) -> nn.Module:
    pytest.importorskip("transformers")  # a dev extra: not in a library-only venv
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


def bert_lora() -> nn.Module:
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], r=2)
    return get_peft_model(bert(), config)


def wav2vec2() -> nn.Module:
    pytest.importorskip("transformers")
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    config = Wav2Vec2Config(
        vocab_size=8,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8, 8),
        conv_stride=(5, 4),
        conv_kernel=(10, 8),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
        mask_time_prob=0.0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return Wav2Vec2ForCTC(config)


def resnet18() -> nn.Module:
    timm = pytest.importorskip("timm")

    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=3)


def vit() -> nn.Module:
    pytest.importorskip("timm")
    from timm.models import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=3
    )


def sequential() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)
    )


def _classify(model: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _hf_loss(model: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    key = "input_ids" if x.dtype == torch.long else "input_values"
    return model(**{key: x}, labels=y).loss


def _data(kind: str, n: int = 16, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    if kind == "text":
        return TensorDataset(
            torch.randint(1, 50, (n, 8), generator=g), torch.randint(0, 3, (n,), generator=g)
        )
    if kind == "audio":
        return TensorDataset(
            torch.randn(n, 800, generator=g), torch.randint(1, 8, (n, 3), generator=g)
        )
    if kind == "image":
        return TensorDataset(
            torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g)
        )
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


#: name -> (builder, data kind, loss)
MODELS: dict[str, tuple[Callable[[], nn.Module], str, Callable[[nn.Module, Any], Tensor]]] = {
    "bert": (bert, "text", _hf_loss),
    "bert_lora": (bert_lora, "text", _hf_loss),
    "wav2vec2": (wav2vec2, "audio", _hf_loss),
    "resnet18": (resnet18, "image", _classify),
    "vit": (vit, "image", _classify),
    "sequential": (sequential, "vector", _classify),
}


class Task(pl.LightningModule):
    """A LightningModule as users write one: ``self.model``, their optimizer and schedule.

    Args:
        name: a key of :data:`MODELS`.
        filtered: give the optimizer only ``requires_grad`` parameters (peft's idiom).
        scheduler: ``None`` or a function ``optimizer -> scheduler`` stepped every batch.
    """

    def __init__(
        self,
        name: str,
        filtered: bool = False,
        lr: float = 1e-2,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    ) -> None:
        super().__init__()
        build, self.kind, self.loss_fn = MODELS[name]
        self.model = build()
        self.filtered, self.lr, self.make_scheduler = filtered, lr, scheduler

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.loss_fn(self.model, batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss_fn(self.model, batch))

    def configure_optimizers(self) -> Any:
        params = self.parameters()
        if self.filtered:
            params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01)
        if self.make_scheduler is None:
            return optimizer
        scheduler = {"scheduler": self.make_scheduler(optimizer), "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def loaders(self, n: int = 16, batch_size: int = 4) -> tuple[DataLoader, DataLoader]:
        train = DataLoader(_data(self.kind, n), batch_size=batch_size)
        return train, DataLoader(_data(self.kind, 8, seed=1), batch_size=batch_size)


class LRRecorder(pl.Callback):
    """The LR of every param group at every optimizer step, as the optimizer uses it."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        groups = optimizer.param_groups
        self.steps.append({g.get("name", str(i)): g["lr"] for i, g in enumerate(groups)})


#: A test's Trainer keywords: no logger, checkpointing, progress bar or model summary.
QUIET: dict[str, Any] = dict(
    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
)


def quiet_trainer(package: Any = pl, **kwargs: Any) -> pl.Trainer:
    """A real Trainer of ``package`` (``pytorch_lightning``, ``lightning.pytorch`` or
    ``lightning``; the one freezeft runs with by default) with :data:`QUIET`'s settings
    unless ``kwargs`` set them, e.g. ``quiet_trainer(max_epochs=2, logger=CSVLogger(dir))``."""
    return package.Trainer(**{**QUIET, **kwargs})


def fit(
    module: pl.LightningModule,
    callbacks: list,
    epochs: int = 2,
    ckpt_path: str | Path | None = None,
    **kwargs: Any,
) -> pl.Trainer:
    """A real Trainer, deterministic, without logs or checkpoints unless asked; resumed
    from ``ckpt_path`` if given."""
    pl.seed_everything(0)
    options = dict(max_epochs=epochs, deterministic=True, num_sanity_val_steps=0)
    trainer = quiet_trainer(callbacks=callbacks, **{**options, **kwargs})
    trainer.fit(module, *module.loaders(), ckpt_path=ckpt_path)
    return trainer


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer, cloned."""
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}


def changed(before: dict[str, Tensor], module: nn.Module) -> set[str]:
    """Names of the parameters and buffers that differ from ``before``."""
    after = module.state_dict()
    return {k for k, v in before.items() if not torch.equal(v, after[k])}
