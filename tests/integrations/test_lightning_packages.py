"""The same freezeft callbacks under ``pytorch_lightning`` and the unified ``lightning``
package: both Trainers, both LightningCLIs, callbacks from flags and from YAML."""

from __future__ import annotations

import importlib

import pytest
import torch
from tiny_models import QUIET, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from freezeft.callbacks import FreezeThenUnfreeze, FrozenEncoder, LRWarmup

pytestmark = pytest.mark.library  # runs where only torch and Lightning are installed

PACKAGES = ["pytorch_lightning", "lightning.pytorch"]


def module_class(package: str) -> type:
    """A plain LightningModule of ``package`` with its own data."""
    pl = pytest.importorskip(package)

    class Classifier(pl.LightningModule):
        def __init__(self, lr: float = 0.05) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.encoder = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12))
            self.head = nn.Linear(12, 3)
            self.lr = lr

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.head(self.encoder(x).relu()), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            data = TensorDataset(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,)))
            return DataLoader(data, batch_size=4)

    return Classifier


@pytest.mark.parametrize("package", PACKAGES)
def test_callbacks_are_callbacks_of_both_packages(package):
    callback = pytest.importorskip(package).Callback
    assert issubclass(FreezeThenUnfreeze, callback) and issubclass(LRWarmup, callback)


@pytest.mark.parametrize("package", PACKAGES)
def test_trainer_of_each_package_freezes_and_warms_up(package):
    pl = pytest.importorskip(package)
    module = module_class(package)()
    encoder = {k: v.clone() for k, v in module.encoder.state_dict().items()}
    head = module.head.weight.clone()
    trainer = quiet_trainer(pl, max_epochs=1, callbacks=[FrozenEncoder(), LRWarmup(4)])
    trainer.fit(module)
    assert all(torch.equal(v, module.encoder.state_dict()[k]) for k, v in encoder.items())
    assert not torch.equal(head, module.head.weight)


def cli(package: str, tmp_path, *args: str):
    pytest.importorskip("jsonargparse")  # Lightning's CLI needs it
    LightningCLI = importlib.import_module(f"{package}.cli").LightningCLI
    flags = [f"--trainer.{k}={str(v).lower()}" for k, v in QUIET.items()]
    return LightningCLI(
        module_class(package),
        args=[
            "fit",
            "--trainer.max_epochs=2",
            f"--trainer.default_root_dir={tmp_path}",
            *flags,
            *args,
        ],  # fmt: skip
        save_config_callback=None,
    )


@pytest.mark.parametrize("package", PACKAGES)
def test_lightning_cli_takes_the_callbacks_from_flags(package, tmp_path):
    run = cli(
        package,
        tmp_path,
        "--trainer.callbacks+=freezeft.callbacks.FreezeThenUnfreeze",
        "--trainer.callbacks.unfreeze_at_epoch=1",
        "--trainer.callbacks+=freezeft.callbacks.LRWarmup",
        "--trainer.callbacks.warmup_steps=3",
    )
    strategy = next(c for c in run.trainer.callbacks if isinstance(c, FreezeThenUnfreeze))
    assert strategy.unfreeze_at_epoch == 1
    assert any(isinstance(c, LRWarmup) and c.warmup_steps == 3 for c in run.trainer.callbacks)
    fresh = module_class(package)()
    assert not torch.equal(run.model.encoder[0].weight, fresh.encoder[0].weight)  # thawed


@pytest.mark.parametrize("package", PACKAGES)
def test_lightning_cli_takes_the_callbacks_from_yaml(package, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: freezeft.callbacks.FrozenEncoder\n"
        "      init_args:\n"
        "        head: 1\n"
        "        groups: [encoder.0, encoder.2, head]\n"
    )
    run = cli(package, tmp_path, f"--config={config}")
    strategy = next(c for c in run.trainer.callbacks if isinstance(c, FrozenEncoder))
    assert [g.name for g in strategy.groups] == ["encoder.0", "encoder.2", "head"]
    fresh = module_class(package)()
    assert torch.equal(run.model.encoder[0].weight, fresh.encoder[0].weight)  # frozen
    assert not torch.equal(run.model.head.weight, fresh.head.weight)
