"""benchmarks/gpu_check.py, the GPU readiness check, on its CPU path (--tiny): both
strategies run through the app and the table has their throughput and test CER."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pyrun import run_python

pytestmark = pytest.mark.slow  # two app runs in subprocesses

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"


def test_the_gpu_check_runs_on_the_cpu_with_the_tiny_configuration(
    tmp_path, cache_dir, german_corpus, english_corpus
):
    proc = run_python([str(SCRIPT), "--tiny", "--out", str(tmp_path), "--cache", str(cache_dir)],
                      cwd=tmp_path)  # fmt: skip
    rows = re.findall(r"^\| (naive|frozen_encoder) \| ([\d.]+) \| n/a / n/a \| n/a \| ([\d.]+) \|",
                      proc.stdout, re.M)  # fmt: skip
    assert [r[0] for r in rows] == ["naive", "frozen_encoder"], proc.stdout
    assert all(float(r[1]) > 0 and 0 <= float(r[2]) <= 1.5 for r in rows)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["strategy"] for r in saved] == ["naive", "frozen_encoder"]
    assert all(r["gpu_util"] is None for r in saved)  # no nvidia-smi here
