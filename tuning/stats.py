"""Spread and confidence intervals for the comparisons a report prints.

A method's accuracy in a cell is the mean over its chosen trial and that trial's replicates
(runs that differ only in their seed). Two methods are compared with Welch's t interval for the
difference of the means: it does not assume equal variances, and at the handful of runs a
cell has, a t interval is what the data can support (a bootstrap needs more runs than that).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

CONFIDENCE = 0.95


def _t_quantile(df: float, confidence: float = CONFIDENCE) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, df))


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (n - 1) and the t interval of the mean of n runs."""

    n: int
    mean: float
    std: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        values = [v for v in values if math.isfinite(v)]
        n = len(values)
        if n == 0:
            return cls(0, math.nan, math.nan, math.nan, math.nan)
        mean = statistics.fmean(values)
        if n < 2:
            return cls(1, mean, math.nan, math.nan, math.nan)
        std = statistics.stdev(values)
        half = _t_quantile(n - 1) * std / math.sqrt(n)
        return cls(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Difference:
    """a - b with Welch's 95% interval; `df` is the Welch-Satterthwaite degrees of freedom."""

    diff: float
    low: float
    high: float
    df: float
    note: str = ""  # why there is no interval: "n<2", or "no spread" (every run identical)

    @property
    def defined(self) -> bool:
        return math.isfinite(self.low)


def welch(a: list[float], b: list[float]) -> Difference:
    """Welch's t interval for mean(a) - mean(b); undefined (NaN) when either has n < 2."""
    sa, sb = Summary.of(a), Summary.of(b)
    diff = sa.mean - sb.mean
    if sa.n < 2 or sb.n < 2:
        return Difference(diff, math.nan, math.nan, math.nan, "n<2")
    va, vb = sa.std ** 2 / sa.n, sb.std ** 2 / sb.n
    se = math.sqrt(va + vb)
    if se == 0:
        # Every run of both sides identical: a t interval is degenerate, and n runs that
        # never vary say nothing about how much they could.
        return Difference(diff, math.nan, math.nan, math.nan, "no spread")
    df = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
    half = _t_quantile(df) * se
    return Difference(diff, diff - half, diff + half, df)


def verdict(d: Difference, a: str, b: str) -> str:
    """`<a> better`, `<b> better`, or `no difference at this n` (the interval holds 0)."""
    if not d.defined:
        return d.note or "n<2"
    if d.low > 0:
        return f"{a} better"
    if d.high < 0:
        return f"{b} better"
    return "no difference at this n"
