"""Tied weights (an LM head that is the embedding matrix, GPT-2's default): the shared
tensor belongs to the later group, so "train the head" trains it, and the group table says
so. Before, it fell into the embedding group and the head trained nothing."""

from __future__ import annotations

import pytest
import torch
from tiny_models import changed, fit, snapshot
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from freezeft._lightning import pl
from freezeft.callbacks import FrozenEncoder
from freezeft.groups import format_group_table, resolve_groups


class TiedLM(pl.LightningModule):
    """A next-token model whose output layer is its embedding matrix (``head.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.body = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 50)
        self.head.weight = self.emb.weight  # tied, as language models do

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        logits = self.head(self.body(self.emb(tokens[:, :-1])))
        return nn.functional.cross_entropy(logits.reshape(-1, 50), tokens[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def loaders(self):
        tokens = torch.randint(0, 50, (16, 9), generator=torch.Generator().manual_seed(0))
        return (DataLoader(TensorDataset(tokens), batch_size=4),)


def test_a_tied_tensor_belongs_to_the_later_group_and_the_table_says_so():
    model = TiedLM()
    groups = resolve_groups(model)
    assert [g.name for g in groups] == ["emb", "body.0", "body.2", "head"]
    assert groups[0].params == {}  # the embedding's only tensor trains with the head
    assert groups[-1].params["head.weight"] is model.emb.weight
    assert groups[0].tied == {"emb.weight": ("head", "head.weight")}
    table = format_group_table(groups, head=1)
    assert "tied: emb.weight is head.weight; it trains with 'head'" in table


def test_frozen_encoder_trains_a_tied_head_and_only_the_head():
    model = TiedLM()
    before = snapshot(model)
    fit(model, [FrozenEncoder(head=1)], epochs=1, limit_val_batches=0)
    assert changed(before, model) == {"emb.weight", "head.weight", "head.bias"}  # one tensor


def test_a_tiny_gpt2_keeps_its_tied_lm_head_as_the_head():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied by default
    groups = resolve_groups(model)
    assert groups[-1].name == "lm_head"  # before: dropped, it owned no tensor of its own
    assert groups[-1].params["lm_head.weight"] is model.transformer.wte.weight
