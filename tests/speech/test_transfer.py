import pytest
import torch
from tiny_models import quiet_trainer

from freezeft.speech.drop_layers import dropped_layers, load_source, transfer_weights
from freezeft.speech.model import LAYER_NAMES
from freezeft.speech.module import SpeechModule

ENGLISH = list(" abcdefghijklmnopqrstuvwxyz'")
GERMAN = list(" abcdefghijklmnopqrstuvwxyzäöüß")


@pytest.fixture(scope="module")
def source_ckpt(tmp_path_factory):
    """A real Lightning checkpoint of an (untrained) English SpeechModule."""
    torch.manual_seed(1)
    module = SpeechModule(labels=ENGLISH, n_hidden=16)
    trainer = quiet_trainer()
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
    with pytest.raises(ValueError, match=r"^transfer.source: \S+junk.ckpt is not a readable "
                       r"checkpoint: torch.save writes a zip archive .*neither \(it begins "
                       r"with b'not a checkpoint'\)"):  # fmt: skip
        load_source(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=r"holds no DeepSpeech tensors \(`model.layer_1.weight"):
        load_source(tmp_path / "other.ckpt")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_text("")
    with pytest.raises(IsADirectoryError, match=r"is a folder, not a checkpoint.*last.ckpt"):
        load_source(tmp_path / "run")
    (tmp_path / "rows.csv").write_text("wav_filename,wav_filesize,transcript\n")
    with pytest.raises(ValueError, match=r"rows.csv is not a readable checkpoint") as refused:
        load_source(tmp_path / "rows.csv")
    assert "\n" not in str(refused.value)


# Plain state dicts, odd values, other kinds of numbers, zip bombs (issue 33)


@pytest.mark.parametrize("whose", ["module", "model"])
def test_a_plain_state_dict_transfers_like_a_checkpoint(source_ckpt, tmp_path, whose):
    source, _ = load_source(source_ckpt)
    torch.manual_seed(1)
    module = SpeechModule(labels=ENGLISH, n_hidden=16)
    plain = tmp_path / "weights.pt"
    torch.save(module.state_dict() if whose == "module" else module.model.state_dict(), plain)
    state, labels = load_source(plain)
    assert labels is None and set(state) == set(source)
    target = SpeechModule(labels=GERMAN, n_hidden=16)
    report = transfer_weights(target, plain, drop_source_layers=1)
    assert report.source_labels is None and "the source records no alphabet" in report.summary()
    for name in report.loaded:
        assert torch.equal(target.model.state_dict()[name], source[name]), name
    assert report.reinitialised == ["layer_6.weight", "layer_6.bias"]
    same = SpeechModule(labels=ENGLISH, n_hidden=16)
    said = r"records no alphabet \(a plain state dict\), so its layer_6 is loaded as if its "
    with pytest.warns(UserWarning, match=said + "outputs were this run's 28 labels"):
        transfer_weights(same, plain, drop_source_layers=0)
    assert torch.equal(same.model.layer_6.weight, source["layer_6.weight"])


def test_a_list_for_a_tensor_or_for_hyper_parameters_names_the_key(source_ckpt, tmp_path):
    checkpoint = torch.load(source_ckpt, weights_only=True)
    checkpoint["state_dict"]["model.layer_2.bias"] = [0.0] * 16
    torch.save(checkpoint, tmp_path / "list.ckpt")
    with pytest.raises(ValueError, match=r"^transfer.source: \S+list.ckpt: "
                       r"state_dict\['model.layer_2.bias'\] is a list, not a tensor"):  # fmt: skip
        transfer_weights(SpeechModule(labels=ENGLISH, n_hidden=16), tmp_path / "list.ckpt", 0)
    checkpoint = torch.load(source_ckpt, weights_only=True)
    checkpoint["hyper_parameters"] = list(checkpoint["hyper_parameters"].items())
    torch.save(checkpoint, tmp_path / "hparams.ckpt")
    with pytest.raises(ValueError, match=r"^transfer.source: \S+hparams.ckpt: its "
                       r"`hyper_parameters` is a list, not the dict"):  # fmt: skip
        load_source(tmp_path / "hparams.ckpt")


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.bool])
def test_a_source_tensor_of_integers_or_complex_numbers_is_refused(source_ckpt, tmp_path, dtype):
    checkpoint = torch.load(source_ckpt, weights_only=True)
    bias = checkpoint["state_dict"]["model.layer_3.bias"]
    checkpoint["state_dict"]["model.layer_3.bias"] = torch.ones_like(bias, dtype=dtype)
    torch.save(checkpoint, tmp_path / "ints.ckpt")
    target = SpeechModule(labels=GERMAN, n_hidden=16)
    before = target.model.layer_3.bias.clone()
    kind = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=rf"^transfer.source=\S+ints.ckpt: 1 of its tensors holds "
                       rf"another kind of number than the model's \(layer_3.bias is {kind} "
                       r"there, float32 here\), which loading would cast silently"):  # fmt: skip
        transfer_weights(target, tmp_path / "ints.ckpt", drop_source_layers=1)
    assert torch.equal(target.model.layer_3.bias, before)  # nothing was copied


def test_a_zip_bomb_source_is_refused_before_loading(tmp_path):
    from test_checkpoint_safety import zip_bomb

    bomb = zip_bomb(tmp_path, mib=16)
    with pytest.raises(ValueError, match=r"^transfer.source: \S+ was refused before loading: its "
                       r"entry zeros/data/0 is compressed"):  # fmt: skip
        load_source(bomb)
