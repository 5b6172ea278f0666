"""The examples in docstrings run, so they stay true."""

from __future__ import annotations

import doctest

import pytest

import freezeft.batching
import freezeft.groups
import freezeft.history
import freezeft.plan

MODULES = [freezeft.groups, freezeft.plan, freezeft.batching, freezeft.history]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert failures == 0
    assert tried > 0, f"{module.__name__} has no example"
