"""The user's own choices hold: parameters they froze are never trained, optimizers over
``requires_grad`` parameters only still train what a strategy thaws, toggle_optimizer on a
frozen group says what is wrong, and resumed runs find their groups by name."""

from __future__ import annotations

import pytest
import torch
from tiny_models import LRRecorder, Task, changed, fit, snapshot
from torch.optim import lr_scheduler

from freezeft._lightning import pl
from freezeft.callbacks import (
    DiscriminativeLR,
    FreezeThenUnfreeze,
    FrozenEncoder,
    GradualUnfreeze,
    LRWarmup,
    NaiveTransfer,
)

pytestmark = pytest.mark.library  # runs where only torch and Lightning are installed


def test_naive_transfer_never_trains_a_parameter_the_user_froze():
    task = Task("sequential")
    task.model[2].bias.requires_grad_(False)
    before = snapshot(task)
    fit(task, [NaiveTransfer()])
    assert changed(before, task) == {n for n in before if n != "model.2.bias"}
    assert not task.model[2].bias.requires_grad


def test_frozen_encoder_trains_the_head_but_not_its_user_frozen_bias():
    task = Task("sequential")
    task.model[4].bias.requires_grad_(False)
    before = snapshot(task)
    fit(task, [FreezeThenUnfreeze(head=1, unfreeze_at_epoch=5)])
    assert changed(before, task) == {"model.4.weight"}
    flags = {n: p.requires_grad for n, p in task.named_parameters()}
    assert flags == {n: n != "model.4.bias" for n in flags}  # as before fit


def test_group_table_shows_user_frozen_parameters(caplog):
    task = Task("sequential")
    task.model[0].requires_grad_(False)
    with caplog.at_level("INFO"):
        fit(task, [FrozenEncoder(head=1)], epochs=1)
    table = next(r.getMessage() for r in caplog.records if "layer groups" in r.getMessage())
    assert "user-frozen" in table
    assert "84 frozen by you before fit, never trained" in table


@pytest.mark.parametrize("strategy", ["freeze_then_unfreeze", "gradual_unfreeze"])
def test_optimizer_over_requires_grad_params_trains_what_is_thawed_like_a_full_one(strategy):
    def strategies():
        thaw = (
            FreezeThenUnfreeze(head=1, unfreeze_at_epoch=1, encoder_lr_scale=0.5)
            if strategy == "freeze_then_unfreeze"
            else GradualUnfreeze(head=1, every_n_epochs=1)
        )
        return [thaw, DiscriminativeLR(decay=0.5), LRWarmup(warmup_steps=3)]

    def schedule(optimizer):
        return lr_scheduler.LambdaLR(optimizer, lambda s: 0.9**s)

    runs = {}
    for filtered in (False, True):
        task, recorder = Task("sequential", filtered=filtered, scheduler=schedule), LRRecorder()
        before = snapshot(task)
        trainer = fit(task, [*strategies(), recorder], epochs=3)
        runs[filtered] = (task.state_dict(), recorder.steps)
        assert changed(before, task) == set(before)  # the encoder trained after the thaw
    full, filtered = runs[False], runs[True]
    for key, value in full[0].items():
        assert torch.equal(value, filtered[0][key]), key  # bit-identical to the full optimizer
    # the added groups are driven by the user's scheduler like the head's group
    for ours, theirs in zip(filtered[1], full[1], strict=True):
        assert {k.split("/")[0]: v for k, v in ours.items()} == theirs
    assert {g["name"] for g in trainer.optimizers[0].param_groups} == {
        "model.0", "model.2", "model.4"
    }  # fmt: skip


