"""Transfer-learning strategies as Lightning callbacks; combine them in any order."""

from freezeft.callbacks.auto_freeze import AutoFreeze
from freezeft.callbacks.base import StrategyCallback
from freezeft.callbacks.discriminative_lr import DiscriminativeLR
from freezeft.callbacks.freeze_bottom import FreezeBottom
from freezeft.callbacks.freeze_then_unfreeze import FreezeThenUnfreeze
from freezeft.callbacks.frozen_encoder import FrozenEncoder
from freezeft.callbacks.gradual_unfreeze import GradualUnfreeze
from freezeft.callbacks.naive import NaiveTransfer
from freezeft.callbacks.schedule import Schedule
from freezeft.callbacks.schedule_log import ScheduleLog
from freezeft.callbacks.warmup import LRWarmup

__all__ = [
    "StrategyCallback",
    "NaiveTransfer",
    "FrozenEncoder",
    "FreezeBottom",
    "FreezeThenUnfreeze",
    "GradualUnfreeze",
    "AutoFreeze",
    "DiscriminativeLR",
    "LRWarmup",
    "Schedule",
    "ScheduleLog",
]
