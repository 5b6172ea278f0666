"""Real recorded English from Debian's pocketsphinx-testdata, as a DeepSpeech test CSV."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from freezeft.speech.manifest import read_csv
from freezeft.speech.recordings import POCKETSPHINX_DATA, main, pocketsphinx_test_csv


def package_like(root, broken_line: str | None = None):
    """The package's layout, with two recordings of our own."""
    for folder, listing, file_id, words in [
        ("librivox", "transcription", "austen-0880", "he was not an ill disposed young man"),
        ("cards", "cards.transcription", "001", "ten of clubs "),
    ]:
        (root / folder).mkdir(parents=True)
        soundfile.write(root / folder / f"{file_id}.wav", np.zeros(1600, np.int16), 16000)
        line = broken_line or f"<s> {words.upper()} </s> ({file_id})"
        (root / folder / listing).write_text(line + "\n\n")
    return root


def test_the_csv_lists_each_recording_with_its_transcript(tmp_path, capsys):
    root = package_like(tmp_path / "data")
    assert main([str(tmp_path / "out"), "--root", str(root)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "test.csv")
    samples = read_csv(tmp_path / "out" / "test.csv")
    assert [(s.path, s.transcript) for s in samples] == [
        (root / "librivox" / "austen-0880.wav", "he was not an ill disposed young man"),
        (root / "cards" / "001.wav", "ten of clubs"),  # lower case, one space between words
    ]
    assert samples[0].size == (root / "librivox" / "austen-0880.wav").stat().st_size


def test_without_the_package_the_message_says_how_to_install_it(tmp_path, capsys):
    assert main([str(tmp_path / "out"), "--root", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert "apt-get install pocketsphinx-testdata" in err and str(tmp_path / "none") in err
    assert not (tmp_path / "out" / "test.csv").exists()


def test_a_folder_that_is_not_the_package_s_is_named_as_such(tmp_path):
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match="is not pocketsphinx-testdata's data folder"):
        pocketsphinx_test_csv(tmp_path / "out", tmp_path / "other")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(NotADirectoryError, match="OUT_DIR must be a folder"):
        pocketsphinx_test_csv(tmp_path / "a_file", package_like(tmp_path / "data"))


def test_a_line_that_is_not_sphinx_format_is_named(tmp_path):
    root = package_like(tmp_path / "data", broken_line="ten of clubs")
    with pytest.raises(ValueError, match=r"transcription:1: expected '<s> words </s> \(file id\)'"):
        pocketsphinx_test_csv(tmp_path / "out", root)


@pytest.mark.skipif(
    not POCKETSPHINX_DATA.is_dir(),
    reason="Debian's pocketsphinx-testdata is not installed: apt-get install pocketsphinx-testdata",
)
def test_the_installed_package_gives_ten_real_utterances(tmp_path):
    samples = read_csv(pocketsphinx_test_csv(tmp_path))
    assert len(samples) == 10
    seconds = 0.0
    for sample in samples:
        info = soundfile.info(sample.path)
        assert info.samplerate == 16000 and info.channels == 1
        seconds += info.duration
    assert 30 < seconds < 40
    assert samples[0].transcript.startswith("and mister john dashwood had then leisure")
