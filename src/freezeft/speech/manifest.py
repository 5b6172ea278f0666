"""DeepSpeech's CSV manifest: ``wav_filename,wav_filesize,transcript`` rows.

Relative WAV paths resolve against the CSV's folder; errors name the file, the row and
what to fix.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CSV_COLUMNS", "Sample", "read_csv"]

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


def read_csv(path: str | Path) -> list[Sample]:
    """Read a DeepSpeech CSV; errors name the file, the row and what to fix."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"CSV file {path} is a folder; give the CSV file in it.")
    if not path.is_file():
        raise FileNotFoundError(f"CSV file {path} does not exist.")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # Excel writes a BOM
            rows = list(csv.reader(handle))
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ValueError(
            f"CSV file {path} is not UTF-8 text: line {line} has the byte "
            f"{err.object[err.start : err.start + 1]!r}; save the file as UTF-8."
        ) from None
    if not rows:
        raise ValueError(f"CSV file {path} is empty; expected the header {','.join(CSV_COLUMNS)}.")
    header = [column.strip() for column in rows[0]]
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise ValueError(
            f"CSV file {path} lacks the column(s) {missing}; its header is {header}, "
            f"expected {','.join(CSV_COLUMNS)} (DeepSpeech's format)."
        )
    col = {name: header.index(name) for name in CSV_COLUMNS}
    samples = []
    for number, row in enumerate(rows[1:], start=2):
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
        samples.append(Sample(wav, size, row[col["transcript"]], where, csv_dir, extra))
    if not samples:
        raise ValueError(
            f"CSV file {path} has a header but no rows; add rows "
            f"({','.join(CSV_COLUMNS)}) or leave the file out of the split."
        )
    return samples
