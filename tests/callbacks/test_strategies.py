"""The strategies on a real Trainer with a small module: what users rely on."""

from __future__ import annotations

import pytest
import torch
from tiny_models import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from freezeft._lightning import pl
from freezeft.callbacks import (
    DiscriminativeLR,
    FreezeBottom,
    FreezeThenUnfreeze,
    FrozenEncoder,
    GradualUnfreeze,
    LRWarmup,
    NaiveTransfer,
)

pytestmark = pytest.mark.library  # runs where only torch and Lightning are installed


class Block(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.norm = nn.BatchNorm1d(n_out)

    def forward(self, x):
        return torch.relu(self.norm(self.linear(x)))


class Net(pl.LightningModule):
    """Groups by discovery: net.0, net.1 (blocks with BatchNorm), net.2 (the head)."""

    def __init__(self, optimizer: str = "adamw", scheduler: str | None = None, split: bool = False):
        super().__init__()
        self.net = nn.Sequential(Block(6, 12), Block(12, 12), nn.Linear(12, 3))
        self.optimizer_name, self.scheduler_name, self.split = optimizer, scheduler, split
        self.graph: dict[str, bool] = {}

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        if self.split:  # a no-decay group for biases, as many users write it
            decay = [p for n, p in self.named_parameters() if n.endswith("weight")]
            rest = [p for n, p in self.named_parameters() if not n.endswith("weight")]
            params = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
        else:
            params = self.parameters()
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)
        else:
            opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)
        steps = 4 * 4
        make = {
            None: lambda: None,
            "LambdaLR": lambda: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s),
            "LinearLR": lambda: torch.optim.lr_scheduler.LinearLR(opt, 0.5, 1.0, total_iters=5),
            "CosineAnnealingLR": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps),
            "OneCycleLR": lambda: torch.optim.lr_scheduler.OneCycleLR(opt, 0.02, total_steps=steps),
            "SequentialLR": lambda: torch.optim.lr_scheduler.SequentialLR(
                opt,
                [
                    torch.optim.lr_scheduler.LinearLR(opt, 0.2, 1.0, total_iters=3),
                    torch.optim.lr_scheduler.ExponentialLR(opt, 0.9),
                ],
                milestones=[3],
            ),
            "ReduceLROnPlateau": lambda: torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, factor=0.5, patience=0
            ),
        }
        scheduler = make[self.scheduler_name]()
        if scheduler is None:
            return opt
        interval = "epoch" if self.scheduler_name == "ReduceLROnPlateau" else "step"
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": scheduler, "interval": interval, "monitor": "val_loss"},
        }


