"""``python signal_during_report.py SIGNAL MODULE ARGS...``: ``python -m MODULE ARGS``, and the
process sends itself a real SIGNAL while it writes ``report.md``: the report's temporary file
is written in full and about to be renamed into place, the moment a kill leaves the most
behind.

With ``MODULE`` ``freezeft.run`` each job "trains" in no time (``$FAKE_RESULTS``: a JSON
object of the results every job writes, beside its seed and strategy), so that a sweep
reaches its report (:class:`freezeft.app.report.ReportCallback`) in seconds.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
from pathlib import Path

SIGNAL = sys.argv[1]
SIGNUM = getattr(signal, SIGNAL)
MODULE = sys.argv[2]
_replace = os.replace


def replace(src, dst, *args, **kwargs):
    """``os.replace``, but the rename of report.md's temporary file is preceded by SIGNUM."""
    if Path(dst).name == "report.md":
        print(f"signal_during_report: {SIGNAL} with {src} written", flush=True)
        os.kill(os.getpid(), SIGNUM)
    return _replace(src, dst, *args, **kwargs)


os.replace = replace

if MODULE == "freezeft.run":
    import freezeft.app.train

    def train(cfg, output_dir: Path) -> dict:
        results = {
            **json.loads(os.environ["FAKE_RESULTS"]),
            "status": "finished",
            "stage": "transfer",
            "seed": cfg.seed,
            "strategy": str(cfg.strategy.name),
            "train_seconds": 1.0,
            "run_dir": str(output_dir),
        }
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "results.json").write_text(json.dumps(results))
        return results

    freezeft.app.train.train = train

sys.argv = [MODULE, *sys.argv[3:]]
runpy.run_module(MODULE, run_name="__main__", alter_sys=True)
