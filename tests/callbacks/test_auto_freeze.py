"""AutoFreeze: freezes from the input side what stopped changing, as its formula says, never
the head; decisions survive resume bit for bit."""

from __future__ import annotations

import pytest
import torch
from tiny_models import Task, fit, quiet_trainer, snapshot
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from freezeft._lightning import pl
from freezeft.callbacks import AutoFreeze, DiscriminativeLR, LRWarmup

pytestmark = pytest.mark.library  # runs where only torch and Lightning are installed


class Settled(pl.LightningModule):
    """``first`` is a layer whose training signal has settled: its gradient is the same
    every step (a constant pull, independent of the data); ``body`` and ``head`` learn a
    regression, so their gradient norms keep changing."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(4, 4)
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)

    def layer_groups(self) -> list[str]:
        return ["first", "body", "head"]

    def training_step(self, batch, batch_idx):
        x, y = batch
        fit_loss = nn.functional.mse_loss(self.head(torch.tanh(self.body(x))), y)
        return fit_loss + 0.01 * self.first.weight.sum() + 0.0 * self.first(x).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def loaders(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=g)
        y = (x[:, :1] * 2 - x[:, 1:2]).sin()
        return (DataLoader(TensorDataset(x, y), batch_size=8),)


def test_a_settled_first_layer_is_frozen_first_and_a_learning_one_is_not():
    module = Settled()
    strategy = AutoFreeze(
        threshold=1e-6, check_every_n_steps=4, patience=1, min_epochs=0, after_plateau=False
    )
    trainer = fit(module, [strategy], epochs=3)
    assert [d["group"] for d in strategy.decisions] == ["first"]
    decision = strategy.decisions[0]
    assert decision["step"] == 8  # the second window: the first with a window before it
    assert decision["rate"] < 1e-6
    assert trainer.global_step == 24 and len(strategy.windows) == 6
    # body's rate stayed above the threshold every time it was the candidate
    assert strategy.windows[-1]["grad_norms"][0] is None  # frozen groups are not measured


def test_decisions_follow_the_formula_on_the_recorded_gradient_norms():
    module = Task("sequential", lr=0.05)
    strategy = AutoFreeze(
        threshold=0.3, check_every_n_steps=2, patience=2, min_epochs=1, after_plateau=False
    )
    fit(module, [strategy], epochs=6)
    expected, frozen, calm = [], 0, 0
    names = [g.name for g in strategy.groups]
    for before, now in zip(strategy.windows, strategy.windows[1:], strict=False):
        if frozen >= len(names) - 1 or now["epoch"] < 1:
            continue
        a, b = before["grad_norms"][frozen], now["grad_norms"][frozen]
        calm = calm + 1 if abs(b - a) / a < 0.3 else 0
        if calm == 2:
            expected.append((names[frozen], now["step"]))
            frozen, calm = frozen + 1, 0
    assert [(d["group"], d["step"]) for d in strategy.decisions] == expected
    assert expected, "the threshold should have frozen something in this run"


class Weights(pl.Callback):
    """The module's weights after every optimizer step, by global step."""

    def __init__(self) -> None:
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.at[trainer.global_step] = snapshot(pl_module)


def test_the_head_is_never_frozen_and_frozen_groups_stay_put():
    module = Task("sequential", lr=0.05)
    strategy = AutoFreeze(
        head=1, threshold=1e9, check_every_n_steps=2, patience=1, min_epochs=0, after_plateau=False
    )
    weights = Weights()
    fit(module, [strategy, weights], epochs=4)
    names = [g.name for g in strategy.groups]
    assert [d["group"] for d in strategy.decisions] == names[:-1]  # all but the head
    last = max(weights.at)
    for decision in strategy.decisions:
        prefix = decision["group"] + "."
        for step in range(decision["step"], last + 1):
            for key, value in weights.at[step].items():
                if key.startswith(prefix):
                    assert torch.equal(value, weights.at[decision["step"]][key]), (key, step)
    head = [k for k in weights.at[last] if k.startswith(names[-1] + ".")]
    assert head and not torch.equal(weights.at[last][head[0]], weights.at[last - 1][head[0]])


