"""Transfer-learning strategies as Lightning callbacks."""

from freezeft.callbacks.base import StrategyCallback
from freezeft.callbacks.naive import NaiveTransfer

__all__ = ["StrategyCallback", "NaiveTransfer"]
