"""The released source model: used by transfer.source=auto only when it was made with the
run's very source settings and its checksum holds; otherwise the run pretrains and says why."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_module

from freezeft.app.release import CHECKPOINT, matching_release, release_folder, write_release
from freezeft.app.source import source_checkpoint_path, source_settings
from freezeft.checkpoint_io import read_checkpoint_file


def compose_with(*overrides: str):
    with initialize_config_module(config_module="freezeft.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def release(tmp_path):
    """A release of a real (tiny) Lightning-style checkpoint, made for the default settings."""
    cfg = compose_with(f"source.release={tmp_path / 'release'}", f"paths.cache_dir={tmp_path}")
    weights = {"layer.weight": torch.randn(3, 2), "layer.bias": torch.zeros(3)}
    full = tmp_path / "full.ckpt"
    torch.save(
        {"state_dict": weights, "hyper_parameters": {"labels": [" ", "a"]},
         "optimizer_states": [{"state": {0: torch.zeros(3, 2)}}], "epoch": 24},
        full,
    )  # fmt: skip
    results = {"headline": "test WER 0.9 CER 0.3", "cer": 0.3}
    write_release(release_folder(cfg), full, source_settings(cfg), results, "python -m x")
    return cfg, weights


def test_a_release_holds_weights_only_and_its_record(release):
    cfg, weights = release
    folder = release_folder(cfg)
    loaded = read_checkpoint_file(folder / CHECKPOINT)
    assert set(loaded) == {"state_dict", "hyper_parameters"}  # no optimizer or loop state
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in weights.items())
    record = json.loads((folder / "release.json").read_text())
    assert record["command"] == "python -m x" and record["torch"] == torch.__version__
    assert record["parameters"] == 9 and record["results"]["cer"] == 0.3
    assert record["bytes"] == (folder / CHECKPOINT).stat().st_size


def test_the_release_stands_in_for_pretraining_only_for_its_settings(release):
    cfg, _ = release
    used, why = matching_release(cfg, source_settings(cfg))
    assert used == release_folder(cfg) / CHECKPOINT and why is None
    assert source_checkpoint_path(cfg) == used  # a resumed run names the same source
    other = compose_with(f"source.release={release_folder(cfg)}", "source.max_epochs=3")
    used, why = matching_release(other, source_settings(other))
    assert used is None
    assert why == "this run's source settings differ from the release's: max_epochs 25 (wanted 3)"
    assert source_checkpoint_path(other).parent.parent.name == "source"  # the cache entry


def test_a_release_whose_checkpoint_was_changed_is_not_used(release):
    cfg, _ = release
    checkpoint = release_folder(cfg) / CHECKPOINT
    with checkpoint.open("r+b") as stream:
        stream.seek(-8, 2)
        stream.write(b"\0" * 8)
    used, why = matching_release(cfg, source_settings(cfg))
    assert used is None and "does not match its checksum" in why


def test_the_speech_task_ships_a_release_made_with_the_default_source_settings():
    """The default run and experiment=quick transfer from the shipped English release, with
    no pretraining: a change to the source settings (data, model, budget) fails here, until
    the release is made again (`python -m freezeft.app.release`)."""
    for overrides in ((), ("experiment=quick",)):
        cfg = compose_with(*overrides)
        used, why = matching_release(cfg, source_settings(cfg))
        assert why is None, f"{why}: remake it with python -m freezeft.app.release"
        assert used.name == CHECKPOINT and used.parent.name == "english"
    record = json.loads((used.parent / "release.json").read_text())
    assert record["command"] == "python -m freezeft.app.release"
    assert record["bytes"] < 4 * 2**20  # what it adds to the wheel
