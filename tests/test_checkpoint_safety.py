"""No code from a checkpoint: a pickle payload in a .ckpt never runs (issue 21, finding 1)."""

from __future__ import annotations

import pickle

import pytest

from freezeft.app.run_dir import find_resume_checkpoint
from freezeft.checkpoint_io import load_checkpoint


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creating a file is the attacker's side effect


def evil_checkpoint(path, marker) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"state_dict": {}, "epoch": Payload(str(marker))}))


def test_a_checkpoint_carrying_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "attacker-was-here"
    evil_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(ValueError, match="was refused: loading it would run code it carries"):
        load_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


@pytest.mark.parametrize("zipped", [True, False], ids=["torch.save", "legacy torch.save"])
def test_a_payload_saved_by_torch_is_refused_as_code_not_as_a_bad_file(tmp_path, zipped):
    import torch

    marker = tmp_path / "attacker-was-here"
    torch.save(
        {"state_dict": {}, "epoch": Payload(str(marker))},
        tmp_path / "evil.ckpt",
        _use_new_zipfile_serialization=zipped,
    )
    with pytest.raises(ValueError, match="was refused: loading it would run code it carries"):
        load_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_resume_from_a_run_dir_with_a_payload_runs_nothing(tmp_path):
    marker = tmp_path / "attacker-was-here"
    evil_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(ValueError, match="No checkpoint of .* loads:.*was refused"):
        find_resume_checkpoint(tmp_path / "run")
    with pytest.raises(ValueError, match="was refused"):
        find_resume_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert not marker.exists()


def test_transcribe_refuses_a_payload_and_runs_nothing(tmp_path, capsys):
    from freezeft.speech.transcribe import main

    marker = tmp_path / "attacker-was-here"
    evil_checkpoint(tmp_path / "model.ckpt", marker)
    (tmp_path / "a.wav").write_bytes(b"")
    assert main([str(tmp_path / "model.ckpt"), str(tmp_path / "a.wav")]) == 1
    assert "was refused: loading it would run code" in capsys.readouterr().err
    assert not marker.exists()


# A damaged checkpoint is damaged, not code; a zip bomb is refused before loading (issue 33)


def lightning_checkpoint(path):
    """A real Lightning checkpoint of a tiny module, as the app's ModelCheckpoint writes."""
    import torch
    from tiny_models import quiet_trainer
    from torch import nn

    from freezeft._lightning import pl

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 3)

    trainer = quiet_trainer()
    trainer.strategy.connect(Tiny())
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["state_dict"]["layer.weight"].shape == (3, 4)
    return path


def rewritten(path, *, drop=None, cut=None):
    """``path`` with the zip entry ending in ``drop`` left out, or the one ending in ``cut``
    cut to 8 bytes; every entry stored, as torch.save stores them."""
    import zipfile

    damaged = path.with_name("damaged-" + path.name)
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(damaged, "w") as target:
        for entry in source.infolist():
            data = source.read(entry.filename)
            if drop and entry.filename.endswith(drop):
                continue
            if cut and entry.filename.endswith(cut):
                data = data[:8]
            target.writestr(entry, data)
    damaged.replace(path)
    return path


@pytest.mark.parametrize(
    "damage, said",
    [
        (dict(drop="/data/0"), "the tensor `layer.weight`'s record data/0 is missing"),
        (
            dict(cut="/data/0"),
            "the tensor `layer.weight`'s record data/0 holds 8 bytes, not the 48 of its 12 "
            "float32 values",
        ),
    ],
    ids=["record missing", "record cut short"],
)
def test_a_damaged_lightning_checkpoint_is_called_damaged_not_code(tmp_path, damage, said):
    path = rewritten(lightning_checkpoint(tmp_path / "last.ckpt"), **damage)
    with pytest.raises(ValueError) as refused:
        load_checkpoint(path)
    message = str(refused.value)
    assert message.startswith(f"{path} is damaged (cut short or altered after torch.save")
    assert said in message and "use another checkpoint of the run" in message
    assert "would run code" not in message and "--trust-checkpoint" not in message


