"""The verdict: a winner only when it is ahead of every other row by more than the seeds'
noise (Welch's t-test), and how the report says it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from freezeft.app.report.jobs import Run, finite
from freezeft.app.report.markdown import text
from freezeft.app.report.welch import welch_p

if TYPE_CHECKING:
    from freezeft.app.report.rows import StrategySummary

#: the significance level of the winner rule: the best row wins only when Welch's t-test
#: against every other row gives p below it
ALPHA = 0.05


def _values(summary: StrategySummary, key: str) -> list[float]:
    return [float(r.results[key]) for r in summary.runs if finite(r.results.get(key))]


def judge(summaries: Sequence[StrategySummary], key: str) -> None:
    """The winner rule: each row is tested against the best row with :func:`welch_p` on
    ``key``; the best is the ``winner`` only when every other row is ``behind`` (p below
    :data:`ALPHA`); a row at p at or above it ``tie``s with the best; a comparison with a
    row of one run cannot be made (``untested``)."""
    if not summaries:
        return
    best, others = summaries[0], summaries[1:]
    if not others:
        best.verdict = "only row"
        return
    for summary in others:
        summary.p_vs_best = welch_p(_values(best, key), _values(summary, key))
        if summary.p_vs_best is None:
            summary.verdict = "untested"
        else:
            summary.verdict = "behind" if summary.p_vs_best < ALPHA else "tie"
    verdicts = {s.verdict for s in others}
    if verdicts == {"behind"}:
        best.verdict = "winner"
    else:
        best.verdict = "tie" if "tie" in verdicts else "best, untested"


def _runs(count: int) -> str:
    return f"{count} run" + ("s" if count != 1 else "")


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def verdict_cell(summary: StrategySummary) -> str:
    if summary.p_vs_best is not None:
        return f"{summary.verdict} ({_p(summary.p_vs_best)})"
    if summary.verdict == "untested":
        return "untested (a single run on one side)"
    return f"**{summary.verdict}**" if summary.verdict == "winner" else summary.verdict


def _more_seeds(runs: Sequence[Run]) -> str:
    """``seed=0,1,2``: the seeds the runs used and two more (at least three in all)."""
    seeds = sorted({s for r in runs if isinstance(s := r.results.get("seed"), int)})
    target, extra = max(3, len(seeds) + 2), 0
    while len(seeds) < target:
        if extra not in seeds:
            seeds.append(extra)
        extra += 1
    return "seed=" + ",".join(map(str, sorted(seeds)))


def verdict_line(
    summaries: Sequence[StrategySummary], runs: Sequence[Run], label: str, best_word: str
) -> str:
    """The report's first line, in Markdown: the winner, the rows that tie, or why there is
    none (the rows' names and ``label`` escaped, :func:`~freezeft.app.report.markdown.text`)."""
    best, label = summaries[0], text(label)

    def name(summary: StrategySummary) -> str:
        return text(summary.variant)

    if best.verdict == "only row":
        return (
            f"One setting only: **{name(best)}** ({_runs(len(best.runs))}); "
            "there is nothing to compare it with."
        )
    ties = [s for s in summaries[1:] if s.verdict == "tie"]
    untested = [name(s) for s in summaries[1:] if s.verdict == "untested"]
    if best.verdict == "winner":
        closest = max(summaries[1:], key=lambda s: s.p_vs_best or 0.0)
        return (
            f"Winner: **{name(best)}** ({best_word} mean {label}), ahead of every other row "
            f"by more than the seeds' noise (Welch's t-test, {_p(closest.p_vs_best or 0.0)} "
            f"against the closest, {name(closest)})."
        )
    if ties:
        names = ", ".join(f"**{name(s)}**" for s in [best, *ties])
        parts = [
            f"Winner: none. The top rows tie: {names}. {name(best)} has the {best_word} "
            f"mean {label}, but the difference is within the seeds' noise (Welch's t-test "
            f"p ≥ {ALPHA})."
        ]
    elif len(best.runs) < 2:
        parts = [
            f"Winner: none. **{name(best)}** is best by a single run ({best_word} {label}); "
            "a single run cannot tell a difference from seed noise."
        ]
        untested = []  # every row is: said already
    else:
        parts = [
            f"Winner: none. **{name(best)}** has the {best_word} mean {label} and is ahead "
            "by more than the seeds' noise of every row it could be tested against."
        ]
    if untested:
        parts.append(
            f"{', '.join(untested)} {'has' if len(untested) == 1 else 'have'} a single run, "
            "which cannot be told from noise."
        )
    parts.append(f"Rerun with more seeds ({_more_seeds(runs)}) to tell.")
    return " ".join(parts)
