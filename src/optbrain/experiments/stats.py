"""Summaries over seeds as the reproductions report them: mean ± sample standard deviation of a
list, pointwise along aligned curves, and the ``"m ± sd"`` and ``"(…, n seeds)"`` texts."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["fmt", "mean_sd", "mean_sd_curve", "seeds_tag"]


def mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (NaN, NaN if none; sd 0 for one)."""
    vals = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def mean_sd_curve(curves: Sequence[Sequence[float]]) -> list[tuple[float, float]]:
    """Pointwise :func:`mean_sd` over aligned curves (one per seed), cut to the shortest."""
    n = min(len(c) for c in curves)
    return [mean_sd([c[i] for c in curves]) for i in range(n)]


def fmt(stats: tuple[float, float], digits: int = 1) -> str:
    """``"m ± sd"``."""
    return f"{stats[0]:.{digits}f} ± {stats[1]:.{digits}f}"


def seeds_tag(n: int, what: str = "") -> str:
    """``"(what, n seeds)"`` (``"(1 seed)"`` without ``what``), the suffix of claim names."""
    seeds = f"{n} seed{'s' if n > 1 else ''}"
    return f"({what}, {seeds})" if what else f"({seeds})"
