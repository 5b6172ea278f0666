"""Shared fixtures: a tiny real corpus synthesised once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TINY = dict(n_train=32, n_dev=8, n_test=8, vocabulary=200, max_words=2)


@pytest.fixture(scope="session")
def tiny() -> dict:
    """Settings of the tiny test corpora."""
    return dict(TINY)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for the session, shared with subprocess runs and, under
    pytest-xdist, with the other workers: freezeft's own cache locks let one process
    build each corpus and source model while the others wait for it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's base is in the session's
        root = root.parent
    path = root / "cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def german_corpus(cache_dir: Path) -> Path:
    """A tiny German corpus (real eSpeak speech) in DeepSpeech format."""
    from freezeft.speech.corpus import SynthCorpus  # the speech extra: imported when used

    return SynthCorpus(language="de", cache_dir=str(cache_dir), **TINY).build()


@pytest.fixture(scope="session")
def english_corpus(cache_dir: Path) -> Path:
    """A tiny English corpus (real eSpeak speech) in DeepSpeech format."""
    from freezeft.speech.corpus import SynthCorpus

    return SynthCorpus(language="en", cache_dir=str(cache_dir), **TINY).build()