@pytest.mark.parametrize("stop_at", [1, 3])
def test_resume_mid_run_decides_as_an_uninterrupted_run(tmp_path, stop_at):
    def strategies():
        return [
            AutoFreeze(
                threshold=0.5,
                check_every_n_steps=3,
                patience=1,
                min_epochs=1,
                after_plateau=False,
            ),
            DiscriminativeLR(decay=0.5),
            LRWarmup(warmup_steps=3),
        ]

    whole = Task("sequential", lr=0.05)
    full = strategies()
    fit(whole, full, epochs=5)
    # stop after `stop_at` epochs (4 steps each: inside a window of 3 steps), then resume
    first = Task("sequential", lr=0.05)
    trainer = fit(first, strategies(), epochs=stop_at)
    trainer.save_checkpoint(tmp_path / "stop.ckpt")
    resumed = Task("sequential", lr=0.05)
    again = strategies()
    fit(resumed, again, epochs=5, ckpt_path=tmp_path / "stop.ckpt")
    assert full[0].decisions, "the threshold should have frozen something in this run"
    assert again[0].decisions == full[0].decisions
    assert again[0].windows == full[0].windows
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


class ScriptedDev(Task):
    """A task whose dev metric follows a script, one value per epoch (a plateau on cue)."""

    def __init__(self, script: list[float]) -> None:
        super().__init__("sequential", lr=0.05)
        self.script = script

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("val_score", self.script[self.current_epoch])


def LightningScriptedDev(script: list[float]):  # noqa: N802 (a class factory)
    """ScriptedDev as a ``lightning.pytorch`` module."""
    import lightning.pytorch as lightning

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.inner = ScriptedDev(script)

        def training_step(self, batch, batch_idx):
            return self.inner.loss_fn(self.inner.model, batch)

        def validation_step(self, batch, batch_idx):
            self.log("val_score", script[self.current_epoch])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.05)

    return Module()


# 4 steps per epoch; the metric improves for 3 validations, then stalls from epoch 3 on
PLATEAU_AT_3 = [0.5, 0.4, 0.3, 0.35, 0.32, 0.31, 0.33, 0.34]


@pytest.mark.parametrize("pace", [1, None])
def test_nothing_freezes_before_the_dev_metric_plateaus_then_pace_groups_per_validation(pace):
    module = ScriptedDev(PLATEAU_AT_3)
    strategy = AutoFreeze(
        monitor="val_score", threshold=1e9, check_every_n_steps=1, patience=1, min_epochs=0,
        pace=pace, plateau_patience=1,
    )  # fmt: skip
    fit(module, [strategy], epochs=7)
    assert strategy.plateau_epoch == 3
    names = [g.name for g in strategy.groups]
    assert [d["group"] for d in strategy.decisions] == names[:-1]  # all but the head, in order
    epochs = [d["epoch"] for d in strategy.decisions]
    # the gradient test held from the start, yet the first freeze waits for the plateau
    if pace == 1:
        assert epochs == list(range(4, 4 + len(epochs)))  # one per validation
    else:
        assert set(epochs) == {4}  # as fast as the gradient test allows
    assert [v["value"] for v in strategy.validations] == pytest.approx(PLATEAU_AT_3[:7])


def test_one_noisy_validation_is_no_plateau_two_in_a_row_are():
    # a bump at epoch 2, a new best at 3, then two validations without one (epochs 4, 5)
    module = ScriptedDev([0.5, 0.4, 0.45, 0.3, 0.32, 0.31, 0.33, 0.34])
    strategy = AutoFreeze(
        monitor="val_score", threshold=1e9, check_every_n_steps=1, patience=1, plateau_patience=2
    )
    fit(module, [strategy], epochs=8)
    assert strategy.plateau_epoch == 5
    assert min(d["epoch"] for d in strategy.decisions) == 6


