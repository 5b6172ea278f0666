"""Build-once cache entries shared by runs and teammates: stale builds cleaned up, entries
readable by the group (umask), a read-only cache that lacks an entry named in the error, a
damaged entry (files deleted, cut short or added) named and rebuilt."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from freezeft import cache
from freezeft.cache import cached_entry, entry_damage, umask


def build(folder: Path) -> None:
    (folder / "data.txt").write_text("ok")


def test_a_killed_builds_leftovers_are_removed_by_the_next_build(tmp_path):
    entry = tmp_path / "corpus" / "de-1234"
    stale = tmp_path / "corpus" / "de-1234.building-abc"
    stale.mkdir(parents=True)
    (stale / "half.wav").write_bytes(b"RIFF")
    assert cached_entry(entry, build) == entry
    assert sorted(p.name for p in entry.parent.iterdir()) == ["de-1234", "de-1234.lock"]


def test_entries_honour_the_umask_so_a_team_can_share_the_cache(tmp_path):
    old = os.umask(0o002)
    try:
        entry = cached_entry(tmp_path / "e", build)
        assert entry.stat().st_mode & 0o777 == 0o775 == 0o777 & ~umask()
    finally:
        os.umask(old)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_cache_without_the_entry_names_the_setting(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(OSError, match=r"cannot build the cache entry .*paths.cache_dir"):
            cached_entry(tmp_path / "corpus" / "e", build)
    finally:
        tmp_path.chmod(0o755)


def test_an_unwritable_cache_location_names_the_setting(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError, match=r"cannot build the cache entry .*paths.cache_dir"):
        cached_entry(tmp_path / "file" / "corpus" / "e", build)


def counting_build(calls: list) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "train").mkdir()
        (folder / "train" / "00000.wav").write_bytes(b"RIFF" + bytes(400))
        (folder / "train" / "00001.wav").write_bytes(b"RIFF" + bytes(400))
        (folder / "train.csv").write_text("wav_filename,wav_filesize,transcript\n")

    return build


@pytest.mark.parametrize(
    "damage, said",
    [
        (
            lambda e: (e / "train" / "00001.wav").unlink(),
            "1 of its 4 files missing (train/00001.wav)",
        ),
        (lambda e: (e / "train" / "00000.wav").write_bytes(b"RIFF"), "train/00000.wav: 4 bytes"),
        (
            lambda e: (e / "train" / "stray.wav").write_bytes(b"x"),
            "not from its build (train/stray",
        ),
    ],
    ids=["deleted", "truncated", "stray"],
)
def test_a_damaged_entry_is_named_and_rebuilt(tmp_path, caplog, damage, said):
    calls = []
    entry = cached_entry(tmp_path / "corpus" / "de-1234", counting_build(calls), {"n": 1})
    damage(entry)
    with caplog.at_level(logging.WARNING, logger="freezeft.cache"):
        assert cached_entry(entry, counting_build(calls), {"n": 1}) == entry
    assert len(calls) == 2
    assert f"The cache entry {entry} is damaged (" in caplog.text and said in caplog.text
    assert entry_damage(entry) is None and not (entry / "train" / "stray.wav").exists()
    assert (entry / "train" / "00000.wav").stat().st_size == 404
    assert sorted(p.name for p in entry.parent.iterdir()) == ["de-1234", "de-1234.lock"]
    cached_entry(entry, counting_build(calls), {"n": 1})
    assert len(calls) == 2  # intact now: used as it is


def test_an_entry_built_before_entries_recorded_their_files_is_used(tmp_path, caplog):
    calls = []
    entry = cached_entry(tmp_path / "e", counting_build(calls))
    (entry / "contents.json").unlink()  # as an older freezeft left it
    (entry / "train" / "00001.wav").unlink()
    with caplog.at_level(logging.WARNING):
        assert cached_entry(entry, counting_build(calls)) == entry
    assert len(calls) == 1 and not caplog.text


def test_a_damaged_entry_that_cannot_be_rebuilt_is_refused_with_the_command_that_clears_it(
    tmp_path, monkeypatch
):
    calls = []
    entry = cached_entry(tmp_path / "e", counting_build(calls))
    (entry / "train" / "00001.wav").unlink()

    class ReadOnlyLock:  # what a read-only cache folder does to the lock
        def __init__(self, path: str) -> None:
            pass

        def acquire(self, timeout: float = -1) -> None:
            raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(cache, "FileLock", ReadOnlyLock)
    with pytest.raises(OSError, match=rf"^the cache entry {entry} is damaged \(1 of its 3 files "
                       rf"missing .*Remove it with `rm -rf {entry}`"):  # fmt: skip
        cached_entry(entry, counting_build(calls))
    assert len(calls) == 1


def test_a_truncated_source_checkpoint_of_transfer_source_auto_is_rebuilt(tmp_path, caplog):
    """transfer.source=auto: its cached source.ckpt cut short (a full disk, a copy killed
    half-way) is named and pretrained again, also in an entry built before entries recorded
    their files' sizes; the cache key stays the same."""
    from hydra import compose, initialize_config_module

    from freezeft.app.source import pretrained_source

    with initialize_config_module(config_module="freezeft.conf", version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["experiment=tiny", "transfer.source=auto", f"paths.cache_dir={tmp_path}"],
        )
    pretrainings = []

    def fit_and_test(source_cfg, data_cfg, output_dir, **kwargs):  # a pretraining's outcome
        pretrainings.append(output_dir)
        best = output_dir / "checkpoints" / "best.ckpt"
        best.parent.mkdir(parents=True)
        torch.save({"state_dict": {"model.w": torch.ones(256)}}, best)
        return {"best_checkpoint": str(best), "headline": "tested"}

    source = pretrained_source(cfg, fit_and_test)
    whole = source.read_bytes()
    for older in (False, True):
        if older:
            (source.parent / "contents.json").unlink()
        source.write_bytes(whole[: len(whole) // 2])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="freezeft.cache"):
            assert pretrained_source(cfg, fit_and_test) == source
        assert f"The cache entry {source.parent} is damaged (" in caplog.text
        assert "source.ckpt" in caplog.text
        assert torch.load(source, weights_only=True)["state_dict"]["model.w"].sum() == 256
    assert len(pretrainings) == 3
    assert pretrained_source(cfg, fit_and_test) == source and len(pretrainings) == 3


def test_an_entry_linked_or_copied_from_other_settings_is_named_and_rebuilt(tmp_path, caplog):
    """Its settings.json says what it was built with: an entry made for n_train 32 behind
    the key of n_train 48 (a symlink, a copy) is not used; the other entry stays as it is."""
    calls = []
    other = cached_entry(tmp_path / "corpus" / "de-32", counting_build(calls), {"n_train": 32})
    entry = tmp_path / "corpus" / "de-48"
    entry.symlink_to(other)
    with caplog.at_level(logging.WARNING, logger="freezeft.cache"):
        assert cached_entry(entry, counting_build(calls), {"n_train": 48}) == entry
    assert len(calls) == 2
    assert "built with other settings than its key's: n_train 32 (wanted 48)" in caplog.text
    assert not entry.is_symlink() and entry_damage(other) is None  # the other one is kept
    caplog.clear()
    assert cached_entry(entry, counting_build(calls), {"n_train": 48}) == entry
    assert len(calls) == 2 and not caplog.text


def test_waiting_for_a_stopped_builder_says_who_holds_the_entry(tmp_path, caplog, monkeypatch):
    """A build lock held by a stopped process (Ctrl+Z) used to wait without a word."""
    import signal
    import subprocess
    import sys
    import threading

    entry = tmp_path / "corpus" / "de-1"
    entry.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from pathlib import Path; from filelock import FileLock\n"
                f"lock = FileLock({str(entry) + '.lock'!r}); lock.acquire()\n"
                f"Path({str(entry) + '.lock.owner'!r})"
                ".write_text('%d' % __import__('os').getpid())\n"
                "print('held', flush=True); time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.send_signal(signal.SIGSTOP)
        monkeypatch.setattr(cache, "_WAIT_SAY_EVERY", 0.2)
        threading.Timer(1.0, holder.kill).start()  # the holder goes: the waiter builds
        with caplog.at_level(logging.WARNING, logger="freezeft.cache"):
            assert cached_entry(entry, build) == entry
    finally:
        holder.kill()
        holder.wait()
    assert f"Waiting for the cache entry {entry}: process {holder.pid}" in caplog.text
    assert f"it is stopped (Ctrl+Z or SIGSTOP): `kill -CONT {holder.pid}`" in caplog.text
