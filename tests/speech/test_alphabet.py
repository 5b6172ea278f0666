import unicodedata
from pathlib import Path

import pytest

from freezeft.speech.alphabet import Alphabet


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "alphabet.txt"
    path.write_bytes(text.encode("utf-8"))
    return path


def test_reads_labels_skipping_comments_and_keeping_space(tmp_path):
    path = write(tmp_path, "# DeepSpeech alphabet\n \na\n# another comment\nb\nä\n'\n")
    alphabet = Alphabet.from_file(path)
    assert alphabet.labels == [" ", "a", "b", "ä", "'"]
    assert alphabet.blank == 5


def test_escaped_hash_is_a_label(tmp_path):
    alphabet = Alphabet.from_file(write(tmp_path, "a\n\\#\n#comment\n"))
    assert alphabet.labels == ["a", "#"]


def test_crlf_line_endings(tmp_path):
    assert Alphabet.from_file(write(tmp_path, "a\r\nb\r\n")).labels == ["a", "b"]


def test_round_trip_through_file(tmp_path):
    alphabet = Alphabet([" ", "#", "a", "ß"])
    alphabet.to_file(tmp_path / "out.txt")
    assert Alphabet.from_file(tmp_path / "out.txt") == alphabet


def test_duplicate_label_names_both_lines(tmp_path):
    with pytest.raises(ValueError, match=r"alphabet.txt:3: label 'a' already given on line 1"):
        Alphabet.from_file(write(tmp_path, "a\nb\na\n"))


def test_multi_character_line_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"alphabet.txt:2: expected one character.*'ab'"):
        Alphabet.from_file(write(tmp_path, "a\nab\n"))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Alphabet.from_file(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="has no labels"):
        Alphabet.from_file(write(tmp_path, "# only a comment\n"))


def test_encode_decode_and_unknown_characters():
    alphabet = Alphabet(list(" abc"))
    assert alphabet.encode("ab ca") == [1, 2, 0, 3, 1]
    assert alphabet.decode([1, 2, 4, 0, 3]) == "ab c"  # 4 is the blank
    with pytest.raises(ValueError, match=r"\['x', 'z'\]"):
        alphabet.encode("axbz")


def test_text_is_spelled_in_the_labels_unicode_form(tmp_path):
    nfd = unicodedata.normalize("NFD", "über")
    composed = Alphabet(list(" berü"))  # NFC labels, as alphabet files are read
    assert composed.spelling(nfd) == "über" and composed.missing(nfd) == []
    assert composed.encode(nfd) == composed.encode("über") == [4, 1, 2, 3]
    decomposed = Alphabet([" ", "b", "e", "r", "u", "\u0308"])  # a combining diaeresis label
    assert decomposed.spelling("über") == nfd and decomposed.encode("über") == [4, 5, 1, 2, 3]
    jamo = Alphabet(["\u1112", "\u1161", "\u11ab"])  # Hangul jamo: 한 is three labels
    assert jamo.encode("한") == [0, 1, 2] and jamo.missing("한국") == ["\u1100", "\u116e", "\u11a8"]
    path = tmp_path / "alphabet.txt"
    path.write_text(unicodedata.normalize("NFD", " \nb\ne\nr\nü\n"))  # its ü is two characters
    assert Alphabet.from_file(path).labels == [" ", "b", "e", "r", "ü"]
