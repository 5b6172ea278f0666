"""The command line: ``python -m freezeft.report <sweep dir>``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from freezeft.report.write import write_report


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line: ``python -m freezeft.report <sweep dir>``."""
    from freezeft import report  # its docstring's title is the command's description

    parser = argparse.ArgumentParser(
        prog="python -m freezeft.report", description=report.__doc__.split("\n\n")[0]
    )
    parser.add_argument("sweep_dir", type=Path, help="a multirun dir (multirun/<date>/<time>)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.sweep_dir)
    except (OSError, ValueError) as err:  # a missing dir, one run's dir, no finished job
        parser.exit(1, f"freezeft: error: {err}\n")
    print(path.read_text())
    print(f"-> {path}")
    return path
