"""`python -m freezeft.transcribe CKPT AUDIO...` on a real checkpoint and real audio."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import soundfile

from freezeft.speech.data import SpeechDataModule
from freezeft.speech.module import SpeechModule
from freezeft.transcribe import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, german_corpus):
    folder = tmp_path_factory.mktemp("model")
    data = SpeechDataModule(data_dir=german_corpus, batch_size=8, num_workers=0)
    module = SpeechModule(labels=data.alphabet.labels, n_hidden=32)
    trainer = pl.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(folder / "model.ckpt")
    return folder / "model.ckpt"


def test_each_file_gets_a_line_and_a_bad_one_a_message(checkpoint, german_corpus, tmp_path,
                                                       capsys):  # fmt: skip
    wav = german_corpus / "test" / "00000.wav"
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
