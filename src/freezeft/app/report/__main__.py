"""``python -m freezeft.report <sweep dir>``: see :func:`freezeft.report.cli.main`."""

from freezeft.report.cli import main

if __name__ == "__main__":
    main()
