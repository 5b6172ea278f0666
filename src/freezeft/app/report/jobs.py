"""One job of a sweep: what became of it, read from the files it left in its dir."""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from freezeft.files import read_text_capped
from freezeft.text import describe_divergence, is_number, joined_lines

if TYPE_CHECKING:
    from freezeft.app.report.sweep import Sweep

# what became of a job
FINISHED = "finished"
FAILED = "failed"
DIVERGED = "diverged"
INTERRUPTED = "interrupted"
NO_RESULT = "killed or still running"
UNREADABLE = "unreadable"
OTHER_STAGE = "not a transfer run"

#: the most the report reads of a job's JSON or YAML file: far more than a run writes (a few
#: KiB; a failure's traceback some more), far less than would stall the report
FILE_LIMIT = 16 * 2**20
#: the deepest nesting of a job's JSON file the report reads (a run's is 4 levels deep)
DEPTH_LIMIT = 64


@dataclass
class Run:
    """One finished job: its dir, its ``results.json`` and the row it is filed under."""

    dir: Path
    results: dict[str, Any]
    variant: str = ""


@dataclass
class Job:
    """One job dir of a sweep and what became of it.

    ``state`` is one of ``finished``, ``failed``, ``diverged``, ``interrupted`` (a
    checkpoint but no result: resumable), ``killed or still running`` (no checkpoint, no
    result), ``unreadable`` (its results.json cannot be used) or ``not a transfer run``;
    ``detail`` says why (the error, the divergence, the resume command, what is unreadable);
    ``run`` is set for a finished job only; ``command`` is the resume command ``detail``
    gives in backticks (an interrupted job's).
    """

    dir: Path
    state: str
    overrides: list[str]
    detail: str = ""
    run: Run | None = None
    command: str = ""


def read_job(job_dir: Path, sweep: Sweep) -> Job:
    """What became of the job in ``job_dir``, from the files it left."""
    overrides = read_overrides(job_dir, sweep)
    results_path, failure_path = job_dir / "results.json", job_dir / "failure.json"
    problem = None
    if results_path.exists():
        results, problem = _read_json(results_path)
        problem = problem or _malformed(results)
        if problem is None:
            status = results.get("status", FINISHED)
            if status == DIVERGED:
                return Job(job_dir, DIVERGED, overrides, _divergence(results.get("diverged")))
            if results.get("stage", "transfer") != "transfer":
                detail = f"stage={results['stage']}; the report compares transfer runs"
                return Job(job_dir, OTHER_STAGE, overrides, detail)
            if status == FINISHED:
                return Job(job_dir, FINISHED, overrides, run=Run(job_dir, results))
            problem = f"says its status is {json.dumps(status)}"
        sweep.cannot_read(
            results_path, f"{results_path} {problem}", "the job's results (not ranked)"
        )
    if failure_path.exists():
        failure, unreadable = _read_json(failure_path)
        if unreadable is None and isinstance(failure, dict) and failure.get("error"):
            if not overrides and isinstance(failure.get("overrides"), list):
                overrides = [str(o) for o in failure["overrides"]]
            return Job(job_dir, FAILED, overrides, joined_lines(str(failure["error"])))
        if unreadable is None:
            unreadable = (
                "holds no `error`"
                if isinstance(failure, dict)
                else f"holds {_kind(failure)}, not an object with the error"
            )
        sweep.cannot_read(failure_path, f"{failure_path} {unreadable}", "why the job failed")
        return Job(job_dir, FAILED, overrides, f"why is not known: its failure.json {unreadable}")
    if problem is not None:
        return Job(job_dir, UNREADABLE, overrides, f"its results.json {problem}")
    checkpoints = sorted((job_dir / "checkpoints").glob("*.ckpt"))
    if checkpoints:
        names = ", ".join(p.name for p in checkpoints)
        command = _resume_command(job_dir, overrides)
        return Job(
            job_dir,
            INTERRUPTED,
            overrides,
            f"stopped with a checkpoint ({names}) and no result; resume it with "
            f"`{command}`, then report the sweep again",
            command=command,
        )
    return Job(
        job_dir,
        NO_RESULT,
        overrides,
        "no results.json, failure.json or checkpoint: killed before its first checkpoint, "
        "or still running",
    )


