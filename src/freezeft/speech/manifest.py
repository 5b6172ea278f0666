"""DeepSpeech's CSV manifest: ``wav_filename,wav_filesize,transcript`` rows.

Relative WAV paths resolve against the CSV's folder; transcripts are read in Unicode NFC
(composed: ``ü`` is one character, as alphabets write it). Errors name the file, the line
and what to fix.
"""

from __future__ import annotations

import csv
import os
import stat
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CSV_COLUMNS", "Sample", "not_a_regular_file", "read_csv"]

CSV_COLUMNS = ("wav_filename", "wav_filesize", "transcript")


@dataclass(frozen=True)
class Sample:
    """One row of a DeepSpeech CSV, with its path resolved."""

    path: Path
    size: int
    transcript: str
    source: str  # "file.csv:row" for messages
    csv_dir: Path | None = None  # set when the CSV gave a relative path
    extra_fields: int = 0  # fields beyond the header's (an unquoted comma in the transcript)


def not_a_regular_file(path: str | Path) -> str | None:
    """What ``path`` is when it exists but is neither a regular file nor a folder (``"a FIFO
    (named pipe)"``, ``"a character device"``...), else ``None``.

    Found with ``stat``, without opening the path: opening a FIFO blocks until something
    writes to it, and a device such as ``/dev/zero`` never ends.
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    kinds = (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), None)


def read_csv(path: str | Path) -> list[Sample]:
    """Read a DeepSpeech CSV; errors name the file, the line and what to fix."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"CSV file {path} is a folder; give the CSV file in it.")
    special = not_a_regular_file(path)
    if special is not None:
        raise ValueError(f"CSV file {path} is {special}, not a regular file; give a CSV file.")
    if not path.is_file():
        raise FileNotFoundError(f"CSV file {path} does not exist.")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # Excel writes a BOM
            rows = _numbered_rows(path, handle)
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ValueError(
            f"CSV file {path} is not UTF-8 text: line {line} has the byte "
            f"{err.object[err.start : err.start + 1]!r}; save the file as UTF-8."
        ) from None
    if not rows:
        raise ValueError(f"CSV file {path} is empty; expected the header {','.join(CSV_COLUMNS)}.")
    header = [column.strip() for column in rows[0][1]]
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise ValueError(
            f"CSV file {path} lacks the column(s) {missing}; its header is {header}, "
            f"expected {','.join(CSV_COLUMNS)} (DeepSpeech's format)."
        )
    col = {name: header.index(name) for name in CSV_COLUMNS}
    samples = []
    for number, row in rows[1:]:
        if not any(field.strip() for field in row):  # an empty or blank line
            continue
        where = f"{path}:{number}"
        swallowed = max(field.count("\n") for field in row)
        if swallowed:
            raise ValueError(
                f"{where}: a field runs over {swallowed} more line(s): an opening double quote "
                "without its closing one, which makes the CSV reader merge the following rows "
                "into this one. Close the quote, or remove it."
            )
        if len(row) < len(header):
            raise ValueError(f"{where}: expected {len(header)} fields, but got {len(row)}: {row}.")
        extra = len(row) - len(header)
        wav = Path(row[col["wav_filename"]])
        relative = not wav.is_absolute()
        if relative:
            wav = path.parent / wav
        size_text = row[col["wav_filesize"]].strip()
        try:
            size = int(size_text) if size_text else 0
        except ValueError:
            raise ValueError(
                f"{where}: wav_filesize must be an integer number of bytes, but got {size_text!r}."
            ) from None
        csv_dir = path.parent if relative else None
        transcript = unicodedata.normalize("NFC", row[col["transcript"]])
        samples.append(Sample(wav, size, transcript, where, csv_dir, extra))
    if not samples:
        raise ValueError(
            f"CSV file {path} has a header but no rows; add rows "
            f"({','.join(CSV_COLUMNS)}) or leave the file out of the split."
        )
    return samples


def _numbered_rows(path: Path, lines: Iterable[str]) -> list[tuple[int, list[str]]]:
    """``(line where the row starts, fields)`` of each CSV row; the CSV reader's errors (a
    runaway quoted field past its size limit, a NUL byte) in freezeft's words, with the
    line where the row starts."""
    reader = csv.reader(lines)
    rows: list[tuple[int, list[str]]] = []
    start = 1  # the line the next row starts on
    try:
        for row in reader:
            if any("\0" in field for field in row):  # Python >= 3.11 reads NUL bytes as text
                raise ValueError(_nul_byte(f"{path}:{start}"))
            rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as err:  # Python < 3.11: "line contains NUL"
        where = f"{path}:{start}"
        if "NUL" in str(err):
            raise ValueError(_nul_byte(where)) from None
        limit = csv.field_size_limit()
        more = reader.line_num - start
        if "field limit" in str(err) and more:
            raise ValueError(
                f"{where}: a field runs over at least {more} more line(s), past the CSV "
                f"reader's limit of {limit} characters: an opening double quote without its "
                "closing one, which makes the CSV reader merge the following rows into this "
                "one. Close the quote, or remove it."
            ) from None
        if "field limit" in str(err):
            raise ValueError(
                f"{where}: a field is longer than the CSV reader's limit of {limit} "
                "characters; a transcript holds the words of one utterance."
            ) from None
        raise ValueError(f"{where}: the row is not readable as CSV ({err}); fix it.") from None
    return rows


def _nul_byte(where: str) -> str:
    return (
        f"{where}: the row holds a NUL byte (\\x00): the file is damaged or binary, not CSV "
        "text (a UTF-16 export?). Remove the NUL bytes, or save the CSV again as UTF-8."
    )
