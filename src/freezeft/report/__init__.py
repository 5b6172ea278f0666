"""``python -m freezeft.report <sweep dir>``: the entry point and the earlier import path of
the app's sweep report, :mod:`freezeft.app.report`."""

from freezeft.app.report import *  # noqa: F403
from freezeft.app.report import __all__ as _all
from freezeft.app.report import main

__all__ = [*_all, "main"]