def test_a_cut_checkpoint_says_truncated(tmp_path):
    path = lightning_checkpoint(tmp_path / "last.ckpt")
    path.write_bytes(path.read_bytes()[:1000])  # a killed copy
    with pytest.raises(ValueError, match=r"last.ckpt is truncated: it ends after 1,000 bytes"):
        load_checkpoint(path)


def test_resume_skips_a_damaged_last_checkpoint_as_damaged(tmp_path):
    import os

    older = lightning_checkpoint(tmp_path / "run" / "checkpoints" / "epoch=0.ckpt")
    last = rewritten(lightning_checkpoint(older.with_name("last.ckpt")), drop="/data/1")
    os.utime(older, (1, 1))  # the older one is older
    with pytest.warns(UserWarning, match=r"Skipping a bad checkpoint: .*last.ckpt is damaged"):
        assert find_resume_checkpoint(tmp_path / "run") == (tmp_path / "run", older)
    assert last.exists()


class Custom:
    """A class of the user's: a weights-only load may not import it."""


@pytest.mark.parametrize(
    "carried, named",
    [(Custom, "test_checkpoint_safety.Custom"), ("system", "posix.system")],
    ids=["a custom class", "os.system"],
)
def test_a_lightning_checkpoint_carrying_code_is_still_refused_as_code(tmp_path, carried, named):
    import os

    import torch

    class Calls:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'attacker-was-here'}",))

    path = lightning_checkpoint(tmp_path / "last.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"] = {"extra": Custom() if carried is Custom else Calls()}
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="was refused: loading it would run code it carries") as e:
        load_checkpoint(path)
    assert f"it imports {named}, which a weights-only load does not allow" in str(e.value)
    assert not (tmp_path / "attacker-was-here").exists()


def deflated(path):
    """``path`` (a torch.save zip) with every entry DEFLATE-compressed, written in chunks."""
    import shutil
    import zipfile

    bomb = path.with_name("bomb-" + path.name)
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(bomb, "w") as target:
        for entry in source.infolist():
            packed = zipfile.ZipInfo(entry.filename, entry.date_time)
            packed.compress_type = zipfile.ZIP_DEFLATED
            with source.open(entry) as read, target.open(packed, "w") as write:
                shutil.copyfileobj(read, write, 2**20)
    return bomb


def zip_bomb(folder, mib=64):
    """A checkpoint of one ``mib`` MiB zero tensor, deflated to well under 1 MiB."""
    import torch

    plain = folder / "zeros.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(mib * 2**18)}}, plain)
    bomb = deflated(plain)
    plain.unlink()
    return bomb


def test_a_zip_bomb_checkpoint_is_refused_before_loading(tmp_path, monkeypatch):
    import torch

    bomb = zip_bomb(tmp_path)  # torch.load would unpack it to 64 MiB (and keep both)
    assert bomb.stat().st_size < 2**20
    loaded = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loaded.append(a))
    with pytest.raises(ValueError) as refused:
        load_checkpoint(bomb)
    assert str(refused.value).startswith(
        f"{bomb} was refused before loading: its entry zeros/data/0 is compressed (6"
    )
    assert "bytes that unpack to 67,108,864; 6 more of its entries are)" in str(refused.value)
    assert "which torch.save never writes" in str(refused.value)
    assert not loaded  # refused from the zip's directory, before torch.load


def test_a_zip_whose_directory_declares_more_than_the_file_holds_is_refused(tmp_path):
    import struct
    import zipfile

    path = lightning_checkpoint(tmp_path / "last.ckpt")
    with zipfile.ZipFile(path) as archive:
        directory = archive.start_dir
    data = bytearray(path.read_bytes())
    entry = data.rindex(b"PK\x01\x02", directory, data.index(b"data/0", directory))
    data[entry + 20 : entry + 28] = struct.pack("<II", 2**30, 2**30)  # data/0's sizes: 1 GiB
    path.write_bytes(data)
    with pytest.raises(ValueError, match=r"last.ckpt was refused before loading: its zip "
                       r"directory declares 1,073,7\d\d,\d\d\d bytes of entries in a file of "
                       r"[\d,]+ bytes \(e.g. \S+/data/0: 1,073,741,824 bytes\)"):  # fmt: skip
        load_checkpoint(path)
