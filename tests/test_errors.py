"""A user's mistake is one line on stderr, exit code 1, wherever it was raised: freezeft's
own checks, Hydra's composition, an object a config builds, a path, a missing extra
(issue 23). No traceback, nothing on stdout, and it is in the run's ``run.log`` too."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from pyrun import run_python

from freezeft.app.main import TRACEBACKS, cli

BLOCKED_RUN = str(Path(__file__).with_name("blocked_run.py"))
CASES = {
    "freezeft's check": (
        ["strategy=warmup", "addons=[warmup]"],
        "The strategy and its add-ons include LRWarmup twice",
    ),
    "an unknown option": (
        ["strategy=nope"],
        "Could not find 'strategy/nope'. Options for strategy: auto_freeze, discriminative_lr",
    ),
    "a misspelt key": (
        ["model.optimizer.lrr=0.1"],
        "model.optimizer.lrr is not a key of the config. Did you mean model.optimizer.lr? "
        "Check its spelling",
    ),
    "a misspelt trainer key": (
        ["trainer.max_epoch=3"],
        "trainer.max_epoch is not a key of the config. Did you mean trainer.max_epochs? ",
    ),
    "a strategy's setting one level too high": (
        ["strategy=freeze_then_finetune", "strategy.unfreeze_at_epoch=2"],
        "strategy.unfreeze_at_epoch is not a key of the config: a strategy's own settings are "
        "under strategy.callbacks.<its key>, e.g. strategy.callbacks.freeze_then_unfreeze."
        "unfreeze_at_epoch=...",
    ),
    "the same, added with + (read by nothing)": (
        ["strategy=freeze_then_finetune", "+strategy.unfreeze_at_epoch=2"],
        "strategy.unfreeze_at_epoch is read by nothing: set "
        "strategy.callbacks.freeze_then_unfreeze.unfreeze_at_epoch=2 instead.",
    ),
    "an object a config builds": (
        ["experiment=tiny", "+data.foo=1"],
        "SpeechDataModule.__init__() got an unexpected keyword argument 'foo' (config: data)",
    ),
    "a required value": (["data=deepspeech_csv"], "data.data_dir is required"),
    "a missing path": (
        ["data=deepspeech_csv", "data.data_dir=no/such/dir"],
        "The data folder no/such/dir (data_dir) does not exist",
    ),
}


@pytest.fixture
def run_cli(monkeypatch, capsys, tmp_path):
    """``python -m freezeft.run ARGS`` in this process: (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    for name in ("HYDRA_FULL_ERROR", TRACEBACKS):
        monkeypatch.delenv(name, raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["freezeft.run", *args])
        with pytest.raises(SystemExit) as stopped:
            cli()
        out, err = capsys.readouterr()
        return stopped.value.code, out, err

    return run


def one_error_line(code: int, out: str, err: str) -> str:
    assert code == 1, out[-2000:] + err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("freezeft: error: "), err[-3000:]
    assert "Error" not in out, out[-2000:]  # said once, on stderr
    return lines[0]


@pytest.mark.parametrize("case", CASES)
def test_a_user_error_is_one_line_on_stderr(run_cli, tmp_path, case):
    overrides, said = CASES[case]
    run_dir = tmp_path / "run"
    assert said in one_error_line(*run_cli(*overrides, f"hydra.run.dir={run_dir}"))
    if (run_dir / "run.log").exists():  # the run had started: its log says it too
        assert said in (run_dir / "run.log").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_run_on_a_machine_without_one_says_to_use_the_cpu(run_cli, tmp_path):
    line = one_error_line(*run_cli("experiment=tiny", "trainer=gpu", f"hydra.run.dir={tmp_path}"))
    assert line.endswith(
        "No supported gpu backend found! This machine has no GPU that torch can use: run with "
        "trainer=cpu (the default)."
    )


@pytest.mark.parametrize(
    ("overrides", "module", "extra"),
    [
        (["logger=tensorboard"], "tensorboard", "tensorboard"),
        (["-m", "hydra/launcher=joblib"], "hydra_plugins.hydra_joblib_launcher", "sweeps"),
        (["-m", "hparams_search=freeze_then_unfreeze"], "hydra_plugins.hydra_optuna_sweeper",
         "sweeps"),
    ],
)  # fmt: skip
def test_a_missing_plugin_names_the_install_that_brings_it(
    run_cli, monkeypatch, tmp_path, overrides, module, extra
):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else find_spec(name)
    )
    line = one_error_line(*run_cli(*overrides, f"hydra.run.dir={tmp_path / 'run'}"))
    assert line.endswith(f'which is not installed: pip install "freezeft[{extra}]"')
    assert not (tmp_path / "run").exists()  # checked before anything is composed


@pytest.mark.slow  # a new process each: these packages are imported in this one
@pytest.mark.parametrize(
    ("module", "overrides", "said"),
    [
        ("hydra", [], 'python -m freezeft.run and its sweeps needs hydra, which is not '
         'installed: pip install "freezeft[app]"'),
        ("torchaudio", ["experiment=tiny"], "the speech task needs torchaudio, which is not "
         'installed: pip install "freezeft[speech]"'),
        ("piper", ["experiment=tiny", "data@source.data=english_voices"],
         'needs piper, which is not installed: pip install "freezeft[voices]"'),
    ],
)  # fmt: skip
def test_a_missing_extra_names_the_install_that_brings_it(tmp_path, module, overrides, said):
    args = [BLOCKED_RUN, module, *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    proc = run_python(args, cwd=tmp_path, check=False)
    assert said in one_error_line(proc.returncode, proc.stdout, proc.stderr)


def test_hydra_full_error_shows_the_traceback(run_cli, monkeypatch, tmp_path):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["freezeft.run", "strategy=nope"])
    with pytest.raises(Exception, match="Could not find 'strategy/nope'"):
        cli()
