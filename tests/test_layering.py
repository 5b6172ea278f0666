"""The three wings and their one-way dependencies (docs/architecture.md).

* the library (callbacks, groups, plan, coordinator, caches, checkpoint helpers, file
  writes): torch, numpy, filelock and Lightning (through ``freezeft._lightning`` only);
  ``freezeft.files`` the standard library only;
* the app (``freezeft.app``, and the entry points ``freezeft.run``, ``freezeft.report`` and
  ``freezeft.task`` at the top): the library, Hydra, OmegaConf, matplotlib; never the
  speech task;
* the speech task (``freezeft.speech``, ``freezeft.transcribe``): the library and its own
  packages; never the app (the app reaches it through configs).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.library  # runs where only torch and Lightning are installed

SRC = Path(__file__).parents[1] / "src" / "freezeft"
#: the app's folder, and its entry points and earlier import paths at the top
APP = sorted([SRC / "run.py", SRC / "task.py", *SRC.glob("report/*.py"), *SRC.glob("app/**/*.py")])
#: the speech task's folder, and its entry point at the top
SPEECH = sorted([SRC / "transcribe.py", *SRC.glob("speech/*.py")])
LIBRARY = sorted(
    [*SRC.glob("callbacks/*.py"), *(p for p in SRC.glob("*.py") if p not in APP + SPEECH)]
)
#: what the library may import besides the standard library and itself
LIBRARY_DEPENDENCIES = {"torch", "numpy", "filelock", "typing_extensions", "yaml"}
#: library modules of the standard library alone (written files: anything may use them)
STANDARD_LIBRARY_ONLY = [SRC / "files.py"]
#: what users bring, imported inside a function only when their model is one of these
USER_PACKAGES = {"timm"}
LIGHTNING = {"pytorch_lightning", "lightning", "lightning_fabric", "lightning_utilities"}
#: what only the app and the speech task need: `import freezeft.callbacks` loads none
EXTRAS = [
    "hydra",
    "omegaconf",
    "torchaudio",
    "wordfreq",
    "flashlight",
    "matplotlib",
    "espeakng_loader",
    "jiwer",
    "soundfile",
    "piper",
    "onnxruntime",
]


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def top(name: str) -> str:
    return name.split(".")[0]


def test_every_module_is_in_one_wing():
    every = sorted(p for p in SRC.rglob("*.py") if "conf" not in p.parts)
    assert sorted(set(LIBRARY + APP + SPEECH)) == every
    assert not set(LIBRARY) & set(APP + SPEECH)


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(SRC)))
def test_the_library_imports_torch_lightning_and_itself_only(path):
    names = imported(path)
    allowed = set(sys.stdlib_module_names) | LIBRARY_DEPENDENCIES | USER_PACKAGES | {"freezeft"}
    if path.name == "_lightning.py":
        allowed |= LIGHTNING
    outside = sorted(n for n in names if top(n) not in allowed)
    assert not outside, f"{path.relative_to(SRC)} imports {outside}"
    upward = sorted(
        n
        for n in names
        if n.startswith(("freezeft.speech", "freezeft.app", "freezeft.run", "freezeft.report"))
        or n in ("freezeft.task", "freezeft.transcribe", "freezeft.conf")
    )
    assert not upward, f"{path.relative_to(SRC)} imports the app or the speech task: {upward}"


@pytest.mark.parametrize("path", STANDARD_LIBRARY_ONLY, ids=lambda p: str(p.relative_to(SRC)))
def test_the_file_writing_helpers_import_the_standard_library_only(path):
    assert path in LIBRARY
    outside = sorted(n for n in imported(path) if top(n) not in sys.stdlib_module_names)
    assert not outside, f"{path.relative_to(SRC)} imports {outside}"


@pytest.mark.parametrize("path", APP, ids=lambda p: str(p.relative_to(SRC)))
def test_the_app_reaches_the_speech_task_only_through_configs(path):
    speech = sorted(
        n for n in imported(path) if n.startswith(("freezeft.speech", "freezeft.transcribe"))
    )
    assert not speech, f"{path.relative_to(SRC)} imports {speech}"


@pytest.mark.parametrize("path", SPEECH, ids=lambda p: str(p.relative_to(SRC)))
def test_the_speech_task_does_not_import_the_app(path):
    app = sorted(
        n
        for n in imported(path)
        if n.startswith(("freezeft.app", "freezeft.run", "freezeft.report"))
    )
    assert not app, f"{path.relative_to(SRC)} imports {app}"


LOADED = """
import importlib, json, sys
baseline = set()
try:
    import pytorch_lightning  # what Lightning itself loads is not freezeft's doing
except ImportError:
    import lightning.pytorch
baseline = set(sys.modules)
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(set(sys.modules) - baseline)))
"""


@pytest.mark.slow  # a subprocess that imports torch and Lightning afresh
def test_importing_the_library_loads_no_app_or_speech_dependency():
    import json

    library = [
        "freezeft",
        "freezeft.callbacks",
        "freezeft.transfer",
        "freezeft.checkpointing",
        "freezeft.history",
    ]
    out = subprocess.run(
        [sys.executable, "-c", LOADED, *library], capture_output=True, text=True, check=True
    )
    loaded = {top(name) for name in json.loads(out.stdout)}
    assert not loaded & set(EXTRAS), sorted(loaded & set(EXTRAS))
