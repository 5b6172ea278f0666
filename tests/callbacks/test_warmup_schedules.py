"""LRWarmup on top of the user's own schedule: at every optimizer step the LR used is the
scheduler's own LR (from the same run without freezeft) times the warmup factor, as
absolute values, for step and epoch schedulers, re-warms, accumulation and resume."""

from __future__ import annotations

import pytest
import torch
from tiny_models import LRRecorder, Task, fit
from torch.optim import lr_scheduler

from freezeft._lightning import pl
from freezeft.callbacks import FreezeThenUnfreeze, GradualUnfreeze, LRWarmup, NaiveTransfer

pytestmark = pytest.mark.library  # runs where only torch and Lightning are installed

STEPS = 4 * 4  # 4 epochs of 4 batches

#: name -> (scheduler factory, interval)
SCHEDULES = {
    "LambdaLR": (lambda o: lr_scheduler.LambdaLR(o, lambda s: 0.5**s), "step"),
    "LinearLR": (lambda o: lr_scheduler.LinearLR(o, 0.5, 1.0, total_iters=5), "step"),
    "CosineAnnealingLR": (lambda o: lr_scheduler.CosineAnnealingLR(o, STEPS), "step"),
    "OneCycleLR": (lambda o: lr_scheduler.OneCycleLR(o, 0.02, total_steps=STEPS), "step"),
    "StepLR": (lambda o: lr_scheduler.StepLR(o, step_size=1, gamma=0.5), "epoch"),
    "SequentialLR": (
        lambda o: lr_scheduler.SequentialLR(
            o,
            [
                lr_scheduler.LinearLR(o, 0.2, 1.0, total_iters=3),
                lr_scheduler.ExponentialLR(o, 0.9),
            ],
            milestones=[3],
        ),
        "step",
    ),
    "ReduceLROnPlateau": (
        lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0),
        "epoch",
    ),
}


class Scheduled(Task):
    """The plain Sequential with one of :data:`SCHEDULES`; ReduceLROnPlateau follows a
    constant metric, so it reduces at the same epochs with and without warmup."""

    def __init__(self, schedule: str) -> None:
        super().__init__("sequential")
        self.schedule = schedule

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("constant", 1.0)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)
        make, interval = SCHEDULES[self.schedule]
        config = {"scheduler": make(optimizer), "interval": interval, "monitor": "constant"}
        return {"optimizer": optimizer, "lr_scheduler": config}


def ramp(step: int, start: int = 0, steps: int = 6, factor: float = 0.25) -> float:
    """LRWarmup's documented factor: linear from ``factor`` to 1 over ``steps`` steps."""
    return factor + (1 - factor) * min(1.0, max(0, step - start) / steps)


def reference(schedule: str, **kwargs) -> list[float]:
    """The LR of each optimizer step of the same run without freezeft."""
    recorder = LRRecorder()
    fit(Scheduled(schedule), [recorder], epochs=4, **kwargs)
    return [step["0"] for step in recorder.steps]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_step_uses_the_schedules_lr_times_the_ramp(schedule):
    theirs = reference(schedule)
    recorder = LRRecorder()
    fit(Scheduled(schedule), [LRWarmup(warmup_steps=6, start_factor=0.25), recorder], epochs=4)
    assert len(recorder.steps) == len(theirs) == STEPS
    for step, (ours, lr) in enumerate(zip(recorder.steps, theirs, strict=True)):
        for group, used in ours.items():
            assert used == pytest.approx(lr * ramp(step), rel=1e-12, abs=0), (step, group)


def test_the_issues_lambda_schedule_gives_schedule_times_ramp_not_the_ramp_alone():
    recorder = LRRecorder()
    fit(Scheduled("LambdaLR"), [LRWarmup(warmup_steps=4, start_factor=0.25), recorder], epochs=2)
    used = [step["model.0"] for step in recorder.steps[:5]]
    assert used == pytest.approx([0.0025, 0.00219, 0.00156, 0.00102, 0.000625], abs=1e-5)