class HeadOnly(Task):
    """An optimizer over the head alone, biases without weight decay (``full=False``), or
    over every parameter split the same way (``full=True``)."""

    def __init__(self, full: bool) -> None:
        super().__init__(
            "sequential", scheduler=lambda o: lr_scheduler.LambdaLR(o, lambda s: 0.9**s)
        )
        self.full = full

    def configure_optimizers(self):
        params = self.named_parameters() if self.full else self.model[4].named_parameters()
        weights, biases = [], []
        for name, param in params:
            (biases if name.endswith("bias") else weights).append(param)
        groups = [{"params": weights, "weight_decay": 0.5}, {"params": biases, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=0.01)
        return {"optimizer": optimizer, "lr_scheduler": self.make_scheduler(optimizer)}


def test_parameters_in_no_optimizer_join_the_param_group_of_their_kind():
    runs = {}
    for full in (True, False):
        task, recorder = HeadOnly(full), LRRecorder()
        trainer = fit(task, [FreezeThenUnfreeze(head=1, unfreeze_at_epoch=1), recorder], epochs=2)
        runs[full] = task, recorder.steps, trainer.optimizers[0].param_groups
    (full, full_lrs, _), (head_only, lrs, groups) = runs[True], runs[False]
    decay = {g["name"]: g["weight_decay"] for g in groups}
    assert decay == {
        "model.4/pg1": 0.5, "model.4/pg2": 0.0,
        "model.0/added-pg1": 0.5, "model.2/added-pg1": 0.5,  # weights
        "model.0/added-pg2": 0.0, "model.2/added-pg2": 0.0,  # biases
    }  # fmt: skip
    for key, value in full.state_dict().items():
        assert torch.equal(value, head_only.state_dict()[key]), key  # as if given everything
    for ours, theirs in zip(lrs, full_lrs, strict=True):  # the user's LambdaLR drives all
        assert {k.split("/")[0]: v for k, v in ours.items()} == {
            k.split("/")[0]: v for k, v in theirs.items()
        }


def test_filtered_optimizer_resumes_bit_identically(tmp_path):
    def strategies():
        return [FreezeThenUnfreeze(head=1, unfreeze_at_epoch=2)]

    whole = Task("sequential", filtered=True)
    fit(whole, strategies(), epochs=3)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(Task("sequential", filtered=True), [*strategies(), checkpoint], epochs=1,
        enable_checkpointing=True)  # fmt: skip
    resumed = Task("sequential", filtered=True)
    fit(resumed, strategies(), epochs=3, ckpt_path=tmp_path / "last.ckpt")
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_an_optimizer_that_cannot_take_param_groups_is_refused_at_fit_start():
    class WithLBFGS(Task):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters())

    with pytest.raises(ValueError, match="cannot use torch.optim.LBFGS: it supports a single"):
        fit(WithLBFGS("sequential"), [FrozenEncoder()], epochs=1)


class TwoOptimizers(Task):
    """GAN-style manual optimization: one optimizer for the encoder, one for the head."""

    def __init__(self) -> None:
        super().__init__("sequential")
        self.automatic_optimization = False

    def configure_optimizers(self):
        encoder = [*self.model[0].parameters(), *self.model[2].parameters()]
        return [torch.optim.SGD(encoder, lr=0.1), torch.optim.SGD(self.model[4].parameters())]

    def training_step(self, batch, batch_idx):
        for optimizer in self.optimizers():
            self.toggle_optimizer(optimizer)
            loss = self.loss_fn(self.model, batch)
            self.manual_backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            self.untoggle_optimizer(optimizer)


def test_toggle_optimizer_on_a_frozen_group_gets_a_freezeft_error():
    with pytest.raises(RuntimeError, match=r"freezeft: the loss .* Frozen now: \['model.0', "):
        fit(TwoOptimizers(), [FrozenEncoder(head=1)], epochs=1)


class Uncompiled(Task):
    """Resumes a checkpoint of a torch.compile'd model, as users do: ``_orig_mod`` stripped."""

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k.replace("_orig_mod.", ""): v for k, v in state.items()}