def test_by_default_three_validations_without_a_new_best_make_the_plateau():
    # two-validation stalls (epochs 2-3, 5-6) are no plateau; the third in a row (epoch 9) is
    module = ScriptedDev([0.5, 0.4, 0.45, 0.42, 0.3, 0.32, 0.31, 0.2, 0.25, 0.22, 0.21, 0.23])
    strategy = AutoFreeze(monitor="val_score", threshold=1e9, check_every_n_steps=1, patience=1)
    fit(module, [strategy], epochs=12)
    assert strategy.plateau_epoch == 10
    assert [d["epoch"] for d in strategy.decisions] == [11]


def test_a_new_best_ends_the_plateau_and_freezing_waits_for_the_next(caplog):
    # a plateau at epoch 2, a new best at 3 (the layers still pay), the next plateau at 4
    module = ScriptedDev([0.5, 0.4, 0.45, 0.3, 0.35, 0.36, 0.37, 0.38])  # two groups to freeze
    strategy = AutoFreeze(
        monitor="val_score", threshold=1e9, check_every_n_steps=1, patience=1, min_epochs=0,
        plateau_patience=1,
    )  # fmt: skip
    with caplog.at_level("INFO"):
        fit(module, [strategy], epochs=7)
    assert [d["epoch"] for d in strategy.decisions] == [3, 5]  # none at 4, after the new best
    assert [d["plateau_epoch"] for d in strategy.decisions] == [2, 4]
    assert "epoch 3: val_score improved to 0.3: no more groups freeze until" in caplog.text


def test_the_monitor_and_its_mode_come_from_the_checkpoint_callback(tmp_path):
    module = ScriptedDev([0.1, 0.2, 0.3, 0.25, 0.28, 0.29])  # higher is better: stalls at 3
    strategy = AutoFreeze(
        threshold=1e9, check_every_n_steps=1, patience=1, min_epochs=0, plateau_patience=1
    )
    checkpoint = pl.callbacks.ModelCheckpoint(tmp_path, monitor="val_score", mode="max")
    fit(module, [strategy, checkpoint], epochs=6, enable_checkpointing=True)
    assert strategy.plateau_epoch == 3
    assert strategy.decisions and min(d["epoch"] for d in strategy.decisions) == 4


def test_the_monitor_is_found_on_a_lightning_package_checkpoint_too(tmp_path):
    lightning = pytest.importorskip("lightning.pytorch")
    module = ScriptedDev([0.1, 0.2, 0.3, 0.25, 0.28, 0.29])
    strategy = AutoFreeze(
        threshold=1e9, check_every_n_steps=1, patience=1, min_epochs=0, plateau_patience=1
    )
    checkpoint = lightning.callbacks.ModelCheckpoint(tmp_path, monitor="val_score", mode="max")
    trainer = quiet_trainer(
        lightning, max_epochs=6, callbacks=[strategy, checkpoint], enable_checkpointing=True,
        num_sanity_val_steps=0,
    )  # fmt: skip
    lightning.seed_everything(0)
    trainer.fit(LightningScriptedDev(module.script), *module.loaders())
    assert strategy.plateau_epoch == 3


class Sometimes(ScriptedDev):
    """Logs the dev metric at even epochs only: the odd validations leave the last value."""

    def validation_step(self, batch, batch_idx):
        Task.validation_step(self, batch, batch_idx)
        if self.current_epoch % 2 == 0:
            self.log("val_score", self.script[self.current_epoch])


def test_a_validation_that_did_not_log_the_metric_is_no_plateau():
    module = Sometimes([0.5, 0.0, 0.4, 0.0, 0.3, 0.0, 0.35, 0.0])  # stalls at epoch 6
    strategy = AutoFreeze(
        monitor="val_score", threshold=1e9, check_every_n_steps=1, patience=1, plateau_patience=1
    )
    fit(module, [strategy], epochs=8)
    assert [v["epoch"] for v in strategy.validations] == [0, 2, 4, 6]
    assert strategy.plateau_epoch == 6 and strategy.decisions[0]["epoch"] == 7


