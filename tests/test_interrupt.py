"""Interrupted work is never lost: a real run killed mid-epoch resumes to the same result."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from pyrun import run_python

from freezeft.app.run_dir import find_resume_checkpoint
from freezeft.checkpoint_io import AtomicCheckpointIO, load_checkpoint
from freezeft.history import read_history

TESTS = Path(__file__).parent
# 32 utterances in batches of 4: 8 steps per epoch (2 validation and 2 test batches);
# the encoder thaws at epoch 1
OVERRIDES = [
    "experiment=tiny",
    "data.batch_size=4",
    "strategy=freeze_then_unfreeze",
    "strategy.callbacks.freeze_then_unfreeze.unfreeze_at_epoch=1",
    "trainer.max_epochs=3",
]

#: the test's signal callback, in the interrupted run and (a resume has the run's config)
#: its resume; $SIGNAL_AT_STEP arms it in the first only
STOP = "+callbacks.stop._target_=signal_at_step.SignalAtStep"


def run(
    tmp_path: Path,
    cache_dir: Path,
    name: str,
    *extra: str,
    check: bool = True,
    overrides: list[str] = OVERRIDES,
    signal_at: str = "",
):
    """``signal_at``: ``STEP:SIGNAL:PHASE`` for the run's :class:`SignalAtStep` callback."""
    out = tmp_path / name
    proc = run_python(
        [
            "-m",
            "freezeft.run",
            *overrides,
            f"paths.cache_dir={cache_dir}",
            f"hydra.run.dir={out}",
            *extra,
        ],
        cwd=tmp_path,
        env={
            "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "SIGNAL_AT_STEP": signal_at,
        },
        check=check,
    )
    return out, proc


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
        "state_dict"
    ]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir, german_corpus, english_corpus):
    out, _ = run(tmp_path_factory.mktemp("whole"), cache_dir, "whole")
    return out


def interrupt(
    tmp_path: Path, cache_dir: Path, signal_name: str, step: int, phase: str
) -> tuple[Path, str]:
    """A real signal after training step ``step`` (``phase="train"``), or in the validation
    that follows it, or in testing."""
    out, proc = run(
        tmp_path,
        cache_dir,
        "cut",
        STOP,
        check=False,
        signal_at=f"{step}:{signal_name}:{phase}",
    )
    code = 130 if signal_name == "SIGINT" else 143  # as a shell reports either signal
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not (out / "results.json").exists()
    return out, proc.stdout


def interrupt_at_step_12(tmp_path: Path, cache_dir: Path, signal_name: str) -> Path:
    """Epoch 1, batch 5 of 8: after the encoder thawed, in the middle of an epoch."""
    out, stdout = interrupt(tmp_path, cache_dir, signal_name, 12, "train")
    assert f"resumable checkpoint: {out / 'checkpoints' / 'interrupted.ckpt'}" in stdout
    state = torch.load(
        out / "checkpoints" / "interrupted.ckpt", map_location="cpu", weights_only=False
    )
    assert state["global_step"] == 12 and state["epoch"] == 1
    seconds = [v["train_seconds"] for k, v in state["callbacks"].items() if "Interrupt" in k]
    assert seconds and seconds[0] > 0  # the time trained so far travels with the checkpoint
    (out / "trained_before_resume.txt").write_text(str(seconds[0]))
    return out


def assert_same_result(out: Path, uninterrupted: Path) -> None:
    resumed, whole = final_weights(out), final_weights(uninterrupted)
    assert resumed.keys() == whole.keys()
    for name in whole:
        assert torch.equal(resumed[name], whole[name]), name
    a = json.loads((out / "results.json").read_text())
    b = json.loads((uninterrupted / "results.json").read_text())
    assert (a["cer"], a["wer"], a["best_epoch"]) == (b["cer"], b["wer"], b["best_epoch"])
    before = out / "trained_before_resume.txt"
    if before.exists():  # the resumed run's training time includes the interrupted part
        assert a["train_seconds"] > float(before.read_text())
    lr_a = (out / "lr_schedule.csv").read_text()
    assert lr_a == (uninterrupted / "lr_schedule.csv").read_text()  # phase and LRs continued
    val_a, val_b = (
        [{k: v for k, v in e.items() if k.startswith("val_")} for e in read_history(d)]
        for d in (out, uninterrupted)
    )
    assert val_a == val_b  # every validation complete


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(
    tmp_path, cache_dir, uninterrupted
):
    out = interrupt_at_step_12(tmp_path, cache_dir, "SIGTERM")
    _, proc = run(tmp_path, cache_dir, "resumed", f"resume={out}", STOP)
    assert f"-> {out}/results.json" in proc.stdout  # finished in the original run dir
    assert json.loads((out / "results.json").read_text())["resumed_from"].endswith(
        "interrupted.ckpt"
    )
    assert_same_result(out, uninterrupted)


