"""A freezing schedule is data: every fit writes the schedule it followed, the Schedule
strategy runs any schedule file, and a fit's own schedule replays it exactly.

Real Trainers on a six-layer model named as DeepSpeech's layers (layer_1 .. layer_6)."""

from __future__ import annotations

import filecmp
import re
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import quiet_trainer
from torch import nn

from freezeft._lightning import pl
from freezeft.callbacks import (
    AutoFreeze,
    DiscriminativeLR,
    FreezeThenUnfreeze,
    GradualUnfreeze,
    LRWarmup,
    Schedule,
    ScheduleLog,
)
from freezeft.history import History, read_lr_schedule

pytestmark = pytest.mark.library

NAMES = [f"layer_{i}" for i in range(1, 7)]


class SixLayers(pl.LightningModule):
    def __init__(self, scheduler: bool = True) -> None:
        super().__init__()
        for name in NAMES:
            setattr(self, name, nn.Linear(8, 8 if name != "layer_6" else 2))
        self.scheduler = scheduler

    def layer_groups(self) -> list[str]:
        return list(NAMES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in NAMES[:-1]:
            x = torch.relu(getattr(self, name)(x))
        return self.layer_6(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=0.01)
        if not self.scheduler:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5),
        }


def loader() -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(48, 8, generator=generator), torch.randint(0, 2, (48,), generator=generator)
    )
    return torch.utils.data.DataLoader(data, batch_size=12)  # 4 steps per epoch


def fit(out: Path, strategies: list, epochs: int = 5, ckpt_path=None, model=None, last=None,
        extra=()):  # fmt: skip
    """A fit of ``SixLayers`` into ``out``; ``last``: a folder for an end-of-epoch
    ``last.ckpt`` (what a killed run leaves)."""
    pl.seed_everything(0)
    model = model or SixLayers()
    saving = [pl.callbacks.ModelCheckpoint(dirpath=last, save_last=True)] if last else []
    trainer = quiet_trainer(
        max_epochs=epochs,
        callbacks=[*strategies, History(out), ScheduleLog(out / "schedule.yaml"), *saving, *extra],
        enable_checkpointing=bool(last or extra),
    )
    trainer.fit(model, loader(), loader(), ckpt_path=ckpt_path)
    return model, trainer


