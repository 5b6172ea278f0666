"""A test callback: the process sends itself a real signal after a given training step.

Added to a run from the command line (``+callbacks.stop._target_=signal_at_step.SignalAtStep``),
it interrupts training at an exact, repeatable point instead of after a guessed delay.
"""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl


class SignalAtStep(pl.Callback):
    def __init__(self, step: int, name: str = "SIGTERM") -> None:
        self.step = step
        self.signum = getattr(signal, name)

    def on_train_batch_end(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
