"""``python -m freezeft.run``: the entry point of the Hydra app (:mod:`freezeft.app.main`).

Kept light: Ctrl+C while the app's packages load is one line, and a missing extra
(``pip install "freezeft[app]"``) is one line naming it.
"""

from __future__ import annotations

import os
import sys

from freezeft.extras import missing_extra

if __name__ == "__main__":  # Ctrl+C while the app's packages load: one line, no traceback
    import signal

    def _interrupted_while_loading(*_: object) -> None:
        print("freezeft: interrupted", file=sys.stderr, flush=True)
        os._exit(130)

    signal.signal(signal.SIGINT, _interrupted_while_loading)

try:  # the app's packages come with freezeft[app]
    from freezeft.app.main import TRACEBACKS, cli, main
except ModuleNotFoundError as _missing:
    if __name__ != "__main__" or missing_extra(_missing) is None:
        raise
    sys.exit(f"freezeft: error: {missing_extra(_missing)}")

__all__ = ["main", "cli", "TRACEBACKS"]

if __name__ == "__main__":
    cli()
