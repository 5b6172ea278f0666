"""The app's task contract under its earlier import path: :mod:`freezeft.app.task`."""

from freezeft.app.task import *  # noqa: F403
from freezeft.app.task import __all__ as __all__
