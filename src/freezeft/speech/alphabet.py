"""DeepSpeech alphabet files: one output label per line.

Format (as in DeepSpeech / Coqui STT): a line starting with ``#`` is a comment, ``\\#``
stands for a literal ``#``, a line holding one space is the space label. The CTC blank
is not in the file: models put it after the last label.

Labels are read in Unicode NFC (composed): a ``ü`` line written as ``u`` + a combining
diaeresis (NFD, as macOS and some exports write it) is the label ``ü``. Text is compared
with the labels in NFC too, so an NFD ``über`` is spelled with ``ü``; an alphabet whose
labels are decomposed pieces (combining marks, Hangul jamo) gets the text in NFD instead.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

from freezeft.files import write_text_atomic

__all__ = ["Alphabet"]


class Alphabet:
    """An ordered set of single-character labels, in Unicode NFC; text is encoded in the
    form they spell (:meth:`spelling`).

    Args:
        labels: the labels in output order, one character each (after NFC normalisation).

    Raises:
        ValueError: a label is empty, longer than one character, or repeated.

    Example::

        alphabet = Alphabet.from_file("data/alphabet.txt")
        ids = alphabet.encode("hallo welt")
        assert alphabet.decode(ids) == "hallo welt"
    """

    def __init__(self, labels: Sequence[str]) -> None:
        labels = [unicodedata.normalize("NFC", label) for label in labels]
        seen: dict[str, int] = {}
        for index, label in enumerate(labels):
            if len(label) != 1:
                raise ValueError(
                    f"Expected every alphabet label to be one character, but label {index} "
                    f"is {label!r}."
                )
            if label in seen:
                raise ValueError(
                    f"Alphabet label {label!r} appears twice (labels {seen[label]} and {index})."
                )
            seen[label] = index
        if not seen:
            raise ValueError("An alphabet needs at least one label, but got none.")
        self.labels: list[str] = labels
        self._index = seen
        #: the file it was read from (:meth:`from_file`), for messages; ``None`` otherwise
        self.path: Path | None = None
        pieces = any(unicodedata.combining(c) or 0x1100 <= ord(c) <= 0x11FF for c in labels)
        self._form = 2 if pieces else 1  # NFD for labels of combining marks or jamo, else NFC

    @classmethod
    def from_file(cls, path: str | Path) -> Alphabet:
        """Read a DeepSpeech ``alphabet.txt``; errors name the file and line."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8-sig")  # editors on Windows write a BOM
        except FileNotFoundError:
            raise FileNotFoundError(f"Alphabet file {path} does not exist.") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"Alphabet file {path} is not UTF-8 text ({err}).") from None
        labels: list[str] = []
        lines: list[int] = []
        for number, raw in enumerate(text.split("\n"), start=1):
            line = unicodedata.normalize("NFC", raw[:-1] if raw.endswith("\r") else raw)
            if line.startswith("\\#"):
                line = "#" + line[2:]
            elif line.startswith("#") or line == "":
                continue
            if len(line) != 1:
                raise ValueError(
                    f"{path}:{number}: expected one character per line, but got {line!r}."
                )
            if line in labels:
                first = lines[labels.index(line)]
                raise ValueError(f"{path}:{number}: label {line!r} already given on line {first}.")
            labels.append(line)
            lines.append(number)
        if not labels:
            raise ValueError(f"Alphabet file {path} has no labels (only comments or blank lines).")
        alphabet = cls(labels)
        alphabet.path = path
        return alphabet

    def to_file(self, path: str | Path) -> None:
        """Write the alphabet in DeepSpeech's format."""
        lines = ["# Each line is one label; the CTC blank is implicit and comes last."]
        lines += ["\\#" if label == "#" else label for label in self.labels]
        write_text_atomic(path, "\n".join(lines) + "\n")

    def __len__(self) -> int:
        return len(self.labels)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Alphabet) and self.labels == other.labels

    def __hash__(self) -> int:
        return hash(tuple(self.labels))

    def __repr__(self) -> str:
        return f"Alphabet({''.join(self.labels)!r})"

    @property
    def blank(self) -> int:
        """Index of the CTC blank: one past the last label."""
        return len(self.labels)

    def spelling(self, text: str) -> str:
        """``text`` in the Unicode form the labels spell: as it is, else in NFC, else in NFD
        (an alphabet of combining marks or jamo), whichever has no character outside the
        alphabet; if none, the alphabet's own form (NFD for one with combining marks or
        jamo, else NFC), whose outside characters :meth:`missing` then lists.

        Example::

            >>> Alphabet(list(" berü")).spelling("u\u0308ber")  # NFD in, the label ü out
            'über'
        """
        forms = (text, unicodedata.normalize("NFC", text), unicodedata.normalize("NFD", text))
        return next((form for form in forms if not self._outside(form)), forms[self._form])

    def _outside(self, text: str) -> list[str]:
        return sorted({char for char in text if char not in self._index})

    def missing(self, text: str) -> list[str]:
        """Characters of ``text`` (as :meth:`spelling` writes it) that are not labels, sorted,
        each once."""
        return self._outside(self.spelling(text))

    def encode(self, text: str) -> list[int]:
        """Label ids of ``text`` (as :meth:`spelling` writes it); raises ``ValueError`` listing
        characters not in the alphabet."""
        text = self.spelling(text)
        missing = self._outside(text)
        if missing:
            raise ValueError(f"Characters {missing} of {text!r} are not in the alphabet.")
        return [self._index[char] for char in text]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of label ids; the blank and out-of-range ids are dropped."""
        n = len(self.labels)
        return "".join(self.labels[i] for i in ids if 0 <= i < n)
