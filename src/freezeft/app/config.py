"""Config checks before any work: values, resumes, and what a sweep can run."""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from freezeft import machine

__all__ = [
    "CHECKS",
    "check_config",
    "transfer_options",
    "monitored",
    "lightning_targets",
    "check_resume_config",
    "refuse_local_ddp",
    "threads_per_job",
]

log = logging.getLogger(__name__)


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


_MAX_SEED = 2**32 - 1
_CORES = os.cpu_count() or 1

#: Keys checked before any work starts: (allowed types, test, what is allowed).
CHECKS: dict[str, tuple[tuple[type, ...], Any, str]] = {
    "stage": (
        (str,),
        lambda v: v in ("transfer", "pretrain", "schedule"),
        "'transfer', 'pretrain' or 'schedule'",
    ),
    # the seeds Lightning, NumPy and Python's random all take
    "seed": ((int,), lambda v: 0 <= v <= _MAX_SEED, f"an integer from 0 to {_MAX_SEED}"),
    "source.seed": ((int,), lambda v: 0 <= v <= _MAX_SEED, f"an integer from 0 to {_MAX_SEED}"),
    "cpu_threads": (
        (int, type(None)),
        lambda v: v is None or 1 <= v <= _CORES,
        f"null or an integer from 1 to this machine's {_CORES} cores",
    ),
    "trainer.max_epochs": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "trainer.min_epochs": (
        (int, type(None)),
        lambda v: v is None or v >= 0,
        "null or an integer >= 0",
    ),
    "trainer.max_steps": ((int,), lambda v: v == -1 or v >= 1, "-1 (no limit) or an integer >= 1"),
    "trainer.accumulate_grad_batches": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "trainer.check_val_every_n_epoch": (
        (int, type(None)),
        lambda v: v is None or v >= 1,
        "null or an integer >= 1",
    ),
    "trainer.val_check_interval": (
        (int, float, type(None)),
        lambda v: v is None or (v >= 1 if isinstance(v, int) else 0.0 < v <= 1.0),
        "null, a fraction of an epoch in (0, 1] or a number of batches >= 1",
    ),
    "trainer.log_every_n_steps": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "trainer.gradient_clip_val": (
        (int, float, type(None)),
        lambda v: v is None or (math.isfinite(v) and v >= 0),
        "null or a number >= 0",
    ),
    **{
        f"trainer.limit_{split}_batches": (
            (int, float, type(None)),
            lambda v: v is None or (v >= 0 if isinstance(v, int) else 0.0 <= v <= 1.0),
            "null, a fraction in [0, 1] or a number of batches >= 0",
        )
        for split in ("train", "val", "test")
    },
    "source.max_epochs": ((int,), lambda v: v >= 1, "an integer >= 1"),
    "monitor": ((str,), bool, "the name of a metric the model logs, e.g. val_loss or val_acc"),
    "monitor_mode": ((str,), lambda v: v in ("min", "max"), "'min' or 'max'"),
}

LIGHTNING_PREFIXES = ("pytorch_lightning.", "lightning.pytorch.")


def monitored(cfg: DictConfig) -> tuple[str, str]:
    """``(monitor, monitor_mode)``: the logged metric that picks the best checkpoint (and
    what a sweeper optimises) and whether lower or higher is better."""
    return str(cfg.monitor), str(cfg.monitor_mode)


def lightning_targets(node: Any, package: str) -> Any:
    """``node`` as plain containers, its Lightning ``_target_``s moved to ``package``
    (``pytorch_lightning`` or ``lightning.pytorch``): a Trainer, logger or callback must
    come from the package the LightningModule was written with."""
    node = _plain(node)
    if isinstance(node, dict):
        out = {key: lightning_targets(value, package) for key, value in node.items()}
        target = out.get("_target_")
        if isinstance(target, str):
            for prefix in LIGHTNING_PREFIXES:
                if target.startswith(prefix):
                    out["_target_"] = f"{package}.{target.removeprefix(prefix)}"
        return out
    if isinstance(node, list):
        return [lightning_targets(item, package) for item in node]
    return node


#: optimizer settings by key name, wherever they are (model.optimizer.lr, model.lr, ...)
_POSITIVE = {"lr", "learning_rate"}
_NON_NEGATIVE = {"weight_decay", "momentum", "dampening", "min_lr", "eta_min", "final_lr"}
#: the config sections a run's numbers come from
_NUMBER_SECTIONS = ("model", "data", "strategy", "addons", "trainer", "transfer", "source")


