"""No code from a checkpoint: a pickle payload in a .ckpt never runs (issue 21, finding 1)."""

from __future__ import annotations

import pickle

import pytest

from freezeft.checkpointing import find_resume_checkpoint, load_checkpoint


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
    from freezeft.transcribe import main

    marker = tmp_path / "attacker-was-here"
    evil_checkpoint(tmp_path / "model.ckpt", marker)
    (tmp_path / "a.wav").write_bytes(b"")
    assert main([str(tmp_path / "model.ckpt"), str(tmp_path / "a.wav")]) == 1
    assert "was refused: loading it would run code" in capsys.readouterr().err
    assert not marker.exists()
