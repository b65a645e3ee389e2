"""The record of a pruning run: one ``RoundRecord`` per round, JSON round-trip."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .jsonio import from_jsonable, to_jsonable, write_text


@dataclass
class RoundRecord:
    """One round. Round 0 is the unpruned model (metrics only).

    ``predicted_increase`` is the sum of the saliencies deleted this round; ``actual_increase`` is
    the measured change of the problem's objective caused by the deletion (before retraining): the
    pruner's own ``PruneInfo.measured_increase`` when it measured one (one field, not two).
    ``metrics_pruned`` are the user's metrics right after deletion, ``metrics`` after retraining.
    """

    round: int
    target: float
    sparsity: float
    remaining: int
    total: int
    remaining_params: int
    predicted_increase: float = 0.0
    actual_increase: float = 0.0
    objective_before: float = math.nan
    objective_pruned: float = math.nan
    metrics_pruned: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class History:
    records: list[RoundRecord] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    stopped: str | None = None

    def append(self, record: RoundRecord) -> None:
        self.records.append(record)

    @property
    def last(self) -> RoundRecord | None:
        return self.records[-1] if self.records else None

    def column(self, name: str) -> list[Any]:
        """A field of every record; ``"metrics.test_accuracy"`` reaches into the metric dicts
        (missing values are NaN)."""
        if "." in name:
            group, key = name.split(".", 1)
            return [getattr(r, group).get(key, math.nan) for r in self.records]
        return [getattr(r, name) for r in self.records]

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(
            {
                "records": [asdict(r) for r in self.records],
                "config": self.config,
                "stopped": self.stopped,
            }
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        d = from_jsonable(d)
        names = {f.name for f in fields(RoundRecord)}
        try:
            recs = [RoundRecord(**{k: v for k, v in r.items() if k in names}) for r in d["records"]]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a pruning history: {exc}") from exc
        return cls(recs, d.get("config", {}), d.get("stopped"))

    def save(self, path: str | Path) -> None:
        """Write JSON atomically (a crash never leaves a half-written file)."""
        write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> History:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON (corrupt history?): {exc}") from exc
        return cls.from_dict(data)
