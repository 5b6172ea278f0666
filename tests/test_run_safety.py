"""No silently wrong result: a moved run dir, a changed resume, a diverged run.

In-process app runs (``freezeft.app.train.train``, what ``python -m freezeft.run`` wraps)
on the README's own-model example (examples/own_model): under a second each.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import own_model_app
import pytest
from omegaconf import OmegaConf
from own_model_app import PROJECT, own_model_importable  # noqa: F401 (an autouse fixture)

EPOCHS = "trainer.max_epochs=2"


def compose(*overrides: str):
    return own_model_app.compose(EPOCHS, *overrides)


def run(out: Path, *overrides: str) -> dict:
    return own_model_app.run(out, EPOCHS, *overrides)


def history(out: Path) -> list[dict]:
    return json.loads((out / "history.json").read_text())["epochs"]


@pytest.mark.parametrize("max_epochs", [2, 3])
def test_a_copied_run_dir_resumes_with_its_own_best_checkpoint(tmp_path, max_epochs):
    first = run(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # cp -a: the old dir stays
    resumed = run(tmp_path / "b", f"resume={tmp_path / 'b'}", f"trainer.max_epochs={max_epochs}")
    best = Path(resumed["best_checkpoint"])
    assert best.parent == (tmp_path / "b" / "checkpoints").resolve()
    scores = [epoch["val_acc"] for epoch in history(tmp_path / "b")]
    assert len(scores) == max_epochs
    assert resumed["dev_acc"] == pytest.approx(max(scores))
    assert resumed["best_epoch"] == scores.index(max(scores))
    if max_epochs == 2:  # nothing more to train: the same best model, tested again
        assert resumed["best_epoch"] == first["best_epoch"]
        assert resumed["test_acc"] == first["test_acc"]


@pytest.mark.parametrize(
    "changed",
    [
        ["+trainer.gradient_clip_val=0.0001", "+trainer.accumulate_grad_batches=4"],
        ["protocol=converge", "trainer.max_epochs=2"],  # would add early stopping mid-run
    ],
)
def test_a_resume_with_other_trainer_settings_is_refused(tmp_path, changed):
    run(tmp_path / "a")
    before = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    with pytest.raises(ValueError, match="differs from the run being resumed") as refused:
        run(tmp_path / "a", f"resume={tmp_path / 'a'}", *changed)
    assert "trainer." in str(refused.value) or "protocol" in str(refused.value)
    assert "only trainer.max_epochs may change" in str(refused.value)
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == before


def test_a_resume_with_another_strategy_names_the_strategy_first(tmp_path):
    """The strategy's name leads, and the callback that is gone is one entry, not one per
    setting (its settings had pushed the name out of the message)."""
    run(tmp_path / "a", "strategy=freeze_then_finetune")
    with pytest.raises(ValueError, match="differs from the run being resumed") as refused:
        run(tmp_path / "a", f"resume={tmp_path / 'a'}", "strategy=naive")
    message = str(refused.value)
    changes = message.split("): ", 1)[1]
    assert changes.startswith("strategy.name: 'freeze_then_finetune' then, 'naive' now; ")
    assert "strategy.callbacks.freeze_then_unfreeze: there then, not now" in message
    assert "strategy.callbacks.naive: not there then, there now" in message
    assert "more)" not in message and "freeze_then_unfreeze.head" not in message


def test_a_resume_never_shortens_the_run(tmp_path):
    run(tmp_path / "a", "trainer.max_epochs=3")
    with pytest.raises(ValueError, match="trainer.max_epochs: 3 then, 2 now .*never shorter"):
        run(tmp_path / "a", f"resume={tmp_path / 'a'}", "trainer.max_epochs=2")


def test_a_best_checkpoint_that_would_run_code_is_refused_not_tested(tmp_path):
    import pickle

    from test_checkpoint_safety import Payload

    first = run(tmp_path / "a")
    marker = tmp_path / "attacker-was-here"
    Path(first["best_checkpoint"]).write_bytes(pickle.dumps({"epoch": Payload(str(marker))}))
    with pytest.raises(ValueError, match="was refused: loading it would run code"):
        run(tmp_path / "a", f"resume={tmp_path / 'a'}")
    assert not marker.exists()


def test_a_diverged_run_or_a_checkpoints_folder_is_no_resume_target(tmp_path):
    with pytest.raises(ValueError):
        run(tmp_path / "d", "model.lr=1e30")
    with pytest.raises(ValueError, match="that run diverged"):
        run(tmp_path / "d", f"resume={tmp_path / 'd'}")
    run(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="a folder of checkpoints, not a run dir"):
        run(tmp_path / "a", f"resume={tmp_path / 'a' / 'checkpoints'}")


def test_cache_frozen_on_a_model_without_the_cache_protocol_is_refused_before_work(tmp_path):
    from freezeft.app.train import train

    cfg = compose("strategy=frozen_encoder", "strategy.callbacks.frozen_encoder.cache_frozen=true")
    with pytest.raises(ValueError, match=r"FrozenEncoder\(cache_frozen=True\) needs the model"):
        train(cfg, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_resuming_a_plain_lightning_checkpoint_is_refused_before_writing_there(tmp_path):
    run(tmp_path / "a")
    plain = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    plain.mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "checkpoints" / "last.ckpt", plain / "epoch=1-step=6.ckpt")
    with pytest.raises(ValueError, match="not a run dir of `python -m freezeft.run`.*"
                       "transfer.source=PATH"):  # fmt: skip
        run(tmp_path / "b", f"resume='{plain / 'epoch=1-step=6.ckpt'}'")  # quoted: =
    assert sorted(p.name for p in plain.parent.iterdir()) == ["checkpoints"]  # no csv/ there


def test_a_diverged_run_stops_says_so_and_is_marked(tmp_path):
    from freezeft.divergence import Diverged

    with pytest.raises(Diverged, match=r"diverged at step \d+ \(epoch 0, learning rate 1e\+30\)"):
        run(tmp_path / "a", "model.lr=1e30")
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["status"] == "diverged" and results["diverged"]["lr"] == [1e30]
    assert "test_acc" not in results  # nothing tested
    assert not any((tmp_path / "a" / "checkpoints").glob("*.ckpt"))  # nothing to resume


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("model.lr=-0.1", "`model.lr=-0.1`: expected a finite learning rate >= 0"),
        ("model.lr=nan", "`model.lr=nan`: expected a number, not NaN"),
        ("model.lr=inf", "`model.lr=inf`: expected a finite learning rate >= 0"),
    ],
)
def test_an_absurd_learning_rate_is_refused_before_any_work(tmp_path, override, said):
    from freezeft.app.train import train

    with pytest.raises(ValueError, match=f"Invalid config value.*{said}"):
        train(compose(override, f"paths.cache_dir={tmp_path / 'cache'}"), tmp_path / "a")
    assert not (tmp_path / "a").exists() and not (tmp_path / "cache").exists()


def test_a_loss_that_explodes_with_finite_weights_is_divergence_too(tmp_path):
    from freezeft.divergence import Diverged

    with pytest.raises(Diverged, match=r"at step 3 \(epoch 0, learning rate 1000\): the "
                       "training loss exploded: its mean over the epoch"):  # fmt: skip
        run(tmp_path / "a", "model.lr=1000")
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["status"] == "diverged" and "exploded" in results["diverged"]["what"]


def test_a_source_pretraining_that_diverges_says_so_in_the_runs_dir(tmp_path):
    from freezeft.divergence import Diverged

    with pytest.raises(Diverged, match="diverged while pretraining the source model"):
        run(tmp_path / "a", "model.lr=1e30", "transfer.source=auto", "+data@source.data=mydata",
            f"paths.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["status"] == "diverged" and "pretraining" in results["diverged"]["during"]
    assert not list((tmp_path / "cache" / "source").glob("*/source.ckpt"))  # nothing cached


@pytest.mark.slow  # a subprocess, as a user runs it
def test_a_diverged_run_exits_non_zero_with_one_line(tmp_path):
    from pyrun import run_python

    proc = run_python(
        [
            "-m",
            "freezeft.run",
            "--config-dir",
            str(PROJECT / "conf"),
            "model=mynet",
            "data=mydata",
            "monitor=val_acc",
            "monitor_mode=max",
            "model.lr=1e30",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],  # fmt: skip
        cwd=PROJECT,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "freezeft: error: the model diverged at step 2 (epoch 0, learning rate 1e+30)" in (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "diverged"


def test_resuming_a_checkpoint_of_another_model_size_is_one_line_naming_the_tensors(tmp_path):
    from freezeft.app.errors import one_line

    run(tmp_path / "a")
    run(tmp_path / "wide", "model.hidden=48")
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    shutil.copy(tmp_path / "wide" / "checkpoints" / "last.ckpt", last)  # the newest there
    before = sorted(p.name for p in last.parent.iterdir())
    with pytest.raises(ValueError) as refused:
        run(tmp_path / "a", f"resume={tmp_path / 'a'}")
    assert one_line(refused.value) == (
        f"{last} does not fit this run's model: encoder.0.weight is (48, 20) there, (64, 20) "
        "here; encoder.0.bias is (48,) there, (64,) here; encoder.2.weight is (48, 48) there, "
        "(64, 64) here; and 2 more. The checkpoint was made with other settings (another "
        "model size?) than its run dir records in .hydra/config.yaml: resume with a "
        "checkpoint this run wrote, or start a new run with the settings the checkpoint was "
        "made with."
    )
    assert sorted(p.name for p in last.parent.iterdir()) == before


def _hold(run_dir: str, held) -> None:
    from freezeft.app.run_dir import hold_run_dir

    with hold_run_dir(run_dir):
        held.set()
        time.sleep(120)


@contextmanager
def another_process_holding(run_dir: Path) -> Iterator[int]:
    """A second process holding ``run_dir``'s lock, as one training into it does: forked,
    so it pays no imports; its pid. Killed on exit (kill -9), which releases the lock."""
    fork = multiprocessing.get_context("fork")
    held = fork.Event()
    holder = fork.Process(target=_hold, args=(str(run_dir), held), daemon=True)
    holder.start()
    try:
        assert held.wait(60), "the holder did not take the lock"
        yield holder.pid
    finally:
        holder.kill()
        holder.join()


def test_a_second_resume_of_a_run_dir_in_use_is_refused_naming_the_pid(tmp_path):
    run(tmp_path / "a")
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*") if p.is_file()}
    with another_process_holding(tmp_path / "a") as pid:  # the first resume, training
        with pytest.raises(ValueError) as refused:
            run(tmp_path / "a", f"resume={tmp_path / 'a'}", "trainer.max_epochs=3")
    message = str(refused.value)
    assert message.startswith(
        f"resume={tmp_path / 'a'}: {tmp_path / 'a'} is in use: process {pid} (since "
    )
    assert message.endswith(
        "trains into it now, and a second resume would interleave their checkpoints and logs. "
        f"Wait for it to finish, or stop it (kill {pid}; it then writes a resumable "
        "checkpoint), and resume again."
    )
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*") if p.is_file()}
    locks = {".run.lock", ".run.lock.json"}
    assert {p: t for p, t in after.items() if p.name not in locks} == {
        p: t for p, t in files.items() if p.name not in locks
    }  # nothing of the run was touched


def test_a_run_into_a_dir_in_use_is_refused_too(tmp_path):
    from freezeft.app.run_dir import hold_run_dir

    with another_process_holding(tmp_path / "a") as pid:
        with pytest.raises(ValueError, match=rf"is in use: process {pid} .*Give this "
                           r"run its own dir \(leave hydra.run.dir to Hydra\), or wait for "
                           rf"that one to finish or stop it \(kill {pid}\)\.$"):  # fmt: skip
            run(tmp_path / "a")
    with hold_run_dir(tmp_path / "a"):  # free again: the holder's death released it
        assert (tmp_path / "a" / ".run.lock.json").is_file()
    assert not (tmp_path / "a" / ".run.lock.json").exists()


def test_a_run_dir_from_before_a_key_was_added_resumes_with_that_keys_default(tmp_path):
    """A key a newer freezeft added (data.max_duration_s, say) is not in an older run's
    saved config: at the default that run's own overrides give now, it is no change; set
    to something else, it is."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from freezeft.app.train import train

    base = [
        f"hydra.searchpath=[pkg://freezeft.speech.conf,file://{PROJECT / 'conf'}]",
        "model=mynet", "data=mydata", "monitor=val_acc", "monitor_mode=max",
        "trainer.max_epochs=2",
    ]  # fmt: skip
    out = tmp_path / "a"
    run(out)
    OmegaConf.save(OmegaConf.create(base), out / ".hydra" / "overrides.yaml")
    saved = OmegaConf.load(out / ".hydra" / "config.yaml")
    del saved.trainer["deterministic"]  # as a freezeft without that key saved it
    OmegaConf.save(saved, out / ".hydra" / "config.yaml")
    with initialize_config_module(config_module="freezeft.conf", version_base="1.3"):
        changed = hydra_compose(
            config_name="config", overrides=[*base, f"resume={out}", "trainer.deterministic=true"]
        )
        with pytest.raises(ValueError, match=r"trainer\.deterministic: None then, True now"):
            train(changed, out)
        same = hydra_compose(config_name="config", overrides=[*base, f"resume={out}"])
        assert train(same, out)["status"] == "finished"


