"""Released source models: a pretrained checkpoint a task ships, the way DeepSpeech and
Coqui STT ship release models, used by ``transfer.source=auto`` instead of pretraining.

A release is a folder (``source.release``: a path, or ``pkg://package/folder`` inside an
installed package) holding

* ``source.ckpt``: the source model's weights and hyperparameters (no optimizer state),
  loaded weights-only like every checkpoint the app reads;
* ``release.json``: the source settings it was pretrained with (the same dictionary that
  keys ``transfer.source=auto``'s cache), the command that made it, the torch and Lightning
  versions, its test results, and the checkpoint's SHA-256 and size.

A run uses the release only when its own source settings are the release's, exactly, and
the checkpoint's checksum is right; otherwise it pretrains as before and says why.

Make (or remake) one with the command in ``release.json``::

    python -m freezeft.app.release            # the default English source of the speech task
    python -m freezeft.app.release OVERRIDES  # e.g. model=deepspeech, written to its source.release
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import sys
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from freezeft._lightning import pl
from freezeft.cache import differences
from freezeft.checkpoint_io import read_checkpoint_file
from freezeft.files import write_text_atomic

__all__ = ["RELEASE_FILE", "CHECKPOINT", "release_folder", "matching_release", "write_release"]

log = logging.getLogger(__name__)

RELEASE_FILE = "release.json"
CHECKPOINT = "source.ckpt"


def release_folder(cfg: DictConfig) -> Path | None:
    """The folder ``source.release`` names (``pkg://`` resolved), or ``None``."""
    where = cfg.source.get("release")
    if not where:
        return None
    where = str(where)
    if where.startswith("pkg://"):
        package, _, folder = where.removeprefix("pkg://").partition("/")
        try:
            return Path(str(resources.files(package))) / folder
        except ModuleNotFoundError:
            return None
    return Path(where)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def matching_release(cfg: DictConfig, settings: dict[str, Any]) -> tuple[Path | None, str | None]:
    """``(checkpoint, None)`` when ``cfg``'s release was made with ``settings`` and is
    intact; else ``(None, why it is not used)`` (``(None, None)``: no release configured)."""
    folder = release_folder(cfg)
    if folder is None:
        return None, None
    record_path, checkpoint = folder / RELEASE_FILE, folder / CHECKPOINT
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        released = record["settings"]
    except FileNotFoundError:
        return None, f"no released source model at {folder} ({RELEASE_FILE} is missing)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"{record_path} is unreadable ({type(err).__name__}: {err})"
    wanted = json.loads(json.dumps(settings, default=str))
    found = differences(released, wanted)
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        return None, f"this run's source settings differ from the release's: {shown}"
    if not checkpoint.is_file():
        return None, f"the released {checkpoint} is missing"
    if _sha256(checkpoint) != record.get("sha256"):
        return None, f"the released {checkpoint} does not match its checksum in {record_path}"
    return checkpoint, None


def write_release(
    folder: Path,
    checkpoint: Path,
    settings: dict[str, Any],
    results: dict[str, Any],
    command: str,
) -> Path:
    """Write ``checkpoint``'s weights and hyperparameters (no optimizer or loop state) to
    ``folder/source.ckpt`` and its record to ``folder/release.json``; returns the record's
    path."""
    full = read_checkpoint_file(checkpoint)
    weights = {"state_dict": full["state_dict"], "hyper_parameters": full.get("hyper_parameters")}
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / CHECKPOINT
    tmp = target.with_name(f".{target.name}.tmp")
    torch.save(weights, tmp)
    tmp.replace(target)
    record = {
        "command": command,
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "lightning": f"{pl.__name__} {pl.__version__}",
        "python": platform.python_version(),
        "sha256": _sha256(target),
        "bytes": target.stat().st_size,
        "parameters": sum(t.numel() for t in weights["state_dict"].values()),
        "results": {
            key: results.get(key)
            for key in ("headline", "cer", "wer", "loss", "epochs", "best_epoch", "train_seconds")
        },
        "settings": json.loads(json.dumps(settings, default=str)),
    }
    path = folder / RELEASE_FILE
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    """``python -m freezeft.app.release [OVERRIDES]``: pretrain (or take from the cache) the
    source model of the composed config and write it to its ``source.release`` folder."""
    from hydra import compose, initialize_config_module

    from freezeft.app.source import pretrained_source, source_settings
    from freezeft.app.train import fit_and_test

    overrides = list(sys.argv[1:] if argv is None else argv)
    with initialize_config_module(config_module="freezeft.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    folder = release_folder(cfg)
    if folder is None:
        raise SystemExit("freezeft: error: source.release is not set: say where to write it.")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    checkpoint = pretrained_source(cfg, fit_and_test, use_release=False)
    results = json.loads((checkpoint.parent / "results.json").read_text())
    command = " ".join(["python -m freezeft.app.release", *overrides])
    path = write_release(folder, checkpoint, source_settings(cfg), results, command)
    print(f"freezeft: released {folder / CHECKPOINT} ({results.get('headline')}); record: {path}")


if __name__ == "__main__":
    main()
