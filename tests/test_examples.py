"""The examples run as users run them: a plain Lightning project and LightningCLI."""

from pathlib import Path

import pytest
from pyrun import run_python

pytestmark = pytest.mark.slow  # subprocess runs

EXAMPLES = Path(__file__).parents[1] / "examples"


def run(tmp_path: Path, script: str, *args: str) -> str:
    # From a temp dir: LightningCLI writes its config.yaml to the working directory.
    proc = run_python(
        [str(EXAMPLES / script), *args],
        cwd=tmp_path,
        env={"PYTHONPATH": str(EXAMPLES)},
        timeout=300,
    )
    return proc.stdout + proc.stderr


def test_plain_lightning_project_transfers_with_the_callbacks(tmp_path):
    out = run(tmp_path, "shapes_classifier.py")
    assert "FreezeThenUnfreeze: epoch 2: unfroze ['encoder.0', 'encoder.1', 'encoder.4'" in out
    accuracy = float(out.rsplit("target accuracy after transfer: ", 1)[1].split()[0])
    assert accuracy > 0.6  # chance is 1/3


def test_lightning_cli_takes_the_callbacks_from_the_command_line(tmp_path):
    out = run(
        tmp_path,
        "cli.py",
        "fit",
        "--model.classes=3",
        "--trainer.max_epochs=3",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks+=freezeft.callbacks.FreezeThenUnfreeze",
        "--trainer.callbacks.unfreeze_at_epoch=1",
        "--trainer.callbacks+=freezeft.callbacks.LRWarmup",
        "--trainer.callbacks.warmup_steps=5",
    )
    assert "FreezeThenUnfreeze + LRWarmup: layer groups" in out
    assert "FreezeThenUnfreeze: epoch 1: unfroze" in out


def test_hf_lora_example_trains_adapters_and_head_but_no_base_weight(tmp_path):
    out = run(tmp_path, "hf_lora.py")
    assert "BERT base weights changed: 0 of 73" in out
    assert "FreezeThenUnfreeze: epoch 1: unfroze ['model.base_model.model.bert.encoder" in out
    assert float(out.rsplit("validation accuracy: ", 1)[1].split()[0]) > 0.7  # 0.77 measured


def test_timm_vit_example_transfers_block_by_block(tmp_path):
    out = run(tmp_path, "timm_vit.py")
    assert "GradualUnfreeze: epoch 1: unfroze ['model.blocks.3+model.norm']" in out
    assert float(out.rsplit("target accuracy after transfer: ", 1)[1].split()[0]) > 0.9


def test_wav2vec2_example_trains_lm_head_only(tmp_path):
    out = run(tmp_path, "wav2vec2_ctc.py")
    assert "wav2vec2 encoder weights changed: 0 of 45" in out
    before, after = out.rsplit("validation CTC loss: ", 1)[1].split(" before, ")
    assert float(after.split()[0]) < 0.2 * float(before)
