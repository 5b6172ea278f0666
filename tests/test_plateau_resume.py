"""A plateau schedule (DeepSpeech's --reduce_lr_on_plateau, the default model's) goes on
after a resume exactly as if the run had never stopped.

Lightning does not step ``ReduceLROnPlateau`` at the end of an epoch it resumed, and its
end-of-epoch checkpoints are written before that epoch's step: without freezeft's
:class:`InterruptCheckpoint` a resumed run is one LR reduction behind from then on.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException
from tiny_models import LRRecorder, Task, fit

from freezeft.interrupt import INTERRUPTED_CHECKPOINT, InterruptCheckpoint

EPOCHS = 6  # 4 steps each


class Plateau(Task):
    """The plain Sequential on a plateau schedule: its dev metric never improves after the
    first epoch, so with patience 1 the LR halves after epochs 2 and 4."""

    def __init__(self) -> None:
        super().__init__("sequential")

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("dev_error", 0.5)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=1)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "monitor": "dev_error"},
        }


class StopAfterStep(pl.Callback):
    """Stop after training step ``step``: gracefully (``SIGTERMException``, as Lightning
    does on SIGTERM) or dead (as after ``kill -9``: nothing more is written)."""

    def __init__(self, step: int, graceful: bool = True) -> None:
        self.step, self.graceful = step, graceful

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise SIGTERMException() if self.graceful else RuntimeError("killed")


def run(tmp_path, *extra, ckpt_path=None):
    recorder = LRRecorder()
    callbacks = [
        recorder,
        InterruptCheckpoint(tmp_path),
        ModelCheckpoint(dirpath=tmp_path, save_last=True),
        *extra,
    ]
    trainer = fit(Plateau(), callbacks, EPOCHS, ckpt_path, enable_checkpointing=True)
    return [step["0"] for step in recorder.steps], trainer


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    lrs, _ = run(tmp_path_factory.mktemp("whole"))
    assert lrs == [0.1] * 12 + [0.05] * 8 + [0.025] * 4
    return lrs


@pytest.mark.parametrize("step", [2, 6, 10, 14])  # in epochs 0, 1, 2 and 3
def test_sigterm_mid_epoch_then_resume_keeps_the_plateau_schedule(tmp_path, uninterrupted, step):
    with pytest.raises(SIGTERMException):
        run(tmp_path, StopAfterStep(step))
    lrs, trainer = run(tmp_path, ckpt_path=tmp_path / INTERRUPTED_CHECKPOINT)
    assert lrs == uninterrupted[step:]
    (config,) = trainer.lr_scheduler_configs
    assert config.scheduler.num_bad_epochs == 1  # epoch 5's: the count restarted after 4


@pytest.mark.parametrize("step", [8, 12, 16])  # the last batches of epochs 1, 2 and 3
def test_a_kill_then_resume_from_last_ckpt_keeps_the_plateau_schedule(
    tmp_path, uninterrupted, step
):
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path, StopAfterStep(step, graceful=False))
    # last.ckpt was written at the end of the epoch before, after its validation and
    # before the plateau scheduler stepped on it: resume replays the step it missed
    lrs, _ = run(tmp_path, ckpt_path=tmp_path / "last.ckpt")
    assert lrs == uninterrupted[step - 4 :]