def test_groups_thawed_later_ramp_again_on_top_of_the_schedule():
    theirs = reference("CosineAnnealingLR")
    recorder = LRRecorder()
    strategies = [
        FreezeThenUnfreeze(head=1, unfreeze_at_epoch=1, encoder_lr_scale=0.5),
        LRWarmup(warmup_steps=6, start_factor=0.25),
    ]
    fit(Scheduled("CosineAnnealingLR"), [*strategies, recorder], epochs=4)
    for step, (ours, lr) in enumerate(zip(recorder.steps, theirs, strict=True)):
        assert ours["model.4"] == pytest.approx(lr * ramp(step), rel=1e-12)
        if step >= 4:  # thawed at epoch 1 = optimizer step 4: a new ramp from there
            assert ours["model.0"] == pytest.approx(0.5 * lr * ramp(step, start=4), rel=1e-12)


def test_gradient_accumulation_ramps_over_optimizer_steps():
    theirs = reference("LambdaLR", accumulate_grad_batches=2)
    recorder = LRRecorder()
    warmup = LRWarmup(warmup_steps=6, start_factor=0.25)
    fit(Scheduled("LambdaLR"), [warmup, recorder], epochs=4, accumulate_grad_batches=2)
    assert len(recorder.steps) == len(theirs) == STEPS // 2
    for step, (ours, lr) in enumerate(zip(recorder.steps, theirs, strict=True)):
        assert ours["model.2"] == pytest.approx(lr * ramp(step), rel=1e-12)


def test_resume_mid_ramp_continues_the_same_lrs(tmp_path):
    def strategies():
        return [GradualUnfreeze(head=1, every_n_epochs=1), LRWarmup(warmup_steps=6)]

    whole = LRRecorder()
    fit(Scheduled("CosineAnnealingLR"), [*strategies(), whole], epochs=4)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(
        Scheduled("CosineAnnealingLR"),
        [*strategies(), checkpoint],
        epochs=1,
        enable_checkpointing=True,
    )
    resumed = LRRecorder()
    fit(Scheduled("CosineAnnealingLR"), [*strategies(), resumed], epochs=4,
        ckpt_path=tmp_path / "last.ckpt")  # fmt: skip
    assert resumed.steps == whole.steps[4:]


def test_resume_from_a_checkpoint_after_an_epochs_last_batch_keeps_the_schedule(tmp_path):
    """A step checkpoint at the end of an epoch: Lightning resumes without calling
    on_train_epoch_start for the next epoch; the thaw and the re-warm still happen."""

    def strategies():
        return [GradualUnfreeze(head=1, every_n_epochs=1), LRWarmup(warmup_steps=6)]

    whole, whole_lrs = Scheduled("CosineAnnealingLR"), LRRecorder()
    fit(whole, [*strategies(), whole_lrs], epochs=4)
    every_4 = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    fit(Scheduled("CosineAnnealingLR"), [*strategies(), every_4], epochs=1,
        enable_checkpointing=True)  # fmt: skip
    (step_checkpoint,) = tmp_path.glob("*step=4.ckpt")
    resumed, lrs = Scheduled("CosineAnnealingLR"), LRRecorder()
    fit(resumed, [*strategies(), lrs], epochs=4, ckpt_path=step_checkpoint)
    assert lrs.steps == whole_lrs.steps[4:]
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_timm_schedulers_drive_every_group():
    pytest.importorskip("timm")
    from timm.scheduler import CosineLRScheduler

    class TimmScheduled(Scheduled):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)
            schedule = CosineLRScheduler(
                optimizer, t_initial=STEPS, warmup_t=3, warmup_lr_init=1e-4, t_in_epochs=False
            )
            config = {"scheduler": schedule, "interval": "step"}
            return {"optimizer": optimizer, "lr_scheduler": config}

        def lr_scheduler_step(self, scheduler, metric):  # timm's documented Lightning idiom
            scheduler.step_update(num_updates=self.global_step)

    plain = LRRecorder()
    fit(TimmScheduled("CosineAnnealingLR"), [plain], epochs=4)
    ours = LRRecorder()
    fit(TimmScheduled("CosineAnnealingLR"), [NaiveTransfer(), ours], epochs=4)
    for step, (mine, theirs) in enumerate(zip(ours.steps, plain.steps, strict=True)):
        assert list(mine.values()) == pytest.approx([theirs["0"]] * 3, rel=1e-12), step
    assert len({step["0"] for step in plain.steps}) > 10  # the schedule moved
