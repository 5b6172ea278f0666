"""`python -m freezeft.transcribe CKPT AUDIO...` on a real checkpoint and real audio."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import jiwer
import numpy as np
import pytest
import pytorch_lightning as pl
import soundfile
import torch
from tiny_models import quiet_trainer

from freezeft.speech.data import SpeechDataModule
from freezeft.speech.manifest import read_csv
from freezeft.speech.module import SpeechModule
from freezeft.speech.scorer import Scorer
from freezeft.speech.transcribe import load_model, main, transcribe


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, german_mini):
    folder = tmp_path_factory.mktemp("model")
    data = SpeechDataModule(data_dir=german_mini, batch_size=8, num_workers=0)
    module = SpeechModule(labels=data.alphabet.labels, n_hidden=32)
    trainer = quiet_trainer(max_epochs=1, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(folder / "model.ckpt")
    return folder / "model.ckpt"


def test_each_file_gets_a_line_and_a_bad_one_a_message(checkpoint, german_mini, tmp_path,
                                                       capsys):  # fmt: skip
    wav = german_mini / "test" / "00000.wav"
    audio, rate = soundfile.read(wav, dtype="float32")
    stereo_8k = tmp_path / "stereo_8k.flac"  # another rate and two channels: converted
    soundfile.write(stereo_8k, np.stack([audio[::2], audio[::2]], axis=1), rate // 2)
    (tmp_path / "broken.wav").write_bytes(b"not audio")
    files = [str(wav), str(tmp_path / "broken.wav"), str(stereo_8k), str(tmp_path / "gone.wav")]
    assert main([str(checkpoint), *files]) == 1  # some files failed
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [files[0], files[2]]  # in order
    assert all(len(line.split("\t")) == 2 for line in lines)
    assert f"cannot read {files[1]}" in err and f"cannot read {files[3]}: no such file" in err


def test_a_file_that_is_no_checkpoint_is_one_message(tmp_path, capsys):
    (tmp_path / "x.ckpt").write_text("no")
    assert main([str(tmp_path / "x.ckpt"), "a.wav"]) == 1
    assert "is not a readable checkpoint" in capsys.readouterr().err


@pytest.fixture(scope="module")
def beam_run(tmp_path_factory, german_mini):
    """A run dir as `python -m freezeft.run decoder=beam` leaves it: checkpoints/ and scorer/."""
    run = tmp_path_factory.mktemp("run")
    pl.seed_everything(0)
    text = run / "words.txt"
    text.write_text("die katze\nder hund\nein haus\n")
    data = SpeechDataModule(data_dir=german_mini, batch_size=8, num_workers=0)
    decoder = {"name": "beam", "lm_text": str(text), "lm_weight": 1.0, "word_score": 0.0}
    module = SpeechModule(labels=data.alphabet.labels, n_hidden=32, decoder=decoder)
    trainer = quiet_trainer(max_epochs=1, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(run / "checkpoints" / "best.ckpt")
    Scorer.build(run / "scorer", data.alphabet.labels, lm_text=text)
    text.unlink()  # the text is not needed once the scorer is built
    return run


def test_a_beam_run_is_transcribed_with_its_scorer(beam_run, german_mini, capsys):
    wav = str(german_mini / "test" / "00000.wav")
    checkpoint = str(beam_run / "checkpoints" / "best.ckpt")
    assert main([checkpoint, wav]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    text = line.split("\t")[1]
    assert set(text.split()) <= {"die", "katze", "der", "hund", "ein", "haus"}
    model = load_model(checkpoint)
    scorer = Scorer.load(beam_run / "scorer", model.alphabet.labels)
    assert text == transcribe(model, wav, scorer)  # the run's scorer decoded it
    assert main([checkpoint, wav, "--decoder", "greedy"]) == 0
    greedy = capsys.readouterr().out.split("\t")[1].strip()
    assert greedy == transcribe(model, wav)  # no scorer: greedy


def test_a_beam_run_without_its_scorer_says_how_to_go_on(beam_run, tmp_path, capsys):
    moved = tmp_path / "checkpoints"
    moved.mkdir()
    (moved / "best.ckpt").write_bytes((beam_run / "checkpoints" / "best.ckpt").read_bytes())
    assert main([str(moved / "best.ckpt"), "a.wav"]) == 1
    err = capsys.readouterr().err
    assert "scorer folder" in err and "--scorer DIR" in err and "--decoder greedy" in err
    assert main([str(moved / "best.ckpt"), "a.wav", "--scorer", str(beam_run / "scorer")]) == 1
    assert "cannot read a.wav" in capsys.readouterr().err  # the scorer loaded; the file is gone


def test_a_broken_scorer_is_named_not_blamed_on_the_audio(beam_run, tmp_path, capsys):
    broken = tmp_path / "scorer"
    broken.mkdir()
    for item in (beam_run / "scorer").iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / "lm.arpa").write_text((broken / "lm.arpa").read_text()[:60])  # truncated
    checkpoint = str(beam_run / "checkpoints" / "best.ckpt")
    assert main([checkpoint, "a.wav", "--scorer", str(broken)]) == 1
    err = capsys.readouterr().err
    assert f"The scorer in {broken} cannot be read" in err and "a.wav" not in err


def stopped_during_tuning(beam_run, folder):
    """A copy of ``beam_run`` as a run killed while tuning leaves it: a config that tunes the
    weights (none fixed), a scorer.json with the first weights tried and "tuned_on": null."""
    (folder / "checkpoints").mkdir(parents=True)
    saved = torch.load(beam_run / "checkpoints" / "best.ckpt", weights_only=False)
    saved["hyper_parameters"]["decoder"].update(lm_weight=None, word_score=None)
    torch.save(saved, folder / "checkpoints" / "best.ckpt")
    shutil.copytree(beam_run / "scorer", folder / "scorer")
    labels = saved["hyper_parameters"]["labels"]
    Scorer.load(folder / "scorer", labels).with_weights(0.5, -1.0).save()
    return folder / "checkpoints" / "best.ckpt", labels


def test_an_untuned_scorer_is_used_with_a_one_line_warning(beam_run, german_mini, tmp_path,
                                                          capsys):  # fmt: skip
    wav = str(german_mini / "test" / "00000.wav")
    checkpoint, labels = stopped_during_tuning(beam_run, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "scorer" / "scorer.json").read_text())["tuned_on"] is None
    assert main([str(checkpoint), wav]) == 0
    out, err = capsys.readouterr()
    (line,) = out.splitlines()  # still transcribed, with the untuned scorer
    scorer = Scorer.load(tmp_path / "run" / "scorer", labels)
    assert line.split("\t")[1] == transcribe(load_model(checkpoint), wav, scorer)
    (warning,) = err.splitlines()  # one line
    assert warning.startswith("freezeft.transcribe: warning: the scorer's lm_weight=0.5 and ")
    assert "word_score=-1.0" in warning and "not tuned on dev" in warning
    assert '"tuned_on": null' in warning and f"resume={tmp_path / 'run'}" in warning
    # once the resumed run has tuned and saved them: no warning
    scorer.with_weights(1.0, 0.0, tuned_on={"reference_words": 8, "wer": 0.5}).save()
    assert main([str(checkpoint), wav]) == 0
    assert capsys.readouterr().err == ""


def test_weights_the_run_fixed_are_not_called_untuned(beam_run, german_mini, capsys):
    # beam_run set decoder.lm_weight and decoder.word_score: nothing to tune
    assert json.loads((beam_run / "scorer" / "scorer.json").read_text())["tuned_on"] is None
    wav = str(german_mini / "test" / "00000.wav")
    assert main([str(beam_run / "checkpoints" / "best.ckpt"), wav]) == 0
    assert capsys.readouterr().err == ""


def test_a_csv_is_transcribed_and_scored_against_its_transcripts(checkpoint, german_mini,
                                                                 capsys):  # fmt: skip
    csv_file = german_mini / "test.csv"
    samples = read_csv(csv_file)
    assert main([str(checkpoint), "--csv", str(csv_file), "--decoder", "greedy"]) == 0
    lines = capsys.readouterr().out.splitlines()
    heard = [line.split("\t") for line in lines[:-1]]
    assert [Path(f) for f, _ in heard] == [s.path for s in samples]
    # the summary is the corpus-level WER and CER of those transcripts, as jiwer counts them
    refs = [s.transcript for s in samples]
    cer = jiwer.cer(refs, [h for _, h in heard])
    wer = jiwer.wer(refs, [h for _, h in heard])
    n = len(samples)
    assert lines[-1].startswith(f"WER {wer:.3f}  CER {cer:.3f}  ({n} of {n} utterances of")


def test_a_csv_row_the_model_cannot_spell_or_hear_is_named(checkpoint, german_mini, tmp_path,
                                                          capsys):  # fmt: skip
    wav = german_mini / "test" / "00000.wav"
    bad = tmp_path / "bad.csv"
    bad.write_text(f"wav_filename,wav_filesize,transcript\n{wav},1,Zehn Kreuz!\n")
    assert main([str(checkpoint), "--csv", str(bad), "--decoder", "greedy"]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2: transcript 'Zehn Kreuz!' has characters outside" in err
    partly = tmp_path / "partly.csv"
    partly.write_text(
        f"wav_filename,wav_filesize,transcript\n{wav},1,ja\n{tmp_path / 'gone.wav'},1,nein\n"
    )
    assert main([str(checkpoint), "--csv", str(partly), "--decoder", "greedy"]) == 1
    out, err = capsys.readouterr()
    assert f"cannot read {tmp_path / 'gone.wav'} ({partly}:3)" in err
    assert "(1 of 2 utterances of" in out and "1 unreadable, left out" in out


def test_audio_files_and_a_csv_together_are_refused(checkpoint, german_mini, capsys):
    with pytest.raises(SystemExit):
        main([str(checkpoint), "a.wav", "--csv", str(german_mini / "test.csv")])
    assert "give audio files or --csv FILE" in capsys.readouterr().err


def test_nan_empty_and_special_files_are_refused_by_name(checkpoint, german_mini, tmp_path,
                                                         capsys):  # fmt: skip
    wav = str(german_mini / "test" / "00000.wav")
    audio, rate = soundfile.read(wav, dtype="float32")
    nan = audio.copy()
    nan[:100] = np.nan
    soundfile.write(tmp_path / "nan.wav", nan, rate, subtype="FLOAT")
    soundfile.write(tmp_path / "empty.wav", audio[:0], rate)
    os.mkfifo(tmp_path / "fifo.wav")
    bad = [str(tmp_path / name) for name in ("nan.wav", "empty.wav", "fifo.wav")]
    signal.alarm(60)  # opening the FIFO would block: fail instead of hanging
    try:
        # options after the audio files are read as options too
        assert main([str(checkpoint), wav, *bad, "/dev/zero", wav, "--decoder", "greedy"]) == 1
    finally:
        signal.alarm(0)
    out, err = capsys.readouterr()
    assert [line.split("\t")[0] for line in out.splitlines()] == [wav, wav]
    assert err.splitlines() == [
        f"freezeft.transcribe: refused {bad[0]}: 100 of its {len(audio)} samples are not "
        "finite (NaN or infinite)",
        f"freezeft.transcribe: refused {bad[1]}: it has no samples",
        f"freezeft.transcribe: cannot read {bad[2]}: {bad[2]} is a FIFO (named pipe), not a "
        "regular file",
        "freezeft.transcribe: cannot read /dev/zero: /dev/zero is a character device, not a "
        "regular file",
    ]
    csv_file = tmp_path / "nan.csv"
    csv_file.write_text(f"wav_filename,wav_filesize,transcript\n{wav},1,ja\n{bad[0]},1,nein\n")
    assert main([str(checkpoint), "--csv", str(csv_file), "--decoder", "greedy"]) == 1
    out, err = capsys.readouterr()
    assert f"refused {bad[0]} ({csv_file}:3): 100 of its" in err
    assert "(1 of 2 utterances of" in out and "; 1 refused, left out" in out


@pytest.mark.parametrize(
    "order",
    [
        ["--decoder", "greedy", "A", "B"],
        ["A", "--decoder", "greedy", "B"],
        ["A", "B", "--decoder", "greedy"],
    ],
)
def test_options_may_come_anywhere(checkpoint, german_mini, order, capsys):
    wavs = {name: str(german_mini / "test" / f"0000{i}.wav") for i, name in enumerate("AB")}
    assert main([str(checkpoint), *(wavs.get(arg, arg) for arg in order)]) == 0
    heard = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert heard == [wavs["A"], wavs["B"]]


def test_a_csv_error_is_one_line_with_its_file_and_line(tmp_path, capsys):
    path = tmp_path / "big.csv"
    path.write_text(
        "wav_filename,wav_filesize,transcript\n"
        + "a.wav,0,gut\n" * 5
        + 'b.wav,0,"gut\n'
        + "c.wav,0,gut\n" * 20000
    )
    assert main([str(tmp_path / "model.ckpt"), "--csv", str(path)]) == 1  # read first
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"freezeft.transcribe: error: {path}:7: a field runs over at least")
    path.write_bytes(b"wav_filename,wav_filesize,transcript\na.wav,0,g\0ut\n")
    assert main([str(tmp_path / "model.ckpt"), "--csv", str(path)]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"freezeft.transcribe: error: {path}:2: the row holds a NUL byte")
