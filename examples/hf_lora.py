"""LoRA fine-tuning of a BERT classifier with freezeft: the head first, then the adapters.

peft freezes BERT's weights and adds low-rank adapters to its query and value projections.
FreezeThenUnfreeze trains the classifier alone for one epoch, then the adapters too, with
DiscriminativeLR giving each lower transformer layer half the LR of the one above. The
optimizer is built over ``requires_grad`` parameters only (peft's idiom): freezeft adds
the adapters it thaws later. BERT's own weights never change.

A real run starts from a checkpoint, e.g.
``BertForSequenceClassification.from_pretrained("bert-base-uncased", num_labels=2)``;
here a tiny BERT is built from a config so the example runs offline in seconds.

    python examples/hf_lora.py

Needs, beside freezeft: ``pip install transformers peft``.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertForSequenceClassification

from freezeft.callbacks import DiscriminativeLR, FreezeThenUnfreeze


def sentences(n: int, seed: int) -> TensorDataset:
    """Token sequences labelled 1 when token 5 occurs in them."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 40, (n, 12), generator=g)
    return TensorDataset(tokens, (tokens == 5).any(dim=1).long())


class LoRAClassifier(pl.LightningModule):
    """A LightningModule holding a peft model as ``self.model``, as most projects do."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        config = BertConfig(
            vocab_size=40, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=16, num_labels=2,
        )  # fmt: skip
        lora = LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], r=8)
        self.model = get_peft_model(BertForSequenceClassification(config), lora)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        tokens, labels = batch
        return self.model(input_ids=tokens, labels=labels).loss

    def validation_step(self, batch, batch_idx):
        tokens, labels = batch
        accuracy = (self.model(input_ids=tokens).logits.argmax(-1) == labels).float().mean()
        self.log("val_acc", accuracy, prog_bar=True)

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=self.lr)


def main(epochs: int = 4) -> float:
    pl.seed_everything(0)
    module = LoRAClassifier()
    base = {n: p.clone() for n, p in module.named_parameters() if not p.requires_grad}
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        # Discovery: embeddings, encoder.layer.0 .. 3, pooler, classifier.
        callbacks=[FreezeThenUnfreeze(head=1, unfreeze_at_epoch=1), DiscriminativeLR(0.5)],
    )
    train = DataLoader(sentences(1024, 0), batch_size=32, shuffle=True)
    trainer.fit(module, train, DataLoader(sentences(256, 1), batch_size=128))
    params = dict(module.named_parameters())
    moved = sum(not torch.equal(value, params[name]) for name, value in base.items())
    accuracy = float(trainer.callback_metrics["val_acc"])
    print(f"BERT base weights changed: {moved} of {len(base)}")
    print(f"validation accuracy: {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
