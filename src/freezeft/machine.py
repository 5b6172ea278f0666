"""The machine a number was measured on, for results, reports and benchmarks."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

__all__ = ["describe", "summary", "usable_cores"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def describe() -> dict[str, Any]:
    """CPU model and usable cores, torch threads, GPU (or None), torch version and OS."""
    return {
        "cpu": _cpu_model(),
        "cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "os": platform.platform(terse=True),
    }


def summary(machine: dict[str, Any]) -> str:
    """One line: ``Intel Xeon ... (2 cores, 2 torch threads), no GPU, torch 2.11.0``."""
    gpu = machine.get("gpu") or "no GPU"
    return (
        f"{machine.get('cpu', '?')} ({machine.get('cores', '?')} cores, "
        f"{machine.get('torch_threads', '?')} torch threads), {gpu}, "
        f"torch {machine.get('torch', '?')}"
    )
