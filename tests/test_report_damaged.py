"""The report on a sweep whose files are damaged or hostile: each damaged file is named with
why under "Unreadable files (left out)" and the rest is reported, never a crash or a hang;
values from the jobs' files never change report.md's layout; Ctrl+C or SIGTERM while the
report is written is one line, leaves no temporary file and report.md as it was.

The sweep dirs are built on real files, as in ``tests/test_report_generic.py``.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
from pathlib import Path

import pytest
from pyrun import run_python
from test_report_generic import hydra_dir, job, report_rows

from freezeft.app.report import write_report
from freezeft.app.report.jobs import DEPTH_LIMIT, FILE_LIMIT
from freezeft.app.report.markdown import code, text
from freezeft.app.report.welch import mean, stdev, welch_p

HERE = Path(__file__).parent


def two_rows(sweep: Path) -> None:
    """A usable sweep: two rows of two seeds each (jobs 0 to 3)."""
    for number, (strategy, seed, acc) in enumerate(
        [("naive", 0, 0.80), ("naive", 1, 0.82), ("scratch", 0, 0.60), ("scratch", 1, 0.62)]
    ):
        job(sweep, number, strategy, seed, test_acc=acc)


def report_within(sweep: Path, seconds: float = 60) -> str:
    """report.md of ``sweep``, written in another thread: a report that blocks (on a FIFO)
    fails the test instead of hanging it; the FIFOs are then opened for writing and closed,
    which lets the blocked read end."""
    done: list[str | BaseException] = []

    def run() -> None:
        try:
            done.append(write_report(sweep).read_text())
        except BaseException as err:  # re-raised in the test
            done.append(err)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        for fifo in (p for p in sweep.rglob("*") if p.is_fifo()):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(10)
        pytest.fail(f"the report blocked for {seconds} s")
    if isinstance(done[0], BaseException):
        raise done[0]
    return done[0]


def unreadable_line(report: str, path: Path) -> str:
    section = report[report.index("## Unreadable files (left out)") :]
    return next(line for line in section.splitlines() if f"- {path} " in line)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def sparse(path: Path, size: int) -> None:
    """A file of ``size`` zero bytes that takes no disk space."""
    with open(path, "wb") as stream:
        stream.truncate(size)


def job_without_results(sweep: Path, number: int) -> Path:
    folder = sweep / str(number)
    hydra_dir(folder, ["strategy=naive", f"seed={number}"])
    return folder


# what a damaged file is, how it is built in a job dir, and the words that name it
DAMAGED = {
    "results.json 100k levels deep": (
        "results.json",
        lambda p: p.write_text(nested(100_000)),
        f"is nested more than {DEPTH_LIMIT} levels deep: not a file a run writes",
    ),
    "results.json nested within the recursion limit": (
        "results.json",
        lambda p: p.write_text('{"report": ' + nested(500) + "}"),
        f"is nested more than {DEPTH_LIMIT} levels deep",
    ),
    "failure.json 100k levels deep": (
        "failure.json",
        lambda p: p.write_text(nested(100_000)),
        f"is nested more than {DEPTH_LIMIT} levels deep",
    ),
    "results.json a FIFO": ("results.json", os.mkfifo, "is a FIFO (a named pipe), not a regular"),
    "failure.json a FIFO": ("failure.json", os.mkfifo, "is a FIFO (a named pipe), not a regular"),
    "results.json a link to /dev/zero": (
        "results.json",
        lambda p: p.symlink_to("/dev/zero"),
        "is a character device, not a regular file",
    ),
    "results.json a folder": ("results.json", Path.mkdir, "is a folder, not a regular file"),
    "results.json over the size limit": (
        "results.json",
        lambda p: sparse(p, FILE_LIMIT + 1),
        "is too large for a results.json (16 MiB, more than 16 MiB)",
    ),
    "results.json not UTF-8": (
        "results.json",
        lambda p: p.write_bytes(b'{"cer": "\xff"}'),
        "cannot be read ('utf-8' codec can't decode byte 0xff",
    ),
}


@pytest.mark.parametrize("damage", DAMAGED, ids=list(DAMAGED))
def test_a_damaged_job_file_is_named_and_the_rest_is_reported(tmp_path, damage):
    name, build, why = DAMAGED[damage]
    two_rows(tmp_path)
    build(job_without_results(tmp_path, 4) / name)
    report = report_within(tmp_path)
    line = unreadable_line(report, tmp_path / "4" / name)
    assert why in line, line
    assert report_rows(tmp_path)["naive"]["runs"] == "2"
    state = "failed" if name == "failure.json" else "unreadable"
    assert f"| `4` | {state} |" in report


@pytest.mark.parametrize(
    "name, build, why",
    [
        ("history.json", os.mkfifo, "is a FIFO (a named pipe), not a regular file"),
        ("history.json", lambda p: p.write_text(nested(100_000)), "is nested too deeply"),
        ("lr_schedule.csv", os.mkfifo, "is a FIFO (a named pipe), not a regular file"),
        ("lr_schedule.csv", lambda p: p.symlink_to("/dev/zero"), "is a character device"),
    ],
    ids=["history FIFO", "history deep", "LR FIFO", "LR /dev/zero"],
)
def test_a_damaged_history_or_lr_file_is_named_and_its_plot_drawn_without_it(
    tmp_path, name, build, why
):
    two_rows(tmp_path)
    path = tmp_path / "0" / name
    path.unlink()
    build(path)
    line = unreadable_line(report_within(tmp_path), path)
    assert why in line, line


@pytest.mark.parametrize("name", ["overrides.yaml", "hydra.yaml"])
def test_a_fifo_among_a_jobs_hydra_files_does_not_block_the_report(tmp_path, name):
    two_rows(tmp_path)
    folder = job_without_results(tmp_path, 4)
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "interrupted.ckpt").write_bytes(b"checkpoint")  # resumable
    (folder / ".hydra" / name).unlink(missing_ok=True)
    os.mkfifo(folder / ".hydra" / name)
    report = report_within(tmp_path)
    assert "| `4` | interrupted |" in report
    if name == "overrides.yaml":  # hydra.yaml only adds the resume command's folder
        line = unreadable_line(report, folder / ".hydra" / name)
        assert "is a FIFO (a named pipe), not a regular file" in line, line


@pytest.mark.parametrize("name", ["multirun.yaml", "optimization_results.yaml"])
def test_a_fifo_for_the_sweeps_own_files_does_not_block_the_report(tmp_path, name):
    two_rows(tmp_path)
    os.mkfifo(tmp_path / name)
    line = unreadable_line(report_within(tmp_path), tmp_path / name)
    assert "is a FIFO (a named pipe), not a regular file" in line, line


def test_values_whose_squares_overflow_are_summarised_and_tested(tmp_path):
    """``cer`` 1e160 and 2e160 in one row: their squares are beyond the float range."""
    job(tmp_path, 0, "naive", 0, test_acc=0.80)
    job(tmp_path, 1, "naive", 1, test_acc=0.82)
    job(tmp_path, 2, "huge", 0, test_acc=1e160)
    job(tmp_path, 3, "huge", 1, test_acc=2e160)
    job(tmp_path, 4, "edge", 0, test_acc=1.7e308)  # a spread beyond the float range
    job(tmp_path, 5, "edge", 1, test_acc=-1.7e308)
    big = job(tmp_path, 6, "naive", 2, test_acc=0.5) / "results.json"  # an integer, no float
    big.write_text(big.read_text().replace('"test_acc": 0.5', '"test_acc": 1' + "0" * 400))
    report = write_report(tmp_path).read_text()
    rows = report_rows(tmp_path)
    assert float(rows["huge"]["test_acc_mean"]) == 1.5e160
    assert float(rows["huge"]["test_acc_std"]) == pytest.approx(7.0710678e159)
    # against 1e160 and 2e160, 0.80 and 0.82 are 0 and 0: t = 3 on 1 degree of freedom
    assert float(rows["naive"]["p_vs_best"]) == pytest.approx(welch_p([1.0, 2.0], [0.0, 0.0]))
    assert "| huge | 2 | 1.500e+160 ± 7.071e+159 |" in report
    assert rows["edge"]["test_acc_std"] == "" and "| edge | 2 | 0.000 ± n/a |" in report
    assert "n/a: a statistic too large for a float" in report
    assert "6/results.json has \\`test_acc\\`: 10000000000000000000...(401 characters)" in report
    assert "Not drawn: acc_vs_time.png (ValueError" in report  # matplotlib: ±1.7e308
    assert not (tmp_path / "acc_vs_time.png").exists()


def test_mean_stdev_and_welch_p_do_not_overflow():
    assert welch_p([1e160, 2e160], [1e160, 3e160]) == pytest.approx(welch_p([1, 2], [1, 3]))
    assert welch_p([1e-320, 2e-320], [0.0, 5e-324]) is not None  # subnormal: no 0/0
    assert welch_p([1.0, float("nan")], [1.0, 2.0]) is None
    assert mean([1e308, 1.7e308]) == 1.35e308  # their sum is beyond the float range
    assert stdev([1e160, 2e160]) == pytest.approx(7.0710678e159)
    assert stdev([1.7e308, -1.7e308]) == float("inf")
    for values in ([0.1, 0.2, 0.3], [0.80, 0.82], [3, 1e-300, -2.5]):  # as statistics', to the bit
        assert (mean(values), stdev(values)) == (statistics.fmean(values), statistics.stdev(values))


def test_values_from_the_jobs_files_cannot_change_report_md(tmp_path):
    """A strategy's name with ``|``, a line end and HTML: each row keeps its columns, no
    heading is added, no raw HTML gets through; report.csv keeps the names exactly."""
    names = ["fast|0.001", "evil\n# Heading", "<script>alert(1)</script>", "a`b\\|c&d"]
    job(tmp_path, 0, "naive", 0, test_acc=0.80)
    job(tmp_path, 1, "naive", 1, test_acc=0.82)
    for number, name in enumerate(names, start=2):
        job(tmp_path, number, name, 0, test_acc=0.5 + number / 100)
    report = write_report(tmp_path).read_text()
    tables, lines = [], report.splitlines()
    for before, line in zip(["", *lines], lines, strict=False):
        if line.startswith("|"):
            (tables[-1].append(line) if before.startswith("|") else tables.append([line]))
    assert [len(table) for table in tables] == [2 + 5, 2 + 6]  # both tables, every row
    for header, _, *rows in tables:
        for row in rows:  # a cell's | is escaped: GitHub's tables read \| as |
            assert row.replace("\\|", "").count(" | ") == header.count(" | "), row
    assert "| fast\\|0.001 | 1 |" in report
    assert "| evil # Heading | 1 |" in report and "\n# Heading" not in report
    assert "<script>" not in report and "| &lt;script&gt;alert(1)&lt;/script&gt; | 1 |" in report
    assert "| a\\`b\\\\\\|c&amp;d | 1 |" in report
    assert [line for line in report.splitlines() if line.startswith("#")] == [
        f"# Strategy comparison: {tmp_path.name}",
        "## Jobs",
    ]
    assert sorted(report_rows(tmp_path)) == sorted(["naive", *names])  # exact in the CSV


def test_markdown_text_and_code_escape_what_would_change_the_layout():
    assert text("# a|b\r\nc <i>&`x`") == "\\# a\\|b c &lt;i&gt;&amp;\\`x\\`"
    # a terminal's escape sequence (the command prints report.md) is shown as \x1b
    assert text("[link](http://x) \x1b[31m") == "\\[link\\](http://x) \\\\x1b\\[31m"
    assert code("rm `x` now") == "``rm `x` now``" and code("`a`") == "`` `a` ``"
    assert code("a|b", in_table=True) == "`a\\|b`" and code("a|b") == "`a|b`"
    assert code("a\\|b", in_table=True) == "a\\\\\\|b"  # no code span: \| would end the cell
    assert code("cd 'x' && python -m freezeft.run") == "`cd 'x' && python -m freezeft.run`"


def test_the_names_of_a_failed_and_an_interrupted_job_are_escaped_their_command_kept(tmp_path):
    two_rows(tmp_path)
    failed = job_without_results(tmp_path, 4)
    (failed / "failure.json").write_text(json.dumps({"error": "boom <img src=x>\n## hi | x"}))
    interrupted = tmp_path / "5"
    hydra_dir(interrupted, ["strategy.name='a|b<c>'", "seed=5"])
    (interrupted / "checkpoints").mkdir()
    (interrupted / "checkpoints" / "interrupted.ckpt").write_bytes(b"checkpoint")
    report = write_report(tmp_path).read_text()
    assert "): boom &lt;img src=x&gt; ## hi \\| x" in report
    assert "(strategy.name='a\\|b&lt;c&gt;' seed=5): interrupted: stopped" in report
    resume = "`python -m freezeft.run 'strategy.name='\"'\"'a|b<c>'\"'\"'' seed=5 resume="
    assert resume in report  # a code span: copied as it is


@pytest.mark.slow  # a subprocess each
@pytest.mark.parametrize(
    "module, signum, code",
    [
        ("freezeft.report", "SIGINT", 130),
        ("freezeft.report", "SIGTERM", 143),
        ("freezeft.run", "SIGINT", 130),
        ("freezeft.run", "SIGTERM", 143),
    ],
    ids=["report Ctrl+C", "report SIGTERM", "sweep Ctrl+C", "sweep SIGTERM"],
)
def test_a_signal_while_the_report_is_written_is_one_line(tmp_path, module, signum, code):
    """The signal comes with report.md's temporary file written in full (the moment a kill
    leaves the most behind): one line, exit 130 or 143, no temporary file, report.md as it
    was. ``freezeft.run``: a real sweep of four jobs that "train" in no time, then its
    report (:class:`freezeft.app.report.ReportCallback`)."""
    sweep = tmp_path / "sweep"
    if module == "freezeft.report":
        two_rows(sweep)
        (sweep / "report.md").write_text("the previous report\n")
        args = [str(sweep)]
    else:
        args = ["-m", "strategy=naive,scratch", "seed=0,1", f"hydra.sweep.dir={sweep}"]
    results = {"cer": 0.5, "wer": 0.6, "epochs": 1, "best_epoch": 1, "trainable_params": 10}
    proc = run_python(
        [str(HERE / "signal_during_report.py"), signum, module, *args],
        cwd=tmp_path,
        env={"FAKE_RESULTS": json.dumps({**results, "monitor": "val_cer"})},
        check=False,
    )
    assert "report.md" in proc.stdout  # the signal came while it was written
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-2000:]
    said = [line for line in proc.stderr.splitlines() if line.startswith("freezeft:")]
    how = "Ctrl+C" if signum == "SIGINT" else "SIGTERM"
    assert len(said) == 1 and said[0].startswith(f"freezeft: interrupted ({how}) while writing")
    assert "Traceback" not in proc.stderr
    assert not list(sweep.glob(".*.tmp")) and not list(sweep.glob("*.tmp"))
    if module == "freezeft.report":
        assert (sweep / "report.md").read_text() == "the previous report\n"
    else:
        assert not (sweep / "report.md").exists()
        assert f"write it with `python -m freezeft.report {sweep}`" in said[0]
