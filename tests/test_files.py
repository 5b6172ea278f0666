"""What freezeft writes about a run or a cache is written atomically: a full disk leaves the
previous file (or none), never an empty or partial one, and says so with the file's path."""

from __future__ import annotations

import errno
import json
import os
import re

import pytest
from full_disk import fill

from freezeft.files import WriteError, disk_full_message, umask, write_text_atomic
from freezeft.history import History


def no_space(path) -> str:
    """The words of a full disk, for ``path``."""
    return rf"no space left on {re.escape(str(path.parent))} \(\d+ MiB free\) while writing " + (
        re.escape(str(path))
    )


@pytest.mark.parametrize("before", [True, False], ids=["previous file", "no file"])
def test_results_json_on_a_full_disk_keeps_the_previous_file_or_none(tmp_path, monkeypatch, before):
    from freezeft.app.results import write_json  # the app

    path = tmp_path / "results.json"
    if before:
        write_json(path, {"cer": 0.5})
    fill(monkeypatch, tmp_path)
    with pytest.raises(WriteError, match=no_space(path)) as raised:
        write_json(path, {"cer": 0.25, "wer": 0.5})
    monkeypatch.undo()
    assert raised.value.errno == errno.ENOSPC and raised.value.path == path
    if before:
        assert json.loads(path.read_text()) == {"cer": 0.5}  # readable, as it was
        assert str(raised.value).endswith("; the previous results.json is intact")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["results.json"] if before else [])


@pytest.mark.library
def test_history_on_a_full_disk_keeps_the_files_of_the_epoch_before(tmp_path, monkeypatch):
    history = History(tmp_path)
    history.epochs, history.lr_rows, history.group_names = [{"epoch": 0}], [], ["head"]
    history.write()
    written = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    history.epochs.append({"epoch": 1, "val_cer": 0.5})
    fill(monkeypatch, tmp_path)
    with pytest.raises(WriteError, match=no_space(tmp_path / "history.json")):
        history.write()
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == written


@pytest.mark.library
def test_atomic_files_have_the_umasks_permissions(tmp_path):
    old = os.umask(0o002)
    try:
        write_text_atomic(tmp_path / "results.json", "{}")
        assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o664 == 0o666 & ~umask()
    finally:
        os.umask(old)


@pytest.mark.library
def test_a_full_disk_an_error_does_not_locate_names_the_file_it_was_writing(tmp_path):
    """``close()`` on a full disk raises an ``OSError`` without a file name (Lightning's CSV
    logger): the message finds the file in the traceback."""
    path = tmp_path / "metrics.csv"

    def save() -> None:
        with open(path, "w") as stream:
            stream.write("step,loss\n")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as close() would

    with pytest.raises(OSError) as raised:
        save()
    assert re.fullmatch(no_space(path), disk_full_message(raised.value, tmp_path))
    assert disk_full_message(PermissionError(errno.EACCES, "denied"), tmp_path) is None