def _absurd_numbers(cfg: DictConfig) -> list[str]:
    """A NaN anywhere in the run's sections, an infinite or negative learning rate, a
    negative weight decay or momentum: what torch would only refuse (or train into NaN
    with) once the optimizer is built, after any source pretraining."""
    problems = []
    for section in _NUMBER_SECTIONS:
        node = OmegaConf.select(cfg, section)
        if not isinstance(node, DictConfig):
            continue
        for key, value in _flat(_plain(node), section).items():
            name = key.rsplit(".", 1)[-1]
            if isinstance(value, str) and name in (*_POSITIVE, *_NON_NEGATIVE):
                problems.append(f"`{key}={value!r}`: expected a number")
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if math.isnan(value):
                problems.append(f"`{key}={value}`: expected a number, not NaN")
            elif name in _POSITIVE and not (0 <= value < math.inf):  # 0: evaluate only
                problems.append(
                    f"`{key}={value}`: expected a finite learning rate >= 0 (e.g. 1e-3)"
                )
            elif name in _NON_NEGATIVE and not (0 <= value < math.inf):
                problems.append(f"`{key}={value}`: expected a finite value >= 0")
    return problems


def transfer_options(cfg: DictConfig) -> dict[str, Any]:
    """``transfer.*`` but ``source``: the options the task's ``transfer_from`` takes."""
    return {k: v for k, v in _plain(cfg.transfer).items() if k != "source"}


def check_config(cfg: DictConfig) -> None:
    """Fail before any work on a value of the wrong type or out of range, or a strategy
    chosen twice, naming the key. (:func:`freezeft.app.build.build_run` then builds the
    run's objects, whose own checks name their arguments.)"""
    problems = []
    for key, (types, test, allowed) in CHECKS.items():
        value = OmegaConf.select(cfg, key, default="<absent>")
        if value == "<absent>":
            continue
        ok = isinstance(value, types) and not isinstance(value, bool) and test(value)
        if not ok:
            problems.append(f"`{key}={value!r}`: expected {allowed}")
    problems += _absurd_numbers(cfg)
    if problems:
        raise ValueError("Invalid config value(s): " + "; ".join(problems) + ".")
    targets = [
        c._target_
        for part in (cfg.strategy.callbacks, cfg.strategy.get("addons", {}))
        for c in (part or {}).values()
        if c
    ]
    _refuse_unread_strategy_keys(cfg)
    twice = sorted({t.rsplit(".", 1)[-1] for t in targets if targets.count(t) > 1})
    if twice:
        raise ValueError(
            f"The strategy and its add-ons include {', '.join(twice)} twice (an add-on that "
            f"the chosen `strategy` already has, e.g. strategy=warmup addons=[warmup]); drop "
            "it from `addons`."
        )


#: The keys of a strategy's config the app reads itself; any other is there for an
#: interpolation (``n_frozen: ${strategy.n_frozen}``) or is read by nothing.
STRATEGY_KEYS = ("name", "callbacks", "addons", "path", "phases", "from_scratch")


def _refuse_unread_strategy_keys(cfg: DictConfig) -> None:
    """``+strategy.unfreeze_at_epoch=2`` adds a key nothing reads: refused, with where the
    setting lives (``strategy.callbacks.<key>.unfreeze_at_epoch``)."""
    text = OmegaConf.to_yaml(cfg)  # interpolations unresolved
    for key in cfg.strategy:
        if key in STRATEGY_KEYS or re.search(r"\$\{[^}]*\b" + re.escape(str(key)) + r"\}", text):
            continue
        homes = [
            f"{section}.{name}.{key}"
            for section in ("strategy.callbacks", "strategy.addons")
            for name, part in (OmegaConf.select(cfg, section) or {}).items()
            if part and key in part
        ]
        value = OmegaConf.select(cfg, f"strategy.{key}")
        where = (
            f"set {' or '.join(f'{home}={value}' for home in homes)} instead"
            if homes
            else "a strategy's own settings are under strategy.callbacks.<its key> (--cfg "
            "job prints them)"
        )
        raise ValueError(f"strategy.{key} is read by nothing: {where}.")


#: Config sections a resumed run must share with the run it continues: what it trains, on
#: what, how (the trainer and every callback: a resume promises the same continuation), and
#: how it chooses its best model. Where the run looks (paths) or logs may change.
RESUME_MUST_MATCH = (
    "stage",
    "seed",
    "model",
    "data",
    "strategy",
    "transfer",
    "monitor",
    "monitor_mode",
    "protocol",
    "trainer",
    "callbacks",
)

#: What a resume may change: a longer budget, and how much the console shows.
RESUME_MAY_CHANGE = (
    "trainer.max_epochs",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
)


