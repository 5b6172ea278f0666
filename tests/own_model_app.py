"""The app on the README's own-model example (examples/own_model), in process.

``freezeft.app.train.train`` is what ``python -m freezeft.run`` wraps; these helpers
compose the example's config the way its command line does and run it into a folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

PROJECT = Path(__file__).parents[1] / "examples" / "own_model"

#: The example's command line: ``--config-dir conf model=mynet data=mydata ...``.
OWN_MODEL = ("model=mynet", "data=mydata", "monitor=val_acc", "monitor_mode=max")


@pytest.fixture(autouse=True)
def own_model_importable(monkeypatch):
    """features.py importable, as the user's working directory makes it (autouse in the
    test modules that import it)."""
    monkeypatch.syspath_prepend(str(PROJECT))


def compose(*overrides: str):
    """The example's config with ``overrides`` after its own."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="freezeft.conf", version_base="1.3"):
        return hydra_compose(
            config_name="config",
            overrides=[
                f"hydra.searchpath=[pkg://freezeft.speech.conf,file://{PROJECT / 'conf'}]",
                *OWN_MODEL,
                *overrides,
            ],
        )


def run(out: Path, *overrides: str) -> dict:
    """One run into ``out``, its config saved where Hydra saves it (a resume keeps the
    run dir's own)."""
    from freezeft.app.train import train

    cfg = compose(*overrides)
    if not cfg.get("resume"):
        (out / ".hydra").mkdir(parents=True)
        OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    return train(cfg, out)
