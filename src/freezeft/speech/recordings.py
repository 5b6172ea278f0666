"""Real recorded English, offline: a DeepSpeech test CSV from Debian's pocketsphinx-testdata.

Every corpus freezeft makes is spoken by eSpeak voices. This is the check that a model
trained on them hears a human: the package ``pocketsphinx-testdata`` (``apt-get install
pocketsphinx-testdata``; CMU Sphinx's test data, BSD-2) ships 16 kHz recordings with
transcripts, of which two sets are read speech:

- ``librivox``: five sentences of Jane Austen's *Sense and Sensibility* read by a LibriVox
  volunteer (public domain), 24 s;
- ``cards``: five card-game commands ("eight of spades four of clubs ..."), 10 s.

Ten utterances, 34 s: a sanity check of what a model learned, not a benchmark.

    python -m freezeft.speech.recordings OUT_DIR      # writes OUT_DIR/test.csv
    python -m freezeft.transcribe CKPT --csv OUT_DIR/test.csv --decoder greedy
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from freezeft.files import atomic_write
from freezeft.speech.manifest import CSV_COLUMNS

__all__ = ["POCKETSPHINX_DATA", "pocketsphinx_test_csv", "read_sphinx_transcription"]

#: Where Debian's pocketsphinx-testdata puts its files.
POCKETSPHINX_DATA = Path("/usr/share/pocketsphinx/test/data")
#: The read-speech sets: folder -> its transcription file (``<s> words </s> (file id)``).
SETS = {"librivox": "transcription", "cards": "cards.transcription"}
INSTALL = "apt-get install pocketsphinx-testdata"
_LINE = re.compile(r"^\s*(?:<s>)?(?P<text>.*?)(?:</s>)?\s*\((?P<id>[^()]+)\)\s*$")


def read_sphinx_transcription(path: Path) -> list[tuple[str, str]]:
    """``(file id, transcript)`` pairs of a Sphinx transcription file; errors name the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}).") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = _LINE.match(line)
        if match is None:
            raise ValueError(
                f"{path}:{number}: expected '<s> words </s> (file id)', but got {line!r}."
            )
        words = " ".join(match["text"].lower().split())
        pairs.append((match["id"].strip(), words))
    return pairs


def pocketsphinx_test_csv(out_dir: str | Path, root: str | Path = POCKETSPHINX_DATA) -> Path:
    """Write ``out_dir/test.csv`` (DeepSpeech's format, absolute WAV paths into ``root``)
    for the package's read-speech recordings, and return its path.

    Raises:
        FileNotFoundError: the package is not installed (the message says how), or a
            recording its transcription names is missing (the message names it).
        ValueError: a transcription line that is not Sphinx's format.
    """
    root = Path(root)
    if not str(root) or not root.is_dir():
        raise FileNotFoundError(
            f"{str(root) or repr('')} is not a folder: the real recorded English comes from "
            f"Debian's pocketsphinx-testdata package. Install it ({INSTALL}), or give the "
            "folder that holds its librivox/ and cards/ (--root)."
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file; OUT_DIR must be a folder (made if absent).")
    ours = root.resolve() == POCKETSPHINX_DATA.resolve()
    rows = []
    for folder, transcription in SETS.items():
        listing = root / folder / transcription
        if not listing.is_file():
            fix = f"reinstall ({INSTALL})" if ours else "give the package's data folder"
            raise FileNotFoundError(
                f"{listing} is missing: {root} is not pocketsphinx-testdata's data folder "
                f"as it should be; {fix}."
            )
        for file_id, words in read_sphinx_transcription(listing):
            wav = root / folder / f"{file_id}.wav"
            if not wav.is_file():
                raise FileNotFoundError(f"{wav}, named in {listing}, is missing: reinstall.")
            rows.append([str(wav.resolve()), wav.stat().st_size, words])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "test.csv"
    with atomic_write(path, newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows([list(CSV_COLUMNS), *rows])
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m freezeft.speech.recordings OUT_DIR``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m freezeft.speech.recordings",
        description="Write OUT_DIR/test.csv, a DeepSpeech test set of real recorded English "
        f"from Debian's pocketsphinx-testdata ({INSTALL}); score a model on it with "
        "python -m freezeft.transcribe CKPT --csv OUT_DIR/test.csv.",
    )
    parser.add_argument("out_dir", help="the folder to write test.csv into")
    parser.add_argument("--root", default=str(POCKETSPHINX_DATA), help="the package's data")
    args = parser.parse_args(argv)
    try:
        path = pocketsphinx_test_csv(args.out_dir, args.root)
    except (OSError, ValueError) as err:
        print(f"freezeft.speech.recordings: error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
