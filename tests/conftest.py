"""Shared fixtures: tiny real corpora, synthesised once per test session (the slow tier)
or committed (``german_mini``, the fast tier: no synthesis)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

TINY = dict(n_train=32, n_dev=8, n_test=8, vocabulary=200, max_words=2)
GERMAN_MINI = Path(__file__).parent / "data" / "german_mini"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker's torch takes its share of the cores (one each of two
    workers on two): workers of two threads each on two cores, or beside another process,
    spend most of their time waiting for each other. Subprocesses keep torch's default."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, (cores or 1) // int(workers)))


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


@pytest.fixture(scope="session")
def german_mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shortest 8 train, 4 dev and 2 test utterances of the tiny German corpus (real
    eSpeak speech, DeepSpeech format), committed in tests/data/german_mini (written by
    tests/data/make_german_mini.py): no synthesis. A copy, so no test can change the
    committed files."""
    return Path(shutil.copytree(GERMAN_MINI, tmp_path_factory.mktemp("data") / "german_mini"))
