"""Spread, intervals and verdicts for the figures a report prints.

A method's accuracy in a cell is estimated from its replicates alone: the chosen
configuration trained again with new seeds, none of them selected for anything. The chosen
trial's own test accuracy is not pooled with them: it won its cell on validation accuracy,
and its test accuracy shares that luck (the winner's curse).

Two arms trained under the same replicate seeds (two methods of one data set x depth, or a
tuned and a default configuration of one cell) are compared by the paired t interval over
the seeds they share; Welch's interval (no pairing, unequal variances) is given beside it.
A verdict reads the paired test where at least two pairs exist, else Welch's. The verdicts of
one report are Holm-corrected together (`holm`). scipy computes every interval and p-value.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE


def _t_quantile(df: float, confidence: float = CONFIDENCE) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, df))


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (n - 1) and the t interval of the mean of n runs.

    A run without a figure (NaN: it failed, or diverged) is not dropped silently: it is
    counted in `failed`, and n counts the runs with a figure.
    """

    n: int
    mean: float
    std: float
    low: float
    high: float
    failed: int = 0

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        finite = [v for v in values if math.isfinite(v)]
        failed, n = len(values) - len(finite), len(finite)
        if n == 0:
            return cls(0, math.nan, math.nan, math.nan, math.nan, failed)
        mean = statistics.fmean(finite)
        if n < 2:
            return cls(1, mean, math.nan, math.nan, math.nan, failed)
        std = statistics.stdev(finite)
        half = _t_quantile(n - 1) * std / math.sqrt(n)
        return cls(n, mean, std, mean - half, mean + half, failed)


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) with a 95% interval and the two-sided p-value of its t test.

    `test` is "paired" (over the seeds both arms share; n pairs) or "welch" (n = n_a + n_b);
    `note` says why there is no interval: "n<2", or "no spread" (every run identical).
    """

    diff: float
    low: float
    high: float
    p: float
    test: str
    n: int
    note: str = ""

    @property
    def defined(self) -> bool:
        return math.isfinite(self.low)


def _undefined(diff: float, test: str, n: int, note: str) -> Difference:
    return Difference(diff, math.nan, math.nan, math.nan, test, n, note)


def welch(a: list[float], b: list[float]) -> Difference:
    """Welch's t interval for mean(a) - mean(b) (unequal variances, no pairing)."""
    from scipy.stats import ttest_ind

    a = [v for v in a if math.isfinite(v)]
    b = [v for v in b if math.isfinite(v)]
    diff = statistics.fmean(a) - statistics.fmean(b) if a and b else math.nan
    if len(a) < 2 or len(b) < 2:
        return _undefined(diff, "welch", len(a) + len(b), "n<2")
    if statistics.stdev(a) == 0 and statistics.stdev(b) == 0:
        # n runs that never vary say nothing about how much they could: no interval.
        return _undefined(diff, "welch", len(a) + len(b), "no spread")
    result = ttest_ind(a, b, equal_var=False)
    ci = result.confidence_interval(CONFIDENCE)
    return Difference(diff, float(ci.low), float(ci.high), float(result.pvalue), "welch",
                      len(a) + len(b))


def paired(a: dict[int, float], b: dict[int, float]) -> Difference:
    """The paired t interval for mean(a - b) over the seeds both arms have a figure for."""
    from scipy.stats import ttest_rel

    seeds = sorted(s for s in a.keys() & b.keys() if math.isfinite(a[s]) and math.isfinite(b[s]))
    x, y = [a[s] for s in seeds], [b[s] for s in seeds]
    diff = statistics.fmean(x) - statistics.fmean(y) if seeds else math.nan
    if len(seeds) < 2:
        return _undefined(diff, "paired", len(seeds), "n<2")
    if len({u - v for u, v in zip(x, y, strict=True)}) == 1:
        return _undefined(diff, "paired", len(seeds), "no spread")
    result = ttest_rel(x, y)
    ci = result.confidence_interval(CONFIDENCE)
    return Difference(diff, float(ci.low), float(ci.high), float(result.pvalue), "paired",
                      len(seeds))


def compare(a: dict[int, float], b: dict[int, float]) -> tuple[Difference, Difference]:
    """(the difference a verdict reads, Welch's): paired where 2 or more seeds pair up, else
    Welch's."""
    w = welch(list(a.values()), list(b.values()))
    p = paired(a, b)
    return (p if p.n >= 2 else w), w


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN and is not counted).

    Rejecting where the adjusted p is below ALPHA keeps the chance of any false verdict among
    the family at ALPHA or less.
    """
    order = sorted((i for i, p in enumerate(pvalues) if math.isfinite(p)),
                   key=lambda i: pvalues[i])
    m = len(order)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def verdict(d: Difference, a: str, b: str, p_adjusted: float | None = None) -> str:
    """`<a> better`, `<b> better`, or `no difference at this n`, read from the (Holm-adjusted)
    p-value; without one, from whether the interval holds 0."""
    if not d.defined:
        return d.note or "n<2"
    significant = (p_adjusted < ALPHA) if p_adjusted is not None and math.isfinite(p_adjusted) \
        else (d.low > 0 or d.high < 0)
    if not significant:
        return "no difference at this n"
    return f"{a} better" if d.diff > 0 else f"{b} better"


@dataclass(frozen=True)
class Correlation:
    """Spearman's rho of n paired values, with a percentile bootstrap 95% interval."""

    rho: float
    low: float
    high: float
    n: int


def spearman(x: list[float], y: list[float], *, resamples: int = 2000,
             seed: int = 0) -> Correlation:
    """Spearman's rank correlation (scipy), and a percentile bootstrap interval from
    resampling the pairs. NaN where fewer than 3 pairs, or either side is constant.

    The resampling is written out rather than left to `scipy.stats.bootstrap`: with a dozen
    pairs, some resamples repeat one pair throughout and have no rho; they are left out here,
    where scipy's would make the whole interval NaN.
    """
    import warnings

    import numpy as np
    from scipy.stats import ConstantInputWarning, spearmanr

    n = len(x)
    if n < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return Correlation(math.nan, math.nan, math.nan, n)
    rho = float(spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    draws = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        for _ in range(resamples):
            i = rng.integers(0, n, n)
            r = spearmanr(xs[i], ys[i]).statistic
            if np.isfinite(r):
                draws.append(r)
    if len(draws) < resamples // 2:
        return Correlation(rho, math.nan, math.nan, n)
    low, high = np.percentile(draws, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
    return Correlation(rho, float(low), float(high), n)