def _read_json(path: Path) -> tuple[Any, str | None]:
    """``(content, None)``, or ``(None, why it is unreadable)``: a file that is not a regular
    one (a FIFO, a link to ``/dev/zero``), is over :data:`FILE_LIMIT`, not UTF-8, empty, not
    JSON or nested deeper than :data:`DEPTH_LIMIT`."""
    try:
        text = read_text_capped(path, FILE_LIMIT, f"a {path.name}")
    except (OSError, UnicodeDecodeError) as err:
        return None, f"cannot be read ({err})"
    except ValueError as err:  # not a regular file, too large
        return None, str(err)
    if not text.strip():
        return None, "is empty"
    nested = f"is nested more than {DEPTH_LIMIT} levels deep: not a file a run writes"
    try:
        content = json.loads(text)
    except RecursionError:  # deeper than Python's recursion limit
        return None, nested
    except ValueError as err:
        return None, f"is not valid JSON ({err})"
    return (None, nested) if _deeper_than(content, DEPTH_LIMIT) else (content, None)


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` (parsed JSON) nests lists and objects more than ``limit`` deep
    (found without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack += [
                (child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)
            ]
    return False


def read_yaml(path: Path) -> Any:
    """The YAML file at ``path`` as OmegaConf reads it, if it is a regular file of at most
    :data:`FILE_LIMIT` (a FIFO would block the report, ``/dev/zero`` never end).

    Raises:
        OSError: it cannot be read.
        ValueError: it is not a regular file, is too large or not UTF-8.
        Exception: it is not YAML OmegaConf reads (its own errors).
    """
    return OmegaConf.create(read_text_capped(path, FILE_LIMIT, f"a {path.name}"))


def _kind(value: Any) -> str:
    """The JSON name of ``value``'s type."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    names = {dict: "an object", list: "a list", str: "a string"}
    return next((n for t, n in names.items() if isinstance(value, t)), "a number")


def _malformed(results: Any) -> str | None:
    """Why ``results`` is not a ``results.json`` the report can use (None if it is)."""
    if not isinstance(results, dict):
        return f"holds {_kind(results)}, not an object of results"
    for key in ("report", "budget", "machine", "transfer", "diverged"):
        if results.get(key) is not None and not isinstance(results[key], dict):
            return f"has {_kind(results[key])} for `{key}`, not an object"
    report = results.get("report") or {}
    for key, kind in (("rank_by", str), ("mode", str), ("columns", dict), ("split_by", list)):
        if key in report and not isinstance(report[key], kind):
            return f"has {_kind(report[key])} for `report.{key}`"
    return None


def _divergence(details: Any) -> str:
    try:
        return joined_lines(describe_divergence(details or {}))
    except Exception:  # details of an unexpected shape: still a diverged job
        return "diverged (its results.json does not say where)"


def finite(value: Any) -> bool:
    """Whether ``value`` is a number with a finite float value (an integer beyond the float
    range, which a damaged results.json may hold, is not)."""
    if not is_number(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # math.isfinite(10**400)
        return False


def read_overrides(job_dir: Path, sweep: Sweep | None = None) -> list[str]:
    """The job's command-line overrides, as Hydra saved them (none if it did not)."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    try:
        overrides = read_yaml(path)
        return [str(o) for o in overrides] if OmegaConf.is_list(overrides) else []
    except Exception as err:  # unreadable: the report still lists the job
        if sweep is not None:
            sweep.cannot_read(path, f"{path} is not readable ({err})", "the job's overrides")
        return []


def _resume_command(job_dir: Path, overrides: Sequence[str]) -> str:
    """The command that resumes the job: its overrides plus ``resume=<its dir>``, with the
    ``--config-dir`` it ran with (and the folder it ran from, where it matters)."""
    config_dirs, cwd = [], None
    try:
        runtime = read_yaml(job_dir / ".hydra" / "hydra.yaml").hydra.runtime
        config_dirs = [
            str(source.path)
            for source in runtime.get("config_sources", [])
            if source.get("provider") == "command-line"
        ]
        cwd = runtime.get("cwd")
    except Exception:  # no hydra.yaml: the overrides alone
        pass
    words = ["python", "-m", "freezeft.run"]
    words += [w for d in config_dirs for w in ("--config-dir", d)]
    words += [str(o) for o in overrides if not str(o).startswith("resume=")]
    words.append(f"resume={job_dir.resolve()}")
    command = " ".join(shlex.quote(w) for w in words)
    return f"cd {shlex.quote(str(cwd))} && {command}" if cwd else command
