"""``python -m freezeft.report <sweep dir>``: the entry point and the earlier import path of
the app's sweep report, :mod:`freezeft.app.report`."""

from freezeft.app.report import (
    Job,
    ReportCallback,
    Run,
    StrategySummary,
    Sweep,
    collect,
    main,
    ranking,
    summarise,
    welch_p,
    write_report,
)

__all__ = [
    "Job",
    "Run",
    "StrategySummary",
    "Sweep",
    "collect",
    "ranking",
    "summarise",
    "welch_p",
    "write_report",
    "ReportCallback",
    "main",
]