def test_resume_matches_groups_through_torch_compile_names(tmp_path, recwarn):
    def strategies():
        return [FreezeThenUnfreeze(head=1, unfreeze_at_epoch=1), LRWarmup(warmup_steps=3)]

    whole = LRRecorder()
    fit(Task("sequential"), [*strategies(), whole], epochs=2)
    compiled = Task("sequential")
    compiled.model = torch.compile(compiled.model, backend="eager")
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(compiled, [*strategies(), checkpoint], epochs=1, enable_checkpointing=True)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    assert "'model._orig_mod.0': False" in str(saved)

    resumed, recorder = Uncompiled("sequential"), LRRecorder()
    fit(resumed, [*strategies(), recorder], epochs=2, ckpt_path=tmp_path / "last.ckpt")
    assert not [w for w in recwarn if "layer groups do not match" in str(w.message)]
    # the encoder thaws at epoch 1 as saved, so it ramps up again as in the whole run
    # (the optimizer state loaded from the checkpoint keeps the compiled names)
    assert [list(s.values()) for s in recorder.steps] == [list(s.values()) for s in whole.steps[4:]]
    assert list(recorder.steps[0].values())[0] == pytest.approx(0.01 * 0.1 * 0.01)


def test_resume_with_other_groups_warns_naming_them(tmp_path):
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(Task("sequential"), [FrozenEncoder(head=1), checkpoint], epochs=1,
        enable_checkpointing=True)  # fmt: skip
    resumed = Task("sequential")
    groups = ["model.[0]", "model.2", "model.4"]
    match = r"saved \['model.0'\] are not groups now, and \['model.\[0\]'\] were not saved"
    with pytest.warns(UserWarning, match=match):
        fit(resumed, [FrozenEncoder(head=1, groups=groups)], ckpt_path=tmp_path / "last.ckpt")


class FreezesInSetup(Task):
    """Freezes a layer in ``setup()`` (not ``__init__``), as some projects do."""

    def setup(self, stage):
        self.model[0].requires_grad_(False)


def test_parameters_frozen_in_the_modules_setup_are_never_trained():
    task = FreezesInSetup("sequential")
    before = snapshot(task)
    fit(task, [GradualUnfreeze(head=1, every_n_epochs=1), LRWarmup(warmup_steps=2)], epochs=3)
    assert not {k for k in changed(before, task) if k.startswith("model.0")}
    assert not any(p.requires_grad for p in task.model[0].parameters())


class BuiltInConfigureModel(Task):
    """Builds its layers in ``configure_model()``, Lightning's hook for large models."""

    def __init__(self) -> None:
        super().__init__("sequential")
        self.model = None

    def configure_model(self):
        if self.model is None:
            torch.manual_seed(0)
            self.model = torch.nn.Sequential(
                torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3)
            )


def test_a_model_built_in_configure_model_gets_its_groups():
    task = BuiltInConfigureModel()
    trainer = fit(task, [FrozenEncoder(head=1)], epochs=1)
    assert [g.name for g in trainer.callbacks[0].groups] == ["model.0", "model.2"]


def test_an_optimizer_without_a_numeric_lr_is_refused_for_lr_strategies():
    pytest.importorskip("transformers")
    from transformers.optimization import Adafactor

    class WithAdafactor(Task):
        def configure_optimizers(self):
            return Adafactor(self.parameters(), lr=None, relative_step=True, warmup_init=True)

    with pytest.raises(ValueError, match="Adafactor has a param group without a numeric `lr`"):
        fit(WithAdafactor("sequential"), [LRWarmup(warmup_steps=2)], epochs=1)
    fit(WithAdafactor("sequential"), [FrozenEncoder(head=1)], epochs=1)  # no LR change: fine


def test_norm_layers_left_out_of_explicit_groups_stay_frozen_with_their_weights():
    task = Task("resnet18")
    before = snapshot(task)
    fit(task, [FrozenEncoder(head=1, groups=["model.layer*", "model.fc"])], epochs=1)
    assert {k for k in changed(before, task) if not k.startswith("model.fc")} == set()


def test_one_callback_serves_two_fits_with_a_plan_each():
    strategy = FrozenEncoder(head=1)
    first, second = Task("sequential"), Task("sequential")
    fit(first, [strategy], epochs=1)
    before = snapshot(second)
    fit(second, [strategy], epochs=1)
    assert changed(before, second) == {"model.4.weight", "model.4.bias"}
    assert strategy.groups[0].params["model.0.weight"] is second.model[0].weight
