"""A run too short for its strategy warns when training starts, naming the callback, the
numbers and what to change: LRWarmup longer than the run, GradualUnfreeze with fewer epochs
than its groups need."""

from __future__ import annotations

import warnings

import pytest
from tiny_models import Task, fit

from freezeft.callbacks import GradualUnfreeze, LRWarmup

pytestmark = pytest.mark.library  # runs where only torch and Lightning are installed

# Task("sequential").loaders(): 16 samples in batches of 4, so 4 optimizer steps per epoch;
# its groups are model.0, model.2 and model.4 (the head): two groups below the head


def warnings_of(name: str | tuple[str, ...], callbacks: list, **trainer) -> list[str]:
    """The warnings of the callback(s) ``name`` in a real fit of the tiny Sequential."""
    names = (name,) if isinstance(name, str) else name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(Task("sequential"), callbacks, **trainer)
    return [
        str(w.message) for w in caught if str(w.message).startswith(tuple(f"{n}:" for n in names))
    ]


def test_a_warmup_longer_than_the_run_warns_once():
    (message,) = warnings_of("LRWarmup", [LRWarmup(warmup_steps=8)], epochs=2)  # 8 steps
    assert "warmup_steps=8 is not shorter than the whole run (8 optimizer steps" in message
    assert "trainer.max_epochs=2" in message and "4 optimizer steps per epoch" in message
    assert "never reaches its full value (its last step uses 88% of it)" in message
    assert "Lower `warmup_steps`" in message and "train longer" in message


def test_a_warmup_cut_short_by_max_steps_warns():
    (message,) = warnings_of("LRWarmup", [LRWarmup(warmup_steps=8)], epochs=5, max_steps=6)
    assert "(6 optimizer steps: trainer.max_epochs=5, trainer.max_steps=6" in message


def test_a_warmup_that_ends_within_the_run_does_not_warn():
    assert warnings_of("LRWarmup", [LRWarmup(warmup_steps=7)], epochs=2) == []
    assert warnings_of("LRWarmup", [LRWarmup(warmup_steps=0)], epochs=1) == []


def test_gradual_unfreeze_with_too_few_epochs_names_the_groups_that_never_train():
    (message,) = warnings_of("GradualUnfreeze", [GradualUnfreeze(head=1)], epochs=2)
    assert "thawing its 2 groups below the head, one every 1 epoch(s), needs 3 epochs" in message
    assert "this run has 2 (trainer.max_epochs=2" in message
    assert "['model.0'] never train" in message
    assert "Set trainer.max_epochs >= 3, a smaller `every_n_epochs`" in message
    assert "more groups in `head`" in message
    (message,) = warnings_of(
        "GradualUnfreeze", [GradualUnfreeze(head=1, every_n_epochs=2)], epochs=2
    )
    # model.2 would join at epoch 2, model.0 at epoch 4: neither within epochs 0 and 1
    assert "needs 5 epochs" in message and "['model.2', 'model.0'] never train" in message


def test_gradual_unfreeze_cut_short_by_max_steps_warns():
    # 12 steps of 4 per epoch: 3 epochs started, although max_epochs would allow 10
    (message,) = warnings_of(
        "GradualUnfreeze", [GradualUnfreeze(head=1, every_n_epochs=2)], epochs=10, max_steps=12
    )
    assert "this run has 3 (trainer.max_epochs=10, trainer.max_steps=12" in message
    assert "(and trainer.max_steps to match)" in message


def test_gradual_unfreeze_with_enough_epochs_does_not_warn():
    assert warnings_of("GradualUnfreeze", [GradualUnfreeze(head=1)], epochs=3) == []
    # with LRWarmup (which then leads the hooks): neither warns
    both = [LRWarmup(warmup_steps=2), GradualUnfreeze(head=1)]
    assert warnings_of(("LRWarmup", "GradualUnfreeze"), both, epochs=3) == []
    (message,) = warnings_of(
        ("LRWarmup", "GradualUnfreeze"),
        [LRWarmup(warmup_steps=2), GradualUnfreeze(head=1)],
        epochs=2,
    )
    assert message.startswith("GradualUnfreeze: ")


def test_freeze_then_unfreeze_that_never_thaws_names_trainer_max_epochs():
    from freezeft.callbacks import FreezeThenUnfreeze

    (message,) = warnings_of(
        "FreezeThenUnfreeze", [FreezeThenUnfreeze(head=1, unfreeze_at_epoch=3)], epochs=2
    )
    assert "phase 2 (everything trains) never started: unfreeze_at_epoch=3 >= max_epochs" in message
    assert "python -m freezeft.run: trainer.max_epochs=5) or a smaller unfreeze_at_epoch" in message
    assert "protocol=converge" not in message  # no metric to wait for: more epochs is the fix
