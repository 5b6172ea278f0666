"""Run Python the way a user does: a subprocess that must succeed, its output kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_python(
    args: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: int = 600,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """``python *args`` in ``cwd`` with extra ``env``; unless it must succeed (``check``)
    the test fails with the output's tail."""
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
