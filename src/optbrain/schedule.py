"""Schedules: round number (1, 2, ...) -> total target sparsity (fraction of prunable entries)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

Schedule = Callable[[int], float]


def _fraction(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1), not {value!r}")
    return float(value)


def _rounds(rounds: int) -> int:
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, not {rounds!r}")
    return rounds


@dataclass(frozen=True)
class one_shot:  # noqa: N801 - reads as a function in user code
    """The whole target at once (every round asks for the same total)."""

    sparsity: float

    def __post_init__(self):
        _fraction("sparsity", self.sparsity)

    def __call__(self, r: int) -> float:
        return self.sparsity


@dataclass(frozen=True)
class linear:  # noqa: N801
    """final · r / rounds, reaching ``final`` at round ``rounds`` and staying there."""

    final: float
    rounds: int

    def __post_init__(self):
        _fraction("final", self.final)
        _rounds(self.rounds)

    def __call__(self, r: int) -> float:
        return self.final * min(r, self.rounds) / self.rounds


@dataclass(frozen=True)
class geometric:  # noqa: N801
    """Each round deletes ``rate`` of what is left: 1 − (1 − rate)^r, capped at ``final``."""

    rate: float
    final: float | None = None

    def __post_init__(self):
        _fraction("rate", self.rate)
        if self.final is not None:
            _fraction("final", self.final)

    def __call__(self, r: int) -> float:
        s = 1.0 - (1.0 - self.rate) ** r
        # (1 − rate)^r underflows to 0 for large r: stay strictly below 1
        cap = self.final if self.final is not None else math.nextafter(1.0, 0.0)
        return min(s, cap)


@dataclass(frozen=True)
class cubic:  # noqa: N801
    """Zhu & Gupta's gradual schedule: final + (initial − final)(1 − r/rounds)³."""

    final: float
    rounds: int
    initial: float = 0.0

    def __post_init__(self):
        _fraction("final", self.final)
        _fraction("initial", self.initial)
        _rounds(self.rounds)
        if self.initial > self.final:
            raise ValueError(
                f"initial ({self.initial}) must not exceed final ({self.final}): masks only shrink"
            )

    def __call__(self, r: int) -> float:
        t = min(r, self.rounds) / self.rounds
        return self.final + (self.initial - self.final) * (1.0 - t) ** 3


SCHEDULES = {"one_shot": one_shot, "linear": linear, "geometric": geometric, "cubic": cubic}
