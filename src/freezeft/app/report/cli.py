"""The command line: ``python -m freezeft.report <sweep dir>``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from freezeft.app.report.write import write_report
from freezeft.files import EXIT_CTRL_C, EXIT_SIGTERM, Terminated, signals_raise


def interrupted(stop: BaseException, sweep_dir: Path, how_to_write: str) -> SystemExit:
    """Say in one line on stderr that the report of ``sweep_dir`` was stopped (``stop``:
    ``KeyboardInterrupt`` or :class:`~freezeft.files.Terminated`) before it was written,
    and how to write it; returns the ``SystemExit`` to raise (130 for Ctrl+C, 143 for
    SIGTERM)."""
    ctrl_c = isinstance(stop, KeyboardInterrupt)
    print(
        f"freezeft: interrupted ({'Ctrl+C' if ctrl_c else 'SIGTERM'}) while writing the report "
        f"of {sweep_dir}; report.md is as it was and no file is left half-written: "
        f"{how_to_write}",
        file=sys.stderr,
        flush=True,
    )
    return SystemExit(exit_code(stop))


def exit_code(stop: BaseException) -> int:
    """130 for Ctrl+C (``KeyboardInterrupt``), 143 for SIGTERM."""
    return EXIT_CTRL_C if isinstance(stop, KeyboardInterrupt) else EXIT_SIGTERM


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line: ``python -m freezeft.report <sweep dir>``.

    A user error (no sweep dir, no finished job) is one line on stderr and exit code 1;
    Ctrl+C is one line and exit code 130, SIGTERM one line and 143, and neither leaves a
    temporary file or a half-written report.
    """
    from freezeft.app import report  # its docstring's title is the command's description

    parser = argparse.ArgumentParser(
        prog="python -m freezeft.report", description=report.__doc__.split("\n\n")[0]
    )
    parser.add_argument("sweep_dir", type=Path, help="a multirun dir (multirun/<date>/<time>)")
    args = parser.parse_args(argv)
    with signals_raise():
        try:
            path = write_report(args.sweep_dir)
        except (OSError, ValueError) as err:  # a missing dir, one run's dir, no finished job
            parser.exit(1, f"freezeft: error: {err}\n")
        except (KeyboardInterrupt, Terminated) as stop:
            raise interrupted(stop, args.sweep_dir, "run the command again to write it") from None
        try:
            print(path.read_text())
            print(f"-> {path}")
        except (KeyboardInterrupt, Terminated) as stop:  # while printing: the report is whole
            print(f"freezeft: interrupted; the report is written: {path}", file=sys.stderr)
            raise SystemExit(exit_code(stop)) from None
    return path
