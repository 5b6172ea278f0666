"""``python -m freezeft.transcribe CKPT AUDIO...``: the entry point, and the earlier import
path, of :mod:`freezeft.speech.transcribe`."""

import sys

from freezeft.speech.transcribe import *  # noqa: F403
from freezeft.speech.transcribe import __all__ as __all__
from freezeft.speech.transcribe import main

if __name__ == "__main__":
    sys.exit(main())