@pytest.mark.slow
def test_ctrl_c_then_a_truncated_checkpoint_falls_back_to_the_previous_one(
    tmp_path, cache_dir, uninterrupted
):
    out = interrupt_at_step_12(tmp_path, cache_dir, "SIGINT")
    newest = out / "checkpoints" / "interrupted.ckpt"
    newest.write_bytes(newest.read_bytes()[:5000])  # as if killed while writing
    _, proc = run(tmp_path, cache_dir, "resumed", f"resume={out}", STOP)
    assert (
        "Skipping a bad checkpoint" in proc.stderr
        and "interrupted.ckpt is truncated: it ends after 5,000 bytes" in proc.stderr
    )
    assert json.loads((out / "results.json").read_text())["resumed_from"].endswith("last.ckpt")
    assert_same_result(out, uninterrupted)  # the end-of-epoch-0 checkpoint replays epoch 1


@pytest.mark.slow
def test_sigterm_during_validation_then_resume_equals_an_uninterrupted_run(
    tmp_path, cache_dir, uninterrupted
):
    out, _ = interrupt(tmp_path, cache_dir, "SIGTERM", 16, "validation")  # epoch 1's
    state = torch.load(out / "checkpoints" / "interrupted.ckpt", weights_only=False)
    assert state["global_step"] == 16
    run(tmp_path, cache_dir, "resumed", f"resume={out}", STOP)
    assert_same_result(out, uninterrupted)  # all 24 steps trained, every validation whole


@pytest.mark.slow
def test_sigterm_during_test_exits_143_and_resume_writes_the_results(
    tmp_path, cache_dir, uninterrupted
):
    out, stdout = interrupt(tmp_path, cache_dir, "SIGTERM", 0, "test")
    assert "interrupted before the results were written; training had finished" in stdout
    run(tmp_path, cache_dir, "resumed", f"resume={out}", STOP)
    assert_same_result(out, uninterrupted)


@pytest.mark.slow
def test_resume_with_other_overrides_is_refused(tmp_path, cache_dir, uninterrupted):
    _, proc = run(tmp_path, cache_dir, "again", f"resume={uninterrupted}", "seed=1", check=False)
    assert proc.returncode != 0
    assert "the config differs from the run being resumed" in proc.stderr
    assert "seed: 0 then, 1 now" in proc.stderr


def test_resume_targets_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run dir or checkpoint"):
        find_resume_checkpoint(tmp_path / "nope")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .ckpt file"):
        find_resume_checkpoint(tmp_path)
    (tmp_path / "checkpoints" / "last.ckpt").write_text("garbage")
    with pytest.raises(
        ValueError, match="No checkpoint of .* loads: .*last.ckpt is not a readable checkpoint"
    ):
        find_resume_checkpoint(tmp_path)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    def killed_mid_write(obj, stream):
        stream.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=False)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_a_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: writes past it fail as they would there."""
    resource = pytest.importorskip("resource")
    import signal

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, limits[1]))
    try:
        with pytest.raises(OSError, match=r"could not write the checkpoint .*last.ckpt: .*; "
                           r"the previous last.ckpt is intact"):  # fmt: skip
            io.save_checkpoint({"state_dict": {"w": torch.zeros(2**20)}}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert torch.equal(torch.load(path, weights_only=False)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # shared runs: umask


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def test_a_folder_given_as_a_checkpoint_says_so(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(IsADirectoryError, match=r"is a folder, not a checkpoint file.*last.ckpt"):
        load_checkpoint(tmp_path)


# AutoFreeze with the default model (speed perturbation, ReduceLROnPlateau on dev CER) and
# its frozen-output cache: one window per epoch (8 steps), every window calm, so a group
# freezes at each epoch's end from epoch 1 on and the cache deepens from epoch 2
AUTO_FREEZE = [
    "experiment=tiny",
    "data.batch_size=4",
    "strategy=auto_freeze",
    "strategy.callbacks.auto_freeze.threshold=1e9",
    "strategy.callbacks.auto_freeze.check_every_n_steps=8",
    "strategy.callbacks.auto_freeze.patience=1",
    "strategy.callbacks.auto_freeze.after_plateau=false",
    "decoder=greedy",
    "trainer.max_epochs=6",
]


@pytest.mark.slow
def test_auto_freeze_with_its_cache_resumes_as_if_never_stopped(tmp_path, cache_dir, german_corpus):
    whole, _ = run(tmp_path, cache_dir, "whole", overrides=AUTO_FREEZE)
    out, proc = run(
        tmp_path,
        cache_dir,
        "cut",
        STOP,
        check=False,
        overrides=AUTO_FREEZE,
        signal_at="28:SIGTERM:train",  # epoch 3, behind 2 frozen groups, mid-window
    )
    assert proc.returncode == 143, proc.stderr[-2000:]
    run(tmp_path, cache_dir, "resumed", f"resume={out}", STOP, overrides=AUTO_FREEZE)
    assert_same_result(out, whole)  # weights, results, LR schedule, every validation
    decisions = [json.loads((d / "history.json").read_text())["decisions"] for d in (out, whole)]
    assert decisions[0] == decisions[1] and len(decisions[0]) == 5
    lrs = (whole / "lr_schedule.csv").read_text().splitlines()
    assert lrs[-1].split(",")[-1] != lrs[1].split(",")[-1], "the plateau should have cut the LR"
