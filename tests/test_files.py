"""What freezeft writes about a run or a cache is written atomically: a full disk leaves the
previous file (or none), never an empty or partial one, and says so with the file's path."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys

import pytest
from full_disk import fill

from freezeft.files import (
    Terminated,
    WriteError,
    disk_full_message,
    read_text_capped,
    signals_raise,
    umask,
    write_text_atomic,
)
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


def _signal_mid_write(signum: int) -> object:
    """A stand-in for ``os.fsync`` that sends this process ``signum`` once the temporary
    file is written in full, just before it would be renamed into place."""
    real = os.fsync

    def fsync(fd: int) -> None:
        real(fd)
        os.kill(os.getpid(), signum)

    return fsync


@pytest.mark.library
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl+C", "SIGTERM"])
def test_a_signal_turned_into_an_exception_mid_write_leaves_no_temporary_file(
    tmp_path, monkeypatch, signum
):
    path = tmp_path / "report.md"
    path.write_text("the previous report\n")
    monkeypatch.setattr(os, "fsync", _signal_mid_write(signum))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt if signum == signal.SIGINT else Terminated):
        with signals_raise():
            write_text_atomic(path, "x" * 2**20)
    assert signal.getsignal(signal.SIGTERM) == before  # signals_raise put it back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
    assert path.read_text() == "the previous report\n"


@pytest.mark.library
def test_sigterm_without_a_handler_mid_write_removes_the_temporary_file_then_ends(tmp_path):
    """No handler for SIGTERM (a plain script): the process still ends by the signal, as
    it would have, but the temporary file is gone and the previous file is intact."""
    path = tmp_path / "results.json"
    path.write_text('{"cer": 0.5}')
    script = (
        "import os, signal, sys\n"
        "from freezeft.files import write_text_atomic\n"
        "real = os.fsync\n"
        "os.fsync = lambda fd: (real(fd), os.kill(os.getpid(), signal.SIGTERM))\n"
        "write_text_atomic(sys.argv[1], 'x' * 2**20)\n"
        "print('not reached')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert "not reached" not in proc.stdout and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    assert path.read_text() == '{"cer": 0.5}'


@pytest.mark.library
def test_read_text_capped_reads_only_regular_files_within_the_limit(tmp_path):
    small = tmp_path / "small.json"
    small.write_text('{"a": 1}')
    (tmp_path / "link.json").symlink_to(small)
    assert read_text_capped(tmp_path / "link.json", 100) == '{"a": 1}'  # a link to a file
    os.mkfifo(tmp_path / "fifo")  # would block an open() until something writes into it
    with pytest.raises(ValueError, match=r"^is a FIFO \(a named pipe\), not a regular file$"):
        read_text_capped(tmp_path / "fifo", 100)
    with pytest.raises(ValueError, match="^is a character device, not a regular file$"):
        read_text_capped("/dev/zero", 100)  # endless
    with pytest.raises(ValueError, match="^is a folder, not a regular file$"):
        read_text_capped(tmp_path, 100)
    with pytest.raises(ValueError, match=r"^is too large for a results.json \(8 bytes, more "):
        read_text_capped(small, 7, "a results.json")
    with pytest.raises(FileNotFoundError):
        read_text_capped(tmp_path / "missing", 100)
