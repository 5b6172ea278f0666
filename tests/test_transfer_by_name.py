"""Transfer by name and shape (freezeft.transfer): what a model without its own transfer gets."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch import nn

from freezeft._lightning import pl
from freezeft.transfer import load_matching

pytestmark = pytest.mark.library  # runs where only torch and Lightning are installed


class Net(pl.LightningModule):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, classes)


def test_a_lightning_checkpoint_loads_by_name_and_shape(tmp_path):
    torch.manual_seed(0)
    source = Net(classes=5)
    path = tmp_path / "source.ckpt"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)  # what Lightning writes
    torch.manual_seed(1)
    target = Net(classes=3)
    head_before = target.head.weight.clone()
    report = load_matching(target, path)
    for name, tensor in source.encoder.state_dict().items():
        assert torch.equal(target.encoder.state_dict()[name], tensor)
    assert torch.equal(target.head.weight, head_before)  # a new head stays as initialised
    assert report.loaded == sorted(f"encoder.{k}" for k in source.encoder.state_dict())
    assert report.reinitialised == {
        "head.weight": "shape (5, 8) in the source, (3, 8) here",
        "head.bias": "shape (5,) in the source, (3,) here",
    }
    report.to_json(tmp_path / "transfer.json")
    written = json.loads((tmp_path / "transfer.json").read_text())
    assert written["reinitialised"]["head.bias"] == "shape (5,) in the source, (3,) here"


def test_a_state_dict_file_loads_and_names_what_the_model_lacks(tmp_path):
    source = Net(classes=3)
    state = {**source.state_dict(), "extra.weight": torch.zeros(2)}
    state.pop("head.bias")
    torch.save(state, tmp_path / "weights.pt")
    target = Net(classes=3)
    report = load_matching(target, tmp_path / "weights.pt")
    assert torch.equal(target.head.weight, source.head.weight)
    assert report.reinitialised == {"head.bias": "not in the source"}
    assert report.unused == ["extra.weight"]


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creating a file is the attacker's side effect


def test_a_checkpoint_that_runs_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "attacker-was-here"
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {"head.weight": Payload(str(marker))}}))
    with pytest.raises(ValueError, match="transfer.source: .* was refused: loading it would run"):
        load_matching(Net(classes=3), path)
    assert not marker.exists()


def test_a_source_of_another_design_is_refused_by_name(tmp_path):
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="none of its 1 tensors matches the model by name"):
        load_matching(Net(classes=3), tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="transfer.source: No checkpoint at"):
        load_matching(Net(classes=3), tmp_path / "missing.ckpt")


@pytest.mark.parametrize("dtype", [torch.int32, torch.complex64])
def test_integer_or_complex_source_tensors_are_refused_not_cast(tmp_path, dtype):
    state = Net(classes=3).state_dict()
    state["encoder.0.weight"] = torch.ones(8, 4, dtype=dtype)
    torch.save(state, tmp_path / "weights.pt")  # a plain state dict
    target = Net(classes=3)
    before = target.encoder[0].weight.clone()
    kind = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=rf"transfer.source=\S+weights.pt: 1 of its tensors holds "
                       rf"another kind of number than the model's \(encoder.0.weight is {kind} "
                       r"there, float32 here\)"):  # fmt: skip
        load_matching(target, tmp_path / "weights.pt")
    assert torch.equal(target.encoder[0].weight, before)


def test_a_float64_source_still_loads_into_float32(tmp_path):
    source = Net(classes=3).double()
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    target = Net(classes=3)
    load_matching(target, tmp_path / "weights.pt")
    assert torch.equal(target.head.weight, source.head.weight.float())


def test_a_zip_bomb_source_is_refused_before_loading(tmp_path):
    from test_checkpoint_safety import zip_bomb

    with pytest.raises(ValueError, match=r"^transfer.source: \S+ was refused before loading"):
        load_matching(Net(classes=3), zip_bomb(tmp_path, mib=16))
