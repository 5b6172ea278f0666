"""Write tests/data/german_mini: the shortest utterances of the tiny German corpus (the
``german_corpus`` fixture's settings), 8 train, 4 dev and 2 test, in DeepSpeech format, so
the fast tier reads real eSpeak speech without synthesising it (about 210 KB).

Run from the repository root: ``python tests/data/make_german_mini.py``
"""

from __future__ import annotations

import csv
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

from conftest import TINY  # noqa: E402

from freezeft.speech.corpus import SynthCorpus  # noqa: E402

SIZES = {"train": 8, "dev": 4, "test": 2}


def main() -> None:
    target = HERE / "german_mini"
    with tempfile.TemporaryDirectory() as cache:
        corpus = SynthCorpus(language="de", cache_dir=cache, **TINY).build()
        with open(corpus / "voices.csv", newline="") as handle:
            voices = {row["wav_filename"]: row for row in csv.DictReader(handle)}
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        shutil.copy(corpus / "alphabet.txt", target)
        kept_voices = []
        for split, n in SIZES.items():
            with open(corpus / f"{split}.csv", newline="") as handle:
                rows = list(csv.DictReader(handle))
            shortest = sorted(rows, key=lambda row: int(row["wav_filesize"]))[:n]
            kept = [row for row in rows if row in shortest]  # in corpus order
            (target / split).mkdir()
            with open(target / f"{split}.csv", "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                for i, row in enumerate(kept):
                    name = f"{split}/{i:05d}.wav"
                    shutil.copy(corpus / row["wav_filename"], target / name)
                    writer.writerow({**row, "wav_filename": name})
                    kept_voices.append({**voices[row["wav_filename"]], "wav_filename": name})
        with open(target / "voices.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(kept_voices[0]))
            writer.writeheader()
            writer.writerows(kept_voices)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
