"""Checkpoint helpers under their earlier name: :mod:`freezeft.checkpoint_io` (atomic
writes, safe reading) and :mod:`freezeft.interrupt` (the Ctrl+C checkpoint). Run dirs and
resume moved to the app (:mod:`freezeft.app.run_dir`)."""

from freezeft.checkpoint_io import (
    AtomicCheckpointIO,
    check_checkpoint_fits,
    load_checkpoint,
    read_checkpoint_file,
)
from freezeft.interrupt import INTERRUPTED_CHECKPOINT, InterruptCheckpoint, reroot_checkpoint_states

__all__ = [
    "AtomicCheckpointIO",
    "INTERRUPTED_CHECKPOINT",
    "InterruptCheckpoint",
    "check_checkpoint_fits",
    "load_checkpoint",
    "read_checkpoint_file",
    "reroot_checkpoint_states",
]
