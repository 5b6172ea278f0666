"""Build-once cache entries shared by runs and teammates: stale builds cleaned up, entries
readable by the group (umask), a read-only cache that lacks an entry named in the error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from freezeft.cache import cached_entry, umask


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