COUNTING = """
import features

BUILT = {"model": 0, "data": 0}


class CountedNet(features.MyNet):
    def __init__(self, *args, **kwargs):
        BUILT["model"] += 1
        super().__init__(*args, **kwargs)


class CountedData(features.FeatureData):
    def __init__(self, *args, **kwargs):
        BUILT["data"] += 1
        super().__init__(*args, **kwargs)
"""


@pytest.mark.parametrize("strategy", ["gradual_unfreeze", "freeze_then_finetune"])
def test_one_run_builds_the_users_model_and_data_once(tmp_path, monkeypatch, strategy):
    """A slow, memory-hungry or downloading constructor is paid once: the app checks the
    objects it trains, and the fit uses the layer groups the check resolved."""
    (tmp_path / "counted.py").write_text(COUNTING)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "counted", raising=False)
    import counted

    from freezeft.groups import resolve_groups

    resolved = []
    monkeypatch.setattr(
        "freezeft.app.build.resolve_groups", lambda *a: resolved.append(1) or resolve_groups(*a)
    )
    monkeypatch.setattr(
        "freezeft.callbacks.coordinator.resolve_groups",
        lambda *a: resolved.append(2) or resolve_groups(*a),
    )
    results = run(
        tmp_path / "run",
        f"strategy={strategy}",
        "model._target_=counted.CountedNet",
        "data._target_=counted.CountedData",
        "transfer.source=null",
    )
    assert results["status"] == "finished"
    assert counted.BUILT == {"model": 1, "data": 1}
    assert resolved == [1]  # by the app's check; the fit took those groups
