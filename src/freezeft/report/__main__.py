"""``python -m freezeft.report <sweep dir>``: the entry point of :mod:`freezeft.app.report`."""

from freezeft.app.report.cli import main

if __name__ == "__main__":
    main()