STRATEGIES = {
    "gradual_unfreeze+discriminative_lr": lambda: [
        GradualUnfreeze(head=1, every_n_epochs=1),
        DiscriminativeLR(decay=0.5),
    ],
    "freeze_then_unfreeze+warmup": lambda: [
        FreezeThenUnfreeze(head=2, unfreeze_at_epoch=2, encoder_lr_scale=0.1),
        LRWarmup(warmup_steps=6),
    ],
    # a metric trigger that fires (max: the falling loss never improves), with a reset
    "freeze_then_unfreeze on a plateau": lambda: [
        FreezeThenUnfreeze(
            head=1, monitor="val_loss", mode="max", patience=1, reset_optimizer_state=True
        ),
    ],
    "auto_freeze": lambda: [
        AutoFreeze(head=1, threshold=0.5, check_every_n_steps=2, patience=1, min_epochs=0)
    ],
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_fits_own_schedule_replays_it_exactly(tmp_path, name):
    """The same LR for every group at every step (lr_schedule.csv byte for byte) and the
    same weights to the last bit, without the strategies, their statistics or add-ons."""
    first, _ = fit(tmp_path / "run", STRATEGIES[name]())
    written = yaml.safe_load((tmp_path / "run" / "schedule.yaml").read_text())
    assert written["groups"] == NAMES
    assert len(written["phases"]) >= 2, "the strategy changed nothing to replay"
    replay, _ = fit(tmp_path / "replay", [Schedule(tmp_path / "run" / "schedule.yaml")])
    assert filecmp.cmp(
        tmp_path / "run" / "lr_schedule.csv", tmp_path / "replay" / "lr_schedule.csv", shallow=False
    )
    for (key, a), b in zip(first.state_dict().items(), replay.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    again = yaml.safe_load((tmp_path / "replay" / "schedule.yaml").read_text())
    strip = lambda phases: [{k: v for k, v in p.items() if k != "trigger"} for p in phases]  # noqa: E731
    assert strip(again["phases"]) == strip(written["phases"])


def test_the_written_schedule_says_what_started_each_phase(tmp_path):
    fit(tmp_path, STRATEGIES["freeze_then_unfreeze on a plateau"]())
    phases = yaml.safe_load((tmp_path / "schedule.yaml").read_text())["phases"]
    assert phases[0] == {
        "epoch": 0, "step": 0, "train": ["layer_6"], "lr_scale": {"layer_6": 1.0},
        "trigger": {"fit_start": True},
    }  # fmt: skip
    # epoch 1's loss is no higher than epoch 0's (mode=max): patience 1 spent, phase 2 next
    assert phases[1]["epoch"] == 2 and phases[1]["step"] == 8 and phases[1]["train"] == NAMES
    assert phases[1]["lr_scale"] == {n: (1.0 if n == "layer_6" else 0.1) for n in NAMES}
    assert phases[1]["reset_optimizer"] is True
    plateau = phases[1]["trigger"]["on_plateau"]
    assert plateau["monitor"] == "val_loss" and plateau["patience"] == 1


HAND_WRITTEN = """
phases:
  - epoch: 0
    train: [layer_6]
  - epoch: 2
    train: [layer_5, layer_6]
  - epoch: 3
    train: ["*"]
    lr_scale: {"layer_[1-5]": 0.5}
"""


def test_the_hand_written_schedule_trains_what_it_says(tmp_path):
    """The issue's example: layer_5 frozen in epochs 0-1 and training from epoch 2;
    layer_1 frozen until epoch 3, then at half the head's LR."""
    path = tmp_path / "schedule.yaml"
    path.write_text(HAND_WRITTEN)
    pl.seed_everything(0)
    before = {k: v.clone() for k, v in SixLayers().state_dict().items()}  # as fit() makes it
    after = {e: fit(tmp_path / f"e{e}", [Schedule(path)], epochs=e)[0] for e in (2, 3, 4)}
    assert torch.equal(after[2].layer_5.weight, before["layer_5.weight"])  # epochs 0-1
    assert not torch.equal(after[2].layer_6.weight, before["layer_6.weight"])
    assert not torch.equal(after[3].layer_5.weight, before["layer_5.weight"])  # from epoch 2
    assert torch.equal(after[3].layer_1.weight, before["layer_1.weight"])  # until epoch 3
    assert not torch.equal(after[4].layer_1.weight, before["layer_1.weight"])
    lrs = read_lr_schedule(tmp_path / "e4")
    epochs, head, first = lrs["epoch"], lrs["layer_6"], lrs["layer_1"]
    assert all(lr == 0.0 for lr, e in zip(first, epochs, strict=True) if e < 3)  # frozen
    late = [(f, h) for f, h, e in zip(first, head, epochs, strict=True) if e >= 3]
    assert late and all(f == pytest.approx(0.5 * h) and h == pytest.approx(0.01) for f, h in late)


def test_the_group_table_says_when_a_later_phase_changes_the_lr_multipliers(tmp_path, caplog):
    """The hand-written schedule halves layer_1..5 from epoch 3: the table's 'LR x' (the
    first phase that trains each group: layer_5 at 1 from epoch 2) says it is not all."""
    path = tmp_path / "schedule.yaml"
    path.write_text(HAND_WRITTEN)
    with caplog.at_level("INFO"):
        fit(tmp_path / "run", [Schedule(path)], epochs=1)
    assert (
        "LR multipliers change from phase to phase ('LR x': the first phase that trains each "
        "group); schedule.yaml lists each phase's"
    ) in caplog.text
    caplog.clear()
    path.write_text("phases:\n  - {epoch: 0, train: [layer_6]}\n  - {epoch: 1, train: ['*']}\n")
    with caplog.at_level("INFO"):
        fit(tmp_path / "plain", [Schedule(path)], epochs=1)
    assert "layer groups" in caplog.text and "LR multipliers change" not in caplog.text


@pytest.mark.parametrize(
    "text, says",
    [
        ("phases:\n  - epoch: 0\n    train: [layer_9]\n", "phase 0: 'layer_9' is no layer group"),
        (
            "phases:\n  - {epoch: 0, train: [layer_6]}\n  - {epoch: 0, train: ['*']}\n",
            "phase 1: `epoch: 0` is not after the phase before",
        ),
        ("phases:\n  - {epoch: 0, train: []}\n", "phase 0: `train` is empty"),
        (
            "phases:\n  - {epoch: 0, train: [layer_6], lr: 2}\n",
            "phase 0: unknown key 'lr'",
        ),
        ("phasez: []\n", "unknown key 'phasez'"),
    ],
    ids=["unknown group", "out of order", "empty phase", "unknown key", "unknown top key"],
)
def test_a_bad_schedule_file_is_one_line_naming_file_phase_and_key_and_trains_nothing(
    tmp_path, text, says
):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    pl.seed_everything(0)
    model = SixLayers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as raised:
        fit(tmp_path / "run", [Schedule(path)], model=model)
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and says in message and "\n" not in message
    if "no layer group" in says:
        assert str(NAMES) in message  # the groups it has
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


PLATEAU = [
    {"epoch": 0, "train": ["layer_6"]},
    {"on_plateau": {"monitor": "val_loss", "patience": 1, "mode": "max"}, "train": ["*"],
     "lr_scale": {"layer_[1-5]": 0.5}, "reset_optimizer": True},
]  # fmt: skip


@pytest.mark.parametrize("stop_at", [1, 2, 3])
def test_a_schedule_resumes_bit_identically_mid_phase_and_at_a_transition(tmp_path, stop_at):
    """Stopped after epoch ``stop_at`` (before, at and after the plateau's phase change),
    then resumed from the checkpoint: the weights and the written schedule as in one run."""
    whole, _ = fit(tmp_path / "whole", [Schedule(phases=PLATEAU), LRWarmup(warmup_steps=3)])
    fit(
        tmp_path / "part",
        [Schedule(phases=PLATEAU), LRWarmup(warmup_steps=3)],
        epochs=stop_at,
        last=tmp_path / "checkpoints",
    )
    resumed, _ = fit(
        tmp_path / "part",
        [Schedule(phases=PLATEAU), LRWarmup(warmup_steps=3)],
        ckpt_path=tmp_path / "checkpoints" / "last.ckpt",
    )
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    one = yaml.safe_load((tmp_path / "whole" / "schedule.yaml").read_text())
    two = yaml.safe_load((tmp_path / "part" / "schedule.yaml").read_text())
    assert one == two and len(one["phases"]) == 2


def test_schedule_needs_a_path_or_phases():
    with pytest.raises(ValueError, match="either `path`.*or `phases`"):
        Schedule()
    with pytest.raises(FileNotFoundError, match="Schedule file .*missing.yaml does not exist"):
        Schedule("missing.yaml")


LR_ONLY = """
phases:
  - {epoch: 0, train: ["*"]}
  - {epoch: 2, train: ["*"], lr_scale: 0.5}
  - {epoch: 3, train: ["*"], lr_scale: {"layer_[1-3]": 0.25}, reset_optimizer: true}
"""

RESTORING = """
phases:
  - {epoch: 0, train: [layer_6]}
  - {epoch: 3, train: ["*"], lr_scale: 0.5, reset_optimizer: true, restore_best: true}
"""


@pytest.mark.parametrize("text", [LR_ONLY, RESTORING], ids=["lr-only phases", "restore_best"])
def test_a_schedules_own_written_schedule_replays_it(tmp_path, text):
    """Phases that change only LRs, and a phase that restores the best checkpoint, are
    written too: the Schedule's own schedule.yaml replays the Schedule's run."""
    (tmp_path / "plan.yaml").write_text(text)

    def best():  # the worst epoch is the best (mode=max): a restore changes the weights
        return [pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss",
                                             mode="max")]  # fmt: skip

    first, _ = fit(tmp_path / "a", [Schedule(tmp_path / "plan.yaml")], extra=best())
    written = yaml.safe_load((tmp_path / "a" / "schedule.yaml").read_text())
    assert len(written["phases"]) == text.count("epoch:")
    if "restore_best" in text:
        assert written["phases"][1]["restore_best"] is True
    else:
        assert written["phases"][2]["reset_optimizer"] is True
    for d in ("ckpt",):
        for f in (tmp_path / d).glob("*"):
            f.unlink()
    replay, _ = fit(tmp_path / "b", [Schedule(tmp_path / "a" / "schedule.yaml")], extra=best())
    assert filecmp.cmp(tmp_path / "a" / "lr_schedule.csv", tmp_path / "b" / "lr_schedule.csv",
                       shallow=False)  # fmt: skip
    for (key, a), b in zip(first.state_dict().items(), replay.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


@pytest.mark.parametrize(
    "make, says",
    [
        (lambda d: (d.mkdir(), d)[1], "is a folder, not a schedule file"),
        (lambda d: (d.write_text("- {epoch: 0, train: [layer_6]}\n"), d)[1], "a list, not a sch"),
        (lambda d: (d.write_text("phases: [\n  {epoch: 0\n"), d)[1], "not readable YAML (line"),
    ],
    ids=["a folder", "a bare list", "a YAML syntax error"],
)
def test_a_path_that_is_no_schedule_file_says_what_it_is(tmp_path, make, says):
    path = make(tmp_path / "plan.yaml")
    with pytest.raises(ValueError, match=re.escape(says)):
        Schedule(path)


def test_a_plateau_on_a_metric_the_validation_never_logs_is_refused_before_training(tmp_path):
    phases = [{"epoch": 0, "train": ["layer_6"]},
              {"on_plateau": {"monitor": "val_nope"}, "train": ["*"]}]  # fmt: skip
    pl.seed_everything(0)
    model = SixLayers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"'val_nope', which the validation does not log.*val_loss"
    ):
        fit(tmp_path, [Schedule(phases=phases)], model=model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_phases_the_fit_never_reaches_are_named_in_a_warning(tmp_path):
    late = [{"epoch": 0, "train": ["*"]}, {"epoch": 3, "train": ["layer_6"]}]
    with pytest.warns(
        UserWarning, match=r"phase\(s\) \[1\] start at epoch 3 or later.*max_epochs=4"
    ):
        fit(tmp_path, [Schedule(phases=late)], epochs=2)