def test_validate_after_fit_leaves_the_decisions_alone():
    module = ScriptedDev([0.5, 0.4, 0.3, 0.3, 0.3])
    strategy = AutoFreeze(
        monitor="val_score", threshold=1e9, check_every_n_steps=1, patience=1, plateau_patience=1
    )
    trainer = fit(module, [strategy], epochs=3)  # improves at every validation
    trainer.validate(module, module.loaders()[1], verbose=False)  # epoch 3's value: 0.3
    assert strategy.plateau_epoch is None and len(strategy.validations) == 3


def test_nan_and_missing_validation_are_said():
    strategy = AutoFreeze(monitor="val_score", threshold=1e9, check_every_n_steps=1)
    with pytest.warns(UserWarning, match="'val_score', is NaN at epoch 0"):
        fit(ScriptedDev([float("nan")] * 3), [strategy], epochs=3)
    assert strategy.plateau_epoch is None and not strategy.decisions
    module = ScriptedDev(PLATEAU_AT_3)
    strategy = AutoFreeze(monitor="val_score", threshold=1e9, check_every_n_steps=1)
    with pytest.warns(UserWarning, match="no validation logged 'val_score' in this fit"):
        fit(module, [strategy], epochs=2, limit_val_batches=0)


def test_a_watched_metric_that_is_not_logged_is_named():
    strategy = AutoFreeze(monitor="val_nope", threshold=1e9, check_every_n_steps=1)
    with pytest.raises(ValueError, match=r"'val_nope', was not logged at the fit's first val"):
        fit(ScriptedDev(PLATEAU_AT_3), [strategy], epochs=2)


class FromEpochTwo(ScriptedDev):
    """Logs the dev metric from epoch 2 on only (computed once there is something to score)."""

    def validation_step(self, batch, batch_idx):
        Task.validation_step(self, batch, batch_idx)
        if self.current_epoch >= 2:
            self.log("val_score", self.script[self.current_epoch])


def test_a_metric_logged_from_a_later_epoch_on_needs_strict_false():
    script = [0.0, 0.0, 0.5, 0.4, 0.45, 0.46, 0.47, 0.48]  # from epoch 2; plateau at 4
    with pytest.raises(ValueError, match=r"strict=False\) if it logs it only from a later"):
        fit(FromEpochTwo(script), [AutoFreeze(monitor="val_score")], epochs=3)
    strategy = AutoFreeze(
        monitor="val_score", threshold=1e9, check_every_n_steps=1, patience=1,
        plateau_patience=1, strict=False,
    )  # fmt: skip
    fit(FromEpochTwo(script), [strategy], epochs=7)
    assert [v["epoch"] for v in strategy.validations] == [2, 3, 4, 5, 6]
    assert strategy.decisions[0]["epoch"] == 5 and strategy.decisions[0]["plateau_epoch"] == 4


def test_monitor_given_alone_takes_the_mode_of_a_checkpoint_watching_it(tmp_path):
    module = ScriptedDev([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])  # an accuracy: improving throughout
    strategy = AutoFreeze(
        monitor="val_score", threshold=1e9, check_every_n_steps=1, patience=1, min_epochs=0,
        plateau_patience=1,
    )  # fmt: skip
    checkpoint = pl.callbacks.ModelCheckpoint(tmp_path, monitor="val_score", mode="max")
    fit(module, [strategy, checkpoint], epochs=6, enable_checkpointing=True)
    assert strategy._watching == ("val_score", "max")
    assert not strategy.decisions  # as "min" every validation would have been a plateau


