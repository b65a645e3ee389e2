"""Shared timing helpers for the benchmark scripts: interleaved, paired, median-based.

The machines these benchmarks run on are shared and noisy, so absolute times drift. Every helper
here therefore times a *candidate against a baseline in the same process, interleaved*: each round
measures the baseline and the candidate back to back (alternating which goes first), and the
reported ratio is the median over rounds of the per-round ratio candidate / baseline. Load that
changes slowly affects both halves of a round alike and cancels in the ratio.

Contention is not only slow drift, though: with several intra-op threads on a busy machine, a
thread that gets pre-empted stalls the others at every barrier, and a 6 ms pass can take 200 ms.
So each round also measures how long this process's threads sat runnable but not running (the
run-queue wait in ``/proc/self/task/*/schedstat``, Linux); a round whose wait exceeds
``max_contention`` × its wall time is discarded and retried (a bounded number of times, then kept
and its contention recorded). :func:`wait_quiet` can hold a round back until other processes leave
the CPUs alone, but only when asked (``quiet=``): by default nothing waits, so the scripts finish
on a shared machine and report the spread instead.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "Paired",
    "busy_others",
    "compare",
    "measure",
    "quartiles",
    "runqueue_wait_s",
    "wait_quiet",
]


def runqueue_wait_s() -> float | None:
    """Seconds this process's threads have spent runnable but waiting for a CPU (Linux), summed
    over threads; ``None`` where the kernel does not expose it."""
    total = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return total / 1e9


def _cpu_busy_jiffies() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals[:8]) - idle, sum(vals[:8])


def busy_others(window_s: float = 0.5) -> float | None:
    """Fraction of all CPUs busy over ``window_s`` while this process sleeps (so: others, and the
    hypervisor's steal time); ``None`` where ``/proc/stat`` is missing."""
    a = _cpu_busy_jiffies()
    time.sleep(window_s)
    b = _cpu_busy_jiffies()
    if a is None or b is None or b[1] == a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1])


def wait_quiet(threshold: float = 0.25, timeout_s: float = 30.0) -> float | None:
    """Sleep until other processes use less than ``threshold`` of the CPUs, at most
    ``timeout_s``; returns the last busy fraction seen."""
    deadline = time.monotonic() + timeout_s
    busy = busy_others()
    while busy is not None and busy > threshold and time.monotonic() < deadline:
        busy = busy_others(1.0)
    return busy


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
    #: per accepted round: run-queue wait / wall time (``None`` where not measurable)
    contention: list[float | None] = field(default_factory=list)
    #: rounds discarded because of contention
    retried: int = 0

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
    max_contention: float | None = 0.1,
    max_retries: int | None = None,
    quiet: float | None = None,
    collect: bool = True,
) -> Paired:
    """Time ``candidate`` against ``baseline`` in ``repeats`` interleaved rounds.

    Each round times the baseline (median of ``base_number`` calls) and the candidate (median of
    ``cand_number`` calls), alternating which goes first. If the first round's candidate time
    exceeds ``slow_s`` seconds, only ``slow_repeats`` rounds are run in all and the first one
    counts; otherwise, with ``warmup``, the first round is a discarded warm-up and ``repeats``
    more follow.

    A round whose run-queue wait exceeds ``max_contention`` × its wall time is discarded and
    run again, at most ``max_retries`` times in all (default: ``repeats``); after that rounds are
    kept whatever their contention (it is recorded). With ``quiet`` (default None: never wait),
    each round first waits (up to 30 s) until other processes use less than that fraction of the
    CPUs. ``collect`` runs
    the garbage collector before each measurement (untimed).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, not {repeats}")
    retries_left = repeats if max_retries is None else max_retries
    out = Paired()
    total = repeats
    warming = warmup
    while len(out.cand) < total:
        if quiet is not None:
            wait_quiet(quiet)
        order = (0, 1) if len(out.cand) % 2 == 0 else (1, 0)
        got: dict[int, float] = {}
        w0, t0 = runqueue_wait_s(), time.perf_counter()
        for which in order:
            if collect:
                gc.collect()
            if which == 0:
                got[0] = measure(baseline, base_number)
            else:
                got[1] = measure(candidate, cand_number)
        w1, t1 = runqueue_wait_s(), time.perf_counter()
        load = None if w0 is None or w1 is None else (w1 - w0) / (t1 - t0)
        if max_contention is not None and load is not None and load > max_contention:
            if retries_left > 0:  # decide nothing (warm-up, slowness) on a contended round
                retries_left -= 1
                out.retried += 1
                continue
        first = not out.cand
        if first and slow_s is not None and slow_repeats is not None and got[1] > slow_s:
            total = max(1, min(repeats, slow_repeats))
            warming = False
        elif first and warming:
            warming = False
            continue  # the warm-up round does not count
        out.base.append(got[0])
        out.cand.append(got[1])
        out.contention.append(load)
    return out


def status_kb(field: str) -> int | None:
    """A field of /proc/self/status in kB (VmRSS, VmHWM, ...); None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):  # pragma: no cover - not Linux
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:  # pragma: no cover - not Linux, or not permitted
        return False
