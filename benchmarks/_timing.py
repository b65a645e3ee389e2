"""Shared timing helpers for the benchmark scripts: interleaved, paired, median-based.

The machines these benchmarks run on are shared and noisy, so absolute times drift. Every helper
here therefore times a *candidate against a baseline in the same process, interleaved*: each round
measures the baseline and the candidate back to back (alternating which goes first), and the
reported ratio is the median over rounds of the per-round ratio candidate / baseline. Load that
changes slowly affects both halves of a round alike and cancels in the ratio.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Paired", "compare", "measure", "quartiles"]


def measure(fn: Callable[[], object], number: int = 1) -> float:
    """Seconds taken by one call of ``fn``: the median of ``number`` consecutive calls."""
    times = []
    for _ in range(number):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile); all three equal for a single value."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


@dataclass
class Paired:
    """Times (seconds) of a baseline and a candidate taken in interleaved rounds."""

    base: list[float] = field(default_factory=list)
    cand: list[float] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        return [c / b for b, c in zip(self.base, self.cand)]

    @property
    def ratio(self) -> float:
        """Median over rounds of candidate / baseline."""
        return statistics.median(self.ratios)

    @property
    def ratio_iqr(self) -> tuple[float, float]:
        q1, _, q3 = quartiles(self.ratios)
        return q1, q3

    @property
    def cand_s(self) -> float:
        return statistics.median(self.cand)

    @property
    def base_s(self) -> float:
        return statistics.median(self.base)

    @property
    def rounds(self) -> int:
        return len(self.cand)


def compare(
    baseline: Callable[[], object],
    candidate: Callable[[], object],
    repeats: int,
    *,
    base_number: int = 3,
    cand_number: int = 1,
    slow_s: float | None = None,
    slow_repeats: int | None = None,
    warmup: bool = True,
    collect: bool = True,
) -> Paired:
    """Time ``candidate`` against ``baseline`` in ``repeats`` interleaved rounds.

    Each round times the baseline (median of ``base_number`` calls) and the candidate (median of
    ``cand_number`` calls), alternating which goes first. If the first round's candidate time
    exceeds ``slow_s`` seconds, only ``slow_repeats`` rounds are run in all and the first one
    counts; otherwise, with ``warmup``, the first round is a discarded warm-up and ``repeats``
    more follow. ``collect`` runs the garbage collector before each measurement (untimed).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, not {repeats}")
    out = Paired()
    total = repeats
    r = 0
    warming = warmup
    while r < total:
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for which in order:
            if collect:
                gc.collect()
            if which == 0:
                out.base.append(measure(baseline, base_number))
            else:
                out.cand.append(measure(candidate, cand_number))
        if r == 0 and len(out.cand) == 1:
            if slow_s is not None and slow_repeats is not None and out.cand[0] > slow_s:
                total = max(1, min(repeats, slow_repeats))
            elif warming:
                warming = False
                out = Paired()
                continue  # the warm-up round does not count
        r += 1
    return out
