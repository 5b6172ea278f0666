"""Welch's t-test and the means and spreads it compares, on the standard library alone (the
t-distribution's tail is a regularised incomplete beta function) and safe from overflow:
the values are scaled by a power of two first, which changes no result but the squares of
values near the float maximum (a damaged ``results.json``'s ``1e160``) stay finite."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """The two-sided p-value of Welch's t-test that ``a`` and ``b`` have the same mean
    (None when either has fewer than two values, its noise unknown, or a value is not
    finite).

    Welch's test assumes neither equal variances nor equal run counts, and its
    t-distribution with few degrees of freedom is what makes two seeds per row say
    little. Standard library only: the t-distribution's tail is a regularised
    incomplete beta function.

    Example::

        >>> round(welch_p([0.80, 0.82], [0.70, 0.66]), 3)
        0.055
    """
    if len(a) < 2 or len(b) < 2 or not all(math.isfinite(v) for v in [*a, *b]):
        return None
    exponent = _exponent([*a, *b])
    a, b = _scaled(a, exponent), _scaled(b, exponent)  # t and df do not change
    mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
    var_a, var_b = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se2 = var_a + var_b
    if se2 == 0:  # no noise at all: equal or different for sure
        return 1.0 if mean_a == mean_b else 0.0
    t = abs(mean_a - mean_b) / math.sqrt(se2)
    # Welch-Satterthwaite, as shares of se2 (each squared term in [0, 1]: no underflow)
    df = 1 / ((var_a / se2) ** 2 / (len(a) - 1) + (var_b / se2) ** 2 / (len(b) - 1))
    return _incomplete_beta(df / 2, 0.5, df / (df + t * t))


def mean(values: Sequence[float]) -> float:
    """The mean of finite ``values``, as :func:`statistics.fmean` gives it (to the bit), but
    also where their sum is too large for a float (values near the float maximum)."""
    exponent = _exponent(values)
    return math.ldexp(statistics.fmean(_scaled(values, exponent)), exponent)


def stdev(values: Sequence[float]) -> float:
    """The sample standard deviation of two or more finite ``values``, as
    :func:`statistics.stdev` gives it, also where their squares are too large for a float;
    ``inf`` where the deviation itself is (values of both signs near the float maximum)."""
    exponent = _exponent(values)
    try:
        return math.ldexp(statistics.stdev(_scaled(values, exponent)), exponent)
    except OverflowError:
        return math.inf


def _exponent(values: Sequence[float]) -> int:
    """The power of two of the largest magnitude among ``values`` (0 if all are 0)."""
    return math.frexp(max((abs(v) for v in values), default=0.0))[1]


def _scaled(values: Sequence[float], exponent: int) -> list[float]:
    """``values`` divided by ``2**exponent``: exact, and none of them beyond 1 in magnitude."""
    return [math.ldexp(float(v), -exponent) for v in values]


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), by its continued fraction
    (Lentz's method, as in Numerical Recipes' ``betai``)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1 - math.exp(log_front) * _beta_fraction(b, a, 1 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny = 1e-300

    def nonzero(value: float) -> float:
        return value if abs(value) > tiny else tiny

    c, d = 1.0, 1 / nonzero(1 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 / nonzero(1 + numerator * d)
            c = nonzero(1 + numerator / c)
            h *= d * c
        if abs(d * c - 1) < 1e-14:
            break
    return h
