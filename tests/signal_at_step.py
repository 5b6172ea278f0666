"""A test callback: the process sends itself a real signal at an exact point of a run.

Added to a run from the command line (``+callbacks.stop._target_=signal_at_step.SignalAtStep``),
it interrupts at a repeatable point instead of after a guessed delay: after training step
``step`` (``phase="train"``), or during the validation that follows it
(``phase="validation"``), or during the last test batch (``phase="test"``).

Where and how come from ``$SIGNAL_AT_STEP`` (``STEP:SIGNAL:PHASE``, e.g. ``12:SIGTERM:train``);
without it the callback does nothing. The resumed run names the same callback (a resume
must have the run's config, callbacks included) and leaves the variable unset.
"""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl


class SignalAtStep(pl.Callback):
    def __init__(self) -> None:
        step, name, phase = (os.environ.get("SIGNAL_AT_STEP") or "-1:SIGTERM:none").split(":")
        self.step = int(step)
        self.signum = getattr(signal, name)
        self.phase = phase

    def on_train_batch_end(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if self.phase == "train" and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)

    def on_validation_batch_start(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if self.phase == "validation" and not trainer.sanity_checking:
            if trainer.global_step == self.step:
                os.kill(os.getpid(), self.signum)

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx, *args) -> None:
        # the last test batch: Lightning finishes a loop's last batch whatever the signal
        if self.phase == "test" and batch_idx == trainer.num_test_batches[0] - 1:
            os.kill(os.getpid(), self.signum)
