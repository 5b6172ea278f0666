import pytest
import pytorch_lightning as pl
import torch

from freezeft.speech.model import LAYER_NAMES
from freezeft.speech.module import SpeechModule
from freezeft.speech.transfer import dropped_layers, load_source, transfer_weights

ENGLISH = list(" abcdefghijklmnopqrstuvwxyz'")
GERMAN = list(" abcdefghijklmnopqrstuvwxyzäöüß")


@pytest.fixture(scope="module")
def source_ckpt(tmp_path_factory):
    """A real Lightning checkpoint of an (untrained) English SpeechModule."""
    torch.manual_seed(1)
    module = SpeechModule(labels=ENGLISH, n_hidden=16)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    path = tmp_path_factory.mktemp("source") / "source.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("n", range(6))
def test_drop_source_layers_reinitialises_exactly_the_named_layers(source_ckpt, n):
    source, _ = load_source(source_ckpt)
    torch.manual_seed(2)
    target = SpeechModule(labels=GERMAN if n else ENGLISH, n_hidden=16)
    fresh = {k: v.clone() for k, v in target.model.state_dict().items()}
    report = transfer_weights(target, source_ckpt, drop_source_layers=n)

    dropped = set(LAYER_NAMES[len(LAYER_NAMES) - n :]) if n else set()
    assert set(report.dropped_layers) == dropped
    for name, tensor in target.model.state_dict().items():
        if name.split(".")[0] in dropped:
            assert torch.equal(tensor, fresh[name]), name  # kept the target's own init
            assert name in report.reinitialised
        else:
            assert torch.equal(tensor, source[name]), name  # bit-identical to the source
            assert name in report.loaded
    assert len(report.loaded) + len(report.reinitialised) == len(fresh)


def test_changed_alphabet_without_dropping_is_a_clear_error(source_ckpt):
    target = SpeechModule(labels=GERMAN, n_hidden=16)
    with pytest.raises(ValueError, match=r"Set `transfer.drop_source_layers` to 1 or more"):
        transfer_weights(target, source_ckpt, drop_source_layers=0)


def test_other_width_lists_mismatching_tensors(source_ckpt):
    target = SpeechModule(labels=GERMAN, n_hidden=8)
    shapes = r"layer_1.weight: source \(16, 494\) vs target \(8, 494\)"
    with pytest.raises(ValueError, match=shapes):
        transfer_weights(target, source_ckpt, drop_source_layers=1)


def test_drop_source_layers_range():
    assert dropped_layers(2) == ["layer_6", "layer_5"]
    with pytest.raises(ValueError, match=r"in 0..5.*but got 6"):
        dropped_layers(6)


def test_missing_and_foreign_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_source(tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="could not be read as a checkpoint"):
        load_source(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="does not record its alphabet"):
        load_source(tmp_path / "other.ckpt")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_text("")
    with pytest.raises(IsADirectoryError, match=r"is a folder, not a checkpoint.*last.ckpt"):
        load_source(tmp_path / "run")
    (tmp_path / "rows.csv").write_text("wav_filename,wav_filesize,transcript\n")
    with pytest.raises(ValueError, match=r"could not be read as a checkpoint \([^\n]*\); set"):
        load_source(tmp_path / "rows.csv")  # torch's many-line message cut to its first line
