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
    ``generalization`` holds the FPE estimate of the retrained model when the loop was asked for
    it (``fpe``, ``n_eff``, ``train_error``, ``gamma2``, ``n_params``, ``damping``; see
    :mod:`optbrain.generalization`).
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
    generalization: dict[str, float] = field(default_factory=dict)


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

    def select(
        self, criterion: str = "fpe", tolerance: float = 0.0, metric: str | None = None
    ) -> RoundRecord:
        """The round a model-selection rule chooses (after retraining, round 0 included).

        * ``"fpe"``: the smallest FPE (``generalization.fpe``, recorded by ``iterative_prune``
          with ``estimate_fpe``);
        * ``"validation"``: the best ``metric`` (default ``"metrics.val_loss"``; lower is better,
          higher for an accuracy);
        * ``"smallest_within"``: the round with the fewest remaining parameters whose ``metric``
          (default ``"metrics.val_loss"``; ``"generalization.fpe"`` works too) is within
          ``tolerance`` (absolute, ≥ 0) of the best round's — Gorodkin et al.'s "smallest
          successful architecture".

        Ties go to the smaller network. Rounds whose value is missing or NaN are skipped. A
        metric naming the test set is refused: selecting on it biases the test error.
        """
        key = self._selection_key(criterion, tolerance, metric)
        higher = "accuracy" in key
        rows = [
            (r, float(v))
            for r, v in zip(self.records, self.column(key))
            if isinstance(v, (int, float)) and math.isfinite(v)
        ]
        if not rows:
            raise ValueError(f"no round has a finite {key!r}: nothing to select on")
        sign = -1.0 if higher else 1.0
        best = min(sign * v for _, v in rows)
        slack = tolerance if criterion == "smallest_within" else 0.0
        ok = [r for r, v in rows if sign * v <= best + slack]
        return min(ok, key=lambda r: (r.remaining_params, -r.round))

    @staticmethod
    def _selection_key(criterion: str, tolerance: float, metric: str | None) -> str:
        criteria = ("fpe", "validation", "smallest_within")
        if criterion not in criteria:
            raise ValueError(f"criterion must be one of {criteria}, not {criterion!r}")
        if not (isinstance(tolerance, (int, float)) and tolerance >= 0):
            raise ValueError(f"tolerance must be a number >= 0, not {tolerance!r}")
        if tolerance and criterion != "smallest_within":
            raise ValueError(f"tolerance applies to criterion='smallest_within', not {criterion!r}")
        if criterion == "fpe":
            if metric is not None:
                raise ValueError("criterion='fpe' takes no metric")
            return "generalization.fpe"
        key = metric or "metrics.val_loss"
        if "." not in key:
            key = f"metrics.{key}"
        if "test" in key:
            raise ValueError(
                f"refusing to select on {key!r}: choosing the round on the test set biases its "
                "test error; select on a validation metric or on FPE"
            )
        return key

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
