"""The README's callbacks example runs as printed and does what its comments say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.library

README = Path(__file__).parents[1] / "README.md"


def test_the_readme_callbacks_example_thaws_the_encoder_at_a_tenth_of_the_lr(tmp_path, monkeypatch):
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    assert len(code.splitlines()) <= 25, "the README promises a short example"
    monkeypatch.chdir(tmp_path)  # Lightning writes lightning_logs/ and checkpoints here
    scope: dict = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), scope)
    trainer = scope["trainer"]
    model = trainer.lightning_module
    assert trainer.current_epoch == 4
    assert all(p.requires_grad for p in model.parameters())  # thawed at epoch 2
    lrs = {}
    for group in trainer.optimizers[0].param_groups:
        for p in group["params"]:
            lrs[id(p)] = group["initial_lr"] if "initial_lr" in group else group["lr"]
    encoder = [lrs[id(p)] for p in model.net[0].parameters()]
    head = [lrs[id(p)] for p in model.net[4].parameters()]
    assert encoder == pytest.approx([1e-4, 1e-4]) and head == pytest.approx([1e-3, 1e-3])
