"""Mean and confidence interval over seeds, with Student's t quantile computed here.

No scipy: the t CDF for an integer number of degrees of freedom is a finite sum of elementary terms
(Abramowitz & Stegun 26.7.3 / 26.7.4), so the quantile is exact to floating-point precision by bisection for
df <= 200 and a Cornish-Fisher expansion (error < 1e-7) beyond. Seeds are few, so df is small in practice.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import NormalDist

EXACT_DF_MAX = 200


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with a positive integer number of degrees of freedom."""
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be a positive integer, got {df!r}")
    theta = math.atan2(abs(t), math.sqrt(df))
    sin, cos = math.sin(theta), math.cos(theta)
    c2 = cos * cos
    if df % 2:  # odd: A = 2/pi * (theta + sin cos (1 + 2/3 c2 + (2*4)/(3*5) c2^2 + ...)), df - 1 terms / 2
        total, term = 1.0, 1.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        inside = 2 / math.pi * (theta + (sin * cos * total if df > 1 else 0.0))
    else:  # even: A = sin (1 + 1/2 c2 + (1*3)/(2*4) c2^2 + ...), df / 2 terms
        total, term = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        inside = sin * total
    # inside = P(|T| <= |t|)
    return 0.5 + 0.5 * inside if t >= 0 else 0.5 - 0.5 * inside


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with df degrees of freedom (e.g. t_quantile(0.975, 2) = 4.3027)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be a positive integer, got {df!r}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    if df > EXACT_DF_MAX:
        z = NormalDist().inv_cdf(p)
        n = float(df)
        return (
            z
            + (z**3 + z) / (4 * n)
            + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * n**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * n**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * n**4)
        )
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Summary:
    """Mean over seeds and the half-width of its two-sided t confidence interval (NaN when n < 2)."""

    n: int
    mean: float
    std: float  # sample standard deviation (ddof=1)
    ci: float  # half-width: mean +- ci
    confidence: float = 0.95

    @property
    def low(self) -> float:
        return self.mean - self.ci

    @property
    def high(self) -> float:
        return self.mean + self.ci

    def scaled(self, factor: float) -> Summary:
        return Summary(self.n, self.mean * factor, self.std * abs(factor), self.ci * abs(factor), self.confidence)

    def format(self) -> str:
        return format_mean_ci(self.mean, self.ci, self.n)


def mean_ci(values: Iterable[float | None], confidence: float = 0.95) -> Summary:
    """Mean and t-interval half-width of the finite values (None, NaN and inf are left out and not counted)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, confidence)
    mean = math.fsum(xs) / n
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, confidence)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, half, confidence)


def format_mean_ci(mean: float, ci: float, n: int | None = None) -> str:
    """'23.41 ± 0.52': the CI with two significant digits and the mean to the same decimal place."""
    if n == 0 or not math.isfinite(mean):
        return "-"
    if not math.isfinite(ci):
        text = f"{mean:.4g}"
        return f"{text} (n={n})" if n is not None else text
    if ci > 1e-9 * abs(mean):  # below that the seeds agree up to float noise: format as an exact zero
        decimals = min(6, max(0, 1 - math.floor(math.log10(ci))))
    else:
        decimals = min(6, max(0, 2 - math.floor(math.log10(abs(mean))))) if mean else 2
    return f"{mean:.{decimals}f} ± {ci:.{decimals}f}"