def data(n: int = 32) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=generator)
    y = torch.randint(0, 3, (n,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8)


class LRRecorder(pl.Callback):
    """The LR of every param group at every optimizer step, as the optimizer uses it."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        groups = optimizer.param_groups
        self.steps.append({g.get("name", str(i)): g["lr"] for i, g in enumerate(groups)})


def fit(module, callbacks, epochs=4, tmp_path=None, **kwargs):
    pl.seed_everything(0)
    trainer = quiet_trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=pl.loggers.CSVLogger(tmp_path) if tmp_path else False,
        enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
        deterministic=True,
        num_sanity_val_steps=0,
        **kwargs,
    )
    trainer.fit(module, data(), data(16))
    return trainer


def make_net(**kwargs) -> Net:
    torch.manual_seed(0)
    return Net(**kwargs)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_frozen_encoder_keeps_the_encoder_bit_identical(optimizer):
    net = make_net(optimizer=optimizer)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainer = fit(net, [FrozenEncoder(head=1)], epochs=2)
    after = net.state_dict()
    for key in before:
        if key.startswith("net.2."):
            assert not torch.equal(before[key], after[key]), key  # the head trained
        elif not key.endswith("num_batches_tracked"):
            assert torch.equal(before[key], after[key]), key  # weights and BN stats intact
    state_params = set(trainer.optimizers[0].state)
    head = {id(p) for p in net.net[2].parameters()}
    assert {id(p) for p in state_params} == head  # no optimizer state for frozen params


@pytest.mark.parametrize("n_frozen", [0, 1, 2])
def test_freeze_bottom_keeps_the_first_n_groups_bit_identical_and_trains_the_rest(n_frozen):
    net = make_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainer = fit(net, [FreezeBottom(n_frozen=n_frozen)], epochs=2)
    after = net.state_dict()
    for key in before:
        if key.endswith("num_batches_tracked"):
            continue
        frozen = int(key.split(".")[1]) < n_frozen  # net.0..., net.1..., net.2...
        assert torch.equal(before[key], after[key]) == frozen, key
    trained = {id(p) for i in range(n_frozen, 3) for p in net.net[i].parameters()}
    assert {id(p) for p in trainer.optimizers[0].state} == trained
    assert all(p.requires_grad for p in net.parameters())  # every flag restored at fit end


def test_freeze_bottom_that_would_freeze_every_group_names_them():
    with pytest.raises(ValueError, match=r"n_frozen=3` leaves no group to train.*'net\.2'"):
        fit(make_net(), [FreezeBottom(n_frozen=3)], epochs=1)
    with pytest.raises(ValueError, match="n_frozen` an integer >= 0, but got -1"):
        FreezeBottom(n_frozen=-1)


def test_naive_trains_everything_and_frozen_prefix_builds_no_graph():
    net = make_net()
    outputs: dict[str, bool] = {}

    def record(name):
        def hook(module, inputs, output):
            if torch.is_grad_enabled():  # training steps, not validation
                outputs[name] = output.requires_grad

        return hook

    for name in ("0", "1", "2"):
        net.net.get_submodule(name).register_forward_hook(record(name))
    fit(net, [FrozenEncoder(head=1)], epochs=1)
    assert outputs == {"0": False, "1": False, "2": True}
    fit(net, [NaiveTransfer()], epochs=1)
    assert all(p.requires_grad for p in net.parameters())
    assert outputs == {"0": True, "1": True, "2": True}


SCHEDULERS = [
    "LambdaLR", "LinearLR", "CosineAnnealingLR", "OneCycleLR", "SequentialLR", "ReduceLROnPlateau"
]  # fmt: skip


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_user_schedulers_shape_every_group_across_an_unfreeze(scheduler):
    plain = LRRecorder()
    fit(make_net(scheduler=scheduler), [plain])
    recorder = LRRecorder()
    strategy = FreezeThenUnfreeze(head=1, unfreeze_at_epoch=2, encoder_lr_scale=0.1)
    fit(make_net(scheduler=scheduler), [strategy, recorder])
    assert len(recorder.steps) == len(plain.steps) == 16
    for ours, theirs in zip(recorder.steps, plain.steps, strict=True):
        assert ours["net.0"] == ours["net.1"] == pytest.approx(0.1 * ours["net.2"], rel=1e-6)
        if scheduler != "ReduceLROnPlateau":  # that one follows val_loss, which differs here
            (lr,) = theirs.values()
            assert ours["net.2"] == pytest.approx(lr, rel=1e-6)
    if scheduler == "ReduceLROnPlateau":
        assert recorder.steps[-1]["net.2"] < recorder.steps[0]["net.2"]  # it did reduce


def test_user_param_groups_are_split_keeping_their_hyperparameters(tmp_path):
    net = make_net(split=True)
    monitor = pl.callbacks.LearningRateMonitor(logging_interval="step")
    trainer = fit(net, [DiscriminativeLR(decay=0.5), monitor], epochs=1, tmp_path=tmp_path)
    groups = trainer.optimizers[0].param_groups
    names = [g["name"] for g in groups]
    assert names == [f"net.{i}/pg{u}" for u in (1, 2) for i in range(3)]
    assert [g["weight_decay"] for g in groups] == [0.1] * 3 + [0.0] * 3
    assert [g["lr"] for g in groups[:3]] == pytest.approx([0.0025, 0.005, 0.01])
    assert {f"lr-AdamW/{n}" for n in names} <= set(monitor.lrs)


def test_lr_monitor_shows_one_curve_per_group_named_after_it(tmp_path):
    monitor = pl.callbacks.LearningRateMonitor(logging_interval="step")
    fit(make_net(), [FreezeThenUnfreeze(unfreeze_at_epoch=1), monitor], epochs=2, tmp_path=tmp_path)
    assert set(monitor.lrs) == {"lr-AdamW/net.0", "lr-AdamW/net.1", "lr-AdamW/net.2"}


def test_strategies_compose_in_any_order_with_the_same_trajectory():
    runs = []
    for order in (0, 1):
        strategies = [
            FreezeThenUnfreeze(head=1, unfreeze_at_epoch=1, encoder_lr_scale=0.5),
            DiscriminativeLR(decay=0.5),
            LRWarmup(warmup_steps=6, start_factor=0.1),
        ]
        recorder = LRRecorder()
        net = make_net(scheduler="CosineAnnealingLR")
        fit(net, [*(strategies if order == 0 else strategies[::-1]), recorder], epochs=3)
        runs.append((recorder.steps, net.state_dict()))
    (steps_a, weights_a), (steps_b, weights_b) = runs
    assert steps_a == steps_b
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key
    # The head ramps from step 0; net.1 ramps again from its unfreeze at step 4 (epoch 1),
    # at encoder_lr_scale * decay = 0.25 of the head's base LR.
    assert steps_a[0]["net.2"] == pytest.approx(0.01 * 0.1)
    head_factor, encoder_factor = 0.1 + 0.9 * 4 / 6, 0.1
    ratio = steps_a[4]["net.1"] / steps_a[4]["net.2"]
    assert ratio == pytest.approx(0.25 * encoder_factor / head_factor, rel=1e-9)


def test_unfrozen_norm_layers_train_again():
    net = make_net()
    fit(net, [FreezeThenUnfreeze(head=1, unfreeze_at_epoch=1)], epochs=2)
    assert net.net[0].norm.num_batches_tracked == 4  # frozen in epoch 0, trained in epoch 1


def test_gradual_unfreeze_adds_one_group_per_period():
    net = make_net()
    seen = []

    class Watch(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            weights = (net.net[0].linear.weight, net.net[1].linear.weight, net.net[2].weight)
            seen.append([w.requires_grad for w in weights])

    fit(net, [GradualUnfreeze(head=1, every_n_epochs=1), Watch()], epochs=3)
    assert seen == [[False, False, True], [False, True, True], [True, True, True]]


def test_two_freezing_schedules_conflict_at_fit_start():
    with pytest.raises(
        ValueError, match="Two freezing schedules.*FrozenEncoder, FreezeThenUnfreeze"
    ):
        fit(make_net(), [FrozenEncoder(), FreezeThenUnfreeze()], epochs=1)


def test_bad_arguments_name_the_offending_value():
    with pytest.raises(ValueError, match="unfreeze_at_epoch` an integer >= 0, but got -1"):
        FreezeThenUnfreeze(unfreeze_at_epoch=-1)
    with pytest.raises(ValueError, match="every_n_epochs` an integer >= 1, but got 2.5"):
        GradualUnfreeze(every_n_epochs=2.5)
    # a flag must be a flag: bool("off") is True, and Hydra passes `off` as a string
    with pytest.raises(ValueError, match="`cache_frozen` true or false, but got 'off'"):
        FrozenEncoder(cache_frozen="off")
    with pytest.raises(ValueError, match="`reset_optimizer_state` true or false"):
        FreezeThenUnfreeze(reset_optimizer_state="no")
    with pytest.raises(ValueError, match="`rewarm_on_unfreeze` true or false"):
        LRWarmup(rewarm_on_unfreeze=0)
    with pytest.raises(ValueError, match="decay` > 0, but got 0"):
        DiscriminativeLR(decay=0)
    with pytest.raises(ValueError, match="warmup_steps` an integer >= 0, but got -5"):
        LRWarmup(warmup_steps=-5)
    with pytest.raises(ValueError, match="head` >= 1, but got 0"):
        FrozenEncoder(head=0)
    with pytest.raises(ValueError, match=r"head=3` leaves no encoder group.*3 layer groups"):
        fit(make_net(), [FrozenEncoder(head=3)], epochs=1)
    with pytest.raises(ValueError, match=r"'net\.7' matches no module.*Available names"):
        fit(make_net(), [FrozenEncoder(groups=["net.0", "net.7"])], epochs=1)


@pytest.mark.parametrize("stop_at", [1, 2, 3])
def test_resume_at_any_epoch_matches_an_uninterrupted_run(tmp_path, stop_at):
    def strategies():
        return [
            FreezeThenUnfreeze(head=1, unfreeze_at_epoch=2, encoder_lr_scale=0.5),
            LRWarmup(warmup_steps=3, start_factor=0.2),
        ]

    whole = make_net(scheduler="CosineAnnealingLR")
    fit(whole, strategies(), epochs=4)

    first = make_net(scheduler="CosineAnnealingLR")
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(first, [*strategies(), checkpoint], epochs=stop_at)
    resumed = make_net(scheduler="CosineAnnealingLR")
    pl.seed_everything(0)
    trainer = quiet_trainer(
        max_epochs=4, callbacks=strategies(), deterministic=True, num_sanity_val_steps=0
    )
    trainer.fit(resumed, data(), data(16), ckpt_path=tmp_path / "last.ckpt")
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_metric_trigger_unfreezes_after_patience_validations_without_improvement():
    class Frozen(Net):  # lr 0: val_loss never improves after the first validation
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    torch.manual_seed(0)
    net = Frozen()
    seen = []

    class Watch(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(net.net[0].linear.weight.requires_grad)

    strategy = FreezeThenUnfreeze(head=1, monitor="val_loss", patience=1)
    fit(net, [strategy, Watch()], epochs=4)
    # epoch 0 sets the best, epoch 1 does not improve: phase 2 from epoch 2
    assert strategy.triggered_epoch == 2
    assert seen == [False, False, True, True]
    with pytest.raises(ValueError, match=r"`monitor='val_cer'` was not logged.*val_loss"):
        fit(make_net(), [FreezeThenUnfreeze(monitor="val_cer")], epochs=1)


def test_bn_train_keeps_frozen_groups_norm_statistics_updating():
    net = make_net()
    fit(net, [FrozenEncoder(head=1, bn="train")], epochs=1)
    assert net.net[0].norm.num_batches_tracked == 4  # statistics updated...
    fresh = make_net()
    assert torch.equal(net.net[0].linear.weight, fresh.net[0].linear.weight)  # ...weights not


def test_strategies_given_different_groups_are_refused():
    with pytest.raises(ValueError, match="were given different `groups`"):
        fit(
            make_net(),
            [FrozenEncoder(groups=["net.0", "net.[12]"]), DiscriminativeLR(groups=["net.*"])],
        )


def test_without_rewarm_thawed_groups_start_at_the_full_lr():
    recorder = LRRecorder()
    strategies = [
        FreezeThenUnfreeze(head=1, unfreeze_at_epoch=1, encoder_lr_scale=1.0),
        LRWarmup(warmup_steps=2, start_factor=0.5, rewarm_on_unfreeze=False),
    ]
    fit(make_net(), [*strategies, recorder], epochs=2)
    assert recorder.steps[4]["net.0"] == recorder.steps[4]["net.2"] == 0.01  # step 4: epoch 1


def test_metric_trigger_with_mode_max_waits_for_a_metric_that_stops_rising():
    class Rising(Net):
        def validation_step(self, batch, batch_idx):
            self.log("score", float(min(self.current_epoch, 1)))  # rises once, then flat

    torch.manual_seed(0)
    strategy = FreezeThenUnfreeze(head=1, monitor="score", mode="max", patience=1)
    fit(Rising(), [strategy], epochs=4)
    # epoch 0 sets the best (0), epoch 1 improves (1), epoch 2 does not: phase 2 at epoch 3
    assert strategy.triggered_epoch == 3


def test_two_step_resets_optimizer_state_at_the_thaw_and_stops_when_phase_2_plateaus():
    class Plateau(Net):  # lr 0 on SGD with momentum: val_loss never improves after epoch 0
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0, momentum=0.9)

    steps_in_state: list[int] = []

    class Watch(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            steps_in_state.append(len(trainer.optimizers[0].state))

    torch.manual_seed(0)
    strategy = FreezeThenUnfreeze(
        head=1, encoder_lr_scale=1.0, monitor="val_loss", patience=1,
        reset_optimizer_state=True, stop_patience=2,
    )  # fmt: skip
    trainer = fit(Plateau(), [strategy, Watch()], epochs=10)
    # epoch 0 sets the best, epoch 1 does not improve: phase 2 from epoch 2, whose first
    # validation sets phase 2's own best; epochs 3 and 4 do not improve: training stops
    # after epoch 4, long before 10 epochs
    assert strategy.triggered_epoch == 2 and trainer.current_epoch == 5
    # momentum buffers of the head (2 tensors) before the thaw, none right after it
    assert steps_in_state == [0, 2, 0, 10, 10]  # then buffers for all 10 parameters
    with pytest.raises(ValueError, match="`stop_patience` needs a `monitor`"):
        FreezeThenUnfreeze(stop_patience=2)


def test_testing_a_checkpoint_after_fit_leaves_the_flags_as_the_module_came(tmp_path):
    """A strategy's saved flags are for resuming a fit: ``trainer.test`` or ``validate``
    with a ``ckpt_path`` after fit loads them too, and must not freeze the module again."""
    net = make_net()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = fit(net, [FrozenEncoder(head=1), checkpoint], epochs=1)
    assert all(p.requires_grad for p in net.parameters())  # fit leaves them as they came
    trainer.validate(net, data(16), ckpt_path=tmp_path / "last.ckpt", verbose=False)
    assert all(p.requires_grad for p in net.parameters())
