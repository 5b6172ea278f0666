"""What FSDP1 and DeepSpeed cannot do with a plan is refused (or warned about) in freezeft's
words. Lightning runs FSDPStrategy only on GPUs, so the FSDP1 check runs here on a module
wrapped by FSDP1 itself (one gloo process on the CPU); the runs on GPUs are
benchmarks/gpu_sharded_check.py's."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from tiny_models import quiet_trainer
from torch import nn

from freezeft.groups import resolve_groups
from freezeft.sharding import check_deepspeed, check_fsdp1, engine_of, fsdp1_units

pytestmark = pytest.mark.library


@pytest.fixture
def gloo():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def wrapped(use_orig_params: bool) -> nn.Module:
    """Three layers; FSDP1 units: the first layer, and the root (the other two together)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    cpu = torch.device("cpu")
    net[0] = FSDP(net[0], device_id=cpu, use_orig_params=use_orig_params)
    return FSDP(net, device_id=cpu, use_orig_params=use_orig_params)


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_an_fsdp1_unit_holding_encoder_and_head_is_named_with_its_groups(gloo):
    model = wrapped(use_orig_params=True)
    groups = resolve_groups(model, ["*0", "*1", "*2"])
    units = fsdp1_units(model)
    assert [name for name, _ in units] == ["(root)", "0"]
    head = {2}  # FrozenEncoder(head=1): the last group trains, the others never

    def differ(i: int, j: int) -> bool:
        return (i in head) != (j in head)

    (warning,) = check_fsdp1(units, groups, differ, use_orig_params=True)
    assert "the FSDP unit '(root)' holds layer groups the strategy treats differently" in warning
    assert "differently (*1, *2)" in warning  # the groups, by the names they were given
    assert "Wrap each layer group as its own unit" in warning
    assert check_fsdp1(units, groups, lambda i, j: False, use_orig_params=True) == []


def test_fsdp1_without_original_parameters_is_refused():
    with pytest.raises(ValueError, match=r"use_orig_params=False\) flattens .* ModelParallel"):
        check_fsdp1([], [], lambda i, j: True, use_orig_params=False)


def test_deepspeed_refuses_thaws_and_per_group_learning_rates_only():
    class DeepSpeedStrategy:  # what engine_of reads: the class name, as Lightning's
        pass

    assert engine_of(DeepSpeedStrategy()) == "deepspeed"
    with pytest.raises(ValueError, match="FreezeThenUnfreeze thaws layer groups .* DeepSpeed"):
        check_deepspeed(thaws=True, changes_lr=False, strategies=["FreezeThenUnfreeze"])
    with pytest.raises(ValueError, match="DiscriminativeLR sets per-group learning rates"):
        check_deepspeed(thaws=False, changes_lr=True, strategies=["DiscriminativeLR"])
    check_deepspeed(thaws=False, changes_lr=False, strategies=["FrozenEncoder"])  # allowed


def test_the_frozen_output_cache_stands_aside_under_fsdp2_with_one_warning(gloo):
    """An FSDP2-sharded model (a one-process mesh) trained by a plain Trainer: the cache
    would compute outputs from shards, so it stands aside and the run trains as without."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader, TensorDataset

    from freezeft._lightning import pl
    from freezeft.callbacks import FrozenEncoder

    class Sharded(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))

        def configure_model(self) -> None:
            mesh = init_device_mesh("cpu", (1,))
            fully_shard(self.net[0], mesh=mesh)
            fully_shard(self.net[2], mesh=mesh)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=4)
    model = Sharded()
    trainer = quiet_trainer(
        accelerator="cpu", max_epochs=1, callbacks=[FrozenEncoder(head=1, cache_frozen=True)]
    )
    before = model.net[0].weight.detach().clone()  # sharded at fit start
    with pytest.warns(UserWarning, match=r"cache_frozen=True\) stands aside under"):
        trainer.fit(model, data)
    assert torch.equal(model.net[0].weight.full_tensor(), before)  # frozen all the same