def check_resume_config(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The config of the run dir being resumed (``.hydra/config.yaml``), after checking
    that ``cfg`` would continue it unchanged (:data:`RESUME_MUST_MATCH`).

    The source settings are not compared: a resumed run has its weights already, from the
    source the saved config names.

    Raises:
        ValueError: ``run_dir`` is not a run dir of freezeft (no saved config), or the
            config differs (the message lists the keys, then and now).
    """
    saved_path = run_dir / ".hydra" / "config.yaml"
    if not saved_path.exists():
        raise ValueError(
            f"resume={cfg.resume}: {run_dir} is not a run dir of `python -m freezeft.run` "
            f"(it has no .hydra/config.yaml), so freezeft cannot check that it would continue "
            "it unchanged. Resume a run dir freezeft wrote (outputs/<date>/<time>); to start a "
            "new run from the weights of another Lightning checkpoint, give "
            "transfer.source=PATH instead."
        )
    saved = OmegaConf.load(saved_path)
    differences: list[str] = []
    for section in RESUME_MUST_MATCH:
        before, now = _flat(_plain(saved.get(section))), _flat(_plain(cfg.get(section)))
        parts_said: set[str] = set()
        for key in sorted(set(before) | set(now), key=_names_first):
            if f"{section}{key}" in RESUME_MAY_CHANGE:
                continue
            if key not in before and key in now and now[key] == _default(section, key, run_dir):
                # a key this freezeft added since that run, at what that run's overrides give
                log.info(f"resume: {section}{key} is new since that run; it is {now[key]!r}.")
                continue
            if before.get(key) == now.get(key):
                continue
            part = _one_sided_part(key, before, now)
            if part is None:
                differences.append(
                    f"{section}{key}: {before.get(key)!r} then, {now.get(key)!r} now"
                )
            elif part[0] not in parts_said:  # a whole callback or part, once
                parts_said.add(part[0])
                differences.append(f"{section}{part[0]}: {part[1]}")
    then, now = saved.trainer.get("max_epochs"), cfg.trainer.get("max_epochs")
    if isinstance(then, int) and isinstance(now, int) and now < then:
        differences.append(
            f"trainer.max_epochs: {then} then, {now} now (a resume may train longer, "
            "never shorter: the checkpoints may be past the new end)"
        )
    if differences:
        raise ValueError(
            f"resume={cfg.resume}: the config differs from the run being resumed "
            f"({saved_path}): "
            + "; ".join(differences[:8])
            + (f" (and {len(differences) - 8} more)" if len(differences) > 8 else "")
            + ". A resume continues the run exactly as it was configured: resume with the "
            "same overrides as the original run (only trainer.max_epochs may change, to "
            "train longer), or start a new run with the new settings."
        )
    return saved


def _names_first(key: str) -> tuple[bool, str]:
    """What a run is (a section's own ``name``, ``_target_``) before its settings, in a
    list of changes."""
    return not (key.count(".") == 1 and key[1:] in ("name", "_target_")), key


def _one_sided_part(key: str, before: dict[str, Any], now: dict[str, Any]) -> tuple | None:
    """The outermost part of ``key`` (``.callbacks.freeze_then_unfreeze``) that only one of
    the configs has, with which one, or ``None`` where both have it."""
    parts = key.split(".")
    for depth in range(2, len(parts)):
        prefix = ".".join(parts[:depth])
        then = any(k == prefix or k.startswith(prefix + ".") for k in before)
        today = any(k == prefix or k.startswith(prefix + ".") for k in now)
        if then != today:
            return prefix, "there then, not now" if then else "not there then, there now"
    return None


def _default(section: str, key: str, run_dir: Path) -> Any:
    """What ``section``+``key`` is when the run dir's own overrides are composed with the
    configs installed now (a key added since that run: its default); ``<unknown>`` where
    that cannot be composed."""
    try:
        from hydra import compose

        overrides = OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
        recomposed = compose(config_name="config", overrides=list(overrides))
        return _flat(_plain(recomposed.get(section))).get(key, "<unknown>")
    except Exception:  # no overrides.yaml, not inside the app's Hydra: compared as it is
        return "<unknown>"


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            if key in ("cache_dir", "num_workers"):  # where and how fast, not what
                continue
            flat.update(_flat(value, f"{prefix}.{key}"))
        return flat
    return {prefix: node}


def refuse_local_ddp(cfg: DictConfig, launcher: str) -> None:
    """Refuse a multi-process trainer in a sweep whose jobs all run on this machine.

    Lightning starts DDP ranks by re-running the command line, which in a multirun would
    start the whole sweep again in every rank. A cluster launcher (submitit) gives each
    rank its own task instead.
    """
    strategy = str(cfg.trainer.get("strategy", "auto"))
    devices = cfg.trainer.get("devices", 1)
    several = "ddp" in strategy or (isinstance(devices, int) and devices > 1)
    if several and "submitit" not in launcher:
        raise ValueError(
            f"`trainer.strategy={strategy}` with `trainer.devices={devices}` cannot run in a "
            f"local multirun (launcher {launcher.rsplit('.', 1)[-1]}): Lightning starts DDP "
            "ranks by re-running the command line, which would start the sweep again in "
            "every rank. Sweep single-device jobs (trainer=cpu or trainer=gpu, in parallel "
            "with hydra/launcher=joblib), run the DDP job on its own without -m, or sweep "
            "on a cluster with hydra/launcher=submitit_slurm (one task per device; see "
            "docs/sweeps.md)."
        )


def threads_per_job(cfg: DictConfig, hydra_cfg: Any) -> int | None:
    """``cpu_threads``, or the machine's cores shared among a joblib launcher's jobs."""
    if cfg.get("cpu_threads"):
        return int(cfg.cpu_threads)
    if "joblib" not in hydra_cfg.launcher._target_:
        return None
    cores = machine.usable_cores()
    n_jobs = int(hydra_cfg.launcher.get("n_jobs") or -1)
    parallel = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib's -1: all cores
    return max(1, cores // parallel)