def test_early_stopping_that_ends_the_run_before_any_freeze_is_said():
    stopping = pl.callbacks.EarlyStopping(monitor="val_score", patience=3)
    with pytest.warns(UserWarning, match=r"EarlyStopping\(patience=3\).*nothing can freeze"):
        fit(ScriptedDev(PLATEAU_AT_3), [AutoFreeze(check_every_n_steps=1), stopping], epochs=1)


def test_a_window_longer_than_an_epoch_is_said():
    with pytest.warns(UserWarning, match=r"check_every_n_steps=50 optimizer steps is longer than"):
        fit(ScriptedDev(PLATEAU_AT_3), [AutoFreeze(monitor="val_score")], epochs=1)


@pytest.mark.parametrize("stop_at", [4, 6])
def test_resume_with_a_watched_dev_metric_decides_as_an_uninterrupted_run(tmp_path, stop_at):
    def strategies():
        return [
            AutoFreeze(
                monitor="val_score",
                threshold=1e9,
                check_every_n_steps=3,
                patience=1,
                plateau_patience=1,
            ),
        ]

    whole = ScriptedDev(PLATEAU_AT_3)
    full = strategies()
    fit(whole, full, epochs=7)
    first = ScriptedDev(PLATEAU_AT_3)
    trainer = fit(first, strategies(), epochs=stop_at)
    trainer.save_checkpoint(tmp_path / "stop.ckpt")
    resumed = ScriptedDev(PLATEAU_AT_3)
    again = strategies()
    fit(resumed, again, epochs=7, ckpt_path=tmp_path / "stop.ckpt")
    assert len(full[0].decisions) >= 2, "the run should have frozen groups after the plateau"
    assert again[0].decisions == full[0].decisions
    assert again[0].validations == full[0].validations
    assert again[0].plateau_epoch == full[0].plateau_epoch == 3
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_bad_arguments_say_which():
    with pytest.raises(ValueError, match="threshold"):
        AutoFreeze(threshold=0)
    with pytest.raises(ValueError, match="pace"):
        AutoFreeze(pace=0)
    with pytest.raises(ValueError, match="mode"):
        AutoFreeze(mode="best")
    with pytest.raises(ValueError, match="`strict` true or false"):
        AutoFreeze(strict="no")
    with pytest.raises(ValueError, match="after_plateau"):
        AutoFreeze(after_plateau="no")
    with pytest.raises(ValueError, match="plateau_patience"):
        AutoFreeze(plateau_patience=0)
    with pytest.raises(ValueError, match="check_every_n_steps"):
        AutoFreeze(check_every_n_steps=0)
    with pytest.raises(ValueError, match="patience"):
        AutoFreeze(patience=0)


def test_without_a_dev_metric_it_warns_and_freezes_on_gradients_alone():
    strategy = AutoFreeze(threshold=1e9, check_every_n_steps=1, patience=1, min_epochs=0)
    with pytest.warns(UserWarning, match="no dev metric to watch"):
        fit(Task("sequential", lr=0.05), [strategy], epochs=2)
    assert strategy.decisions and strategy.decisions[0]["epoch"] == 0


def test_groups_the_user_froze_are_passed_over_and_a_new_fit_starts_unfrozen():
    module = Task("sequential", lr=0.05)
    module.model[0].requires_grad_(False)  # as peft leaves the embeddings: nothing to train
    strategy = AutoFreeze(
        threshold=1e9, check_every_n_steps=2, patience=1, min_epochs=0, after_plateau=False
    )
    fit(module, [strategy], epochs=2)
    names = [g.name for g in strategy.groups]
    assert [d["group"] for d in strategy.decisions] == names[1:-1]
    assert all(w["grad_norms"][0] is None for w in strategy.windows)
    assert not module.model[0].weight.requires_grad  # still the user's
    fit(module, [strategy], epochs=1)  # the same callback in a new fit: a fresh start
    assert strategy.windows[0]["step"] == 2 and strategy.decisions[0]["step"] == 4
