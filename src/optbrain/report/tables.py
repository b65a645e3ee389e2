"""Tables of pruning histories: fixed-width text for terminals, pipe tables for markdown.

Several histories (one per method) share one table: rows are rounds, and the columns that describe
the mask (round, sparsity, remaining parameters) are shown once when every history agrees on them
— as it does when the methods ran the same schedule on the same model — and per history otherwise.
Column keys are what :meth:`optbrain.history.History.column` accepts: a
:class:`~optbrain.history.RoundRecord` field (``"sparsity"``, ``"actual_increase"``) or a metric
(``"metrics.test_accuracy"``: after retraining; ``"metrics_pruned.test_accuracy"``: right after the
deletion, before retraining).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..history import History, RoundRecord

__all__ = [
    "DEFAULT_COLUMNS",
    "SHARED_KEYS",
    "Selection",
    "history_table",
    "label",
    "largest_compression",
    "markdown_table",
    "primary_metric",
    "selection_metric",
    "predicts_objective",
    "has_fpe",
    "model_selection_lines",
    "selection_lines",
]

#: record fields that describe the mask rather than the method: shown once when histories agree
SHARED_KEYS = ("round", "target", "sparsity", "remaining", "total", "remaining_params")

#: fields that mean nothing for round 0 (the unpruned model): shown as "-" there
_PRUNING_KEYS = ("predicted_increase", "actual_increase", "objective_pruned", "seconds")

DEFAULT_COLUMNS = (
    "round",
    "sparsity",
    "remaining_params",
    "metrics.test_accuracy",
    "metrics.test_loss",
    "predicted_increase",
    "actual_increase",
)

#: methods whose saliency estimates the increase of the objective (so "predicted" has its units)
OBJECTIVE_METHODS = frozenset({"obd", "obs", "ocd", "gobd", "ebd", "esp"})

_LABELS = {"obd": "OBD", "obs": "OBS", "ocd": "OCD", "snip": "SNIP"}

_FIELDS: dict[str, tuple[str, str]] = {  # key -> (column label, kind)
    "round": ("round", "int"),
    "target": ("target", "pct1"),
    "sparsity": ("sparsity", "pct1"),
    "remaining": ("kept", "count"),
    "total": ("prunable", "count"),
    "remaining_params": ("params", "count"),
    "predicted_increase": ("dE pred", "float"),
    "actual_increase": ("dE actual", "float"),
    "objective_before": ("E before", "float"),
    "objective_pruned": ("E pruned", "float"),
    "seconds": ("seconds", "sec"),
}

_MD_LABELS = {"predicted_increase": "ΔE predicted", "actual_increase": "ΔE actual"}

#: columns recorded by ``iterative_prune(estimate_fpe=...)`` (RoundRecord.generalization)
FPE = "generalization.fpe"
_GENERALIZATION_LABELS = {
    FPE: "FPE",
    "generalization.n_eff": "N_eff",
    "generalization.train_error": "train E",
}


def label(name: str) -> str:
    """Display name of a history (``"obd"`` -> ``"OBD"``; others unchanged)."""
    return _LABELS.get(name, name)


def predicts_objective(history: History) -> bool:
    """Whether the history's ``predicted_increase`` estimates the objective increase (OBD-like
    saliencies) rather than a score in other units (magnitude, random, SNIP).

    Read from ``config["predicts_objective"]`` when present, else from ``config["method"]``.
    """
    flag = history.config.get("predicts_objective")
    if flag is not None:
        return bool(flag)
    return str(history.config.get("method", "")).lower() in OBJECTIVE_METHODS


def primary_metric(histories: Mapping[str, History]) -> str | None:
    """The metric a summary should use: the first of test, validation, training accuracy, then
    loss, that every history has in round 0 (``None`` if there is none)."""
    for key in (
        "test_accuracy",
        "val_accuracy",
        "train_accuracy",
        "test_loss",
        "val_loss",
        "train_loss",
    ):
        if histories and all(h.records and key in h.records[0].metrics for h in histories.values()):
            return f"metrics.{key}"
    return None


# ------------------------------------------------------------------------------ columns
def _kind(key: str) -> str:
    if key in _FIELDS:
        return _FIELDS[key][1]
    if "accuracy" in key:
        return "pct2"
    return "float"


def _column_label(key: str, markdown: bool = False) -> str:
    if markdown and key in _MD_LABELS:
        return _MD_LABELS[key]
    if key in _GENERALIZATION_LABELS:
        return _GENERALIZATION_LABELS[key]
    if key in _FIELDS:
        return _FIELDS[key][0]
    group, _, name = key.partition(".")
    if not name:
        return key.replace("_", " ")
    text = name.replace("accuracy", "acc").replace("_", " ")
    return f"{text} (del)" if group == "metrics_pruned" else text


def _value(record: RoundRecord, key: str) -> Any:
    if "." in key:
        group, name = key.split(".", 1)
        return getattr(record, group).get(name, math.nan)
    return getattr(record, key)


def _blank(record: RoundRecord, key: str) -> bool:
    """Round 0 has no deletion: its increases and pre-retraining metrics are not shown."""
    return record.round == 0 and (key in _PRUNING_KEYS or key.startswith("metrics_pruned."))


def _fmt(value: Any, kind: str, markdown: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "-"
    try:
        if kind == "int":
            return str(int(value))
        if kind == "count":
            return f"{int(value):,}"
        if kind == "pct1":
            return f"{100 * value:.1f}%"
        if kind == "pct2":
            return f"{100 * value:.2f}%"
        if kind == "sec":
            return f"{value:.1f}"
        if isinstance(value, (int, float)):
            if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
                return f"{value:.2e}"
            return f"{value:.4f}" if abs(value) < 10 else f"{value:.4g}"
    except (TypeError, ValueError):
        pass
    return str(value)


@dataclass
class _Layout:
    shared: list[str]  # keys shown once
    groups: list[tuple[str, list[str]]]  # (history name, its keys)
    rounds: list[int]
    by_round: dict[str, dict[int, RoundRecord]]
    first: dict[int, RoundRecord]  # a record of each round, for the shared keys


def _layout(
    histories: Mapping[str, History] | History,
    columns: Sequence[str] | Mapping[str, Sequence[str]],
) -> tuple[dict[str, History], _Layout]:
    if isinstance(histories, History):
        histories = {"": histories}
    histories = dict(histories)
    if not histories:
        raise ValueError("no histories to tabulate")
    if isinstance(columns, str):
        raise TypeError("columns must be a sequence of keys (or a mapping name -> keys), not a str")
    if isinstance(columns, Mapping):
        unknown = [n for n in columns if n not in histories]
        if unknown:
            raise KeyError(f"columns given for unknown histories {unknown}; have {list(histories)}")
        per = {n: list(columns.get(n, DEFAULT_COLUMNS)) for n in histories}
    else:
        per = {n: list(columns) for n in histories}
    by_round = {n: {r.round: r for r in h.records} for n, h in histories.items()}
    rounds = sorted({r for recs in by_round.values() for r in recs})
    wanted_shared = [k for k in dict.fromkeys(k for cols in per.values() for k in cols)]
    wanted_shared = [k for k in wanted_shared if k in SHARED_KEYS]

    def agree(key: str) -> bool:
        for r in rounds:
            vals = {repr(_value(recs[r], key)) for recs in by_round.values() if r in recs}
            if len(vals) > 1:
                return False
        return True

    same_rounds = len({tuple(sorted(recs)) for recs in by_round.values()}) == 1
    shared = ["round"] + [k for k in wanted_shared if k != "round" and same_rounds and agree(k)]
    groups = [(n, [k for k in cols if k not in shared]) for n, cols in per.items()]
    first: dict[int, RoundRecord] = {}
    for recs in by_round.values():
        for r, rec in recs.items():
            first.setdefault(r, rec)
    return histories, _Layout(shared, groups, rounds, by_round, first)


def _cell(layout: _Layout, name: str | None, r: int, key: str, markdown: bool = False) -> str:
    rec = layout.first.get(r) if name is None else layout.by_round[name].get(r)
    if rec is None or _blank(rec, key):
        return "-"
    return _fmt(_value(rec, key), _kind(key), markdown)


# ------------------------------------------------------------------------------ tables
def history_table(
    histories: Mapping[str, History] | History,
    columns: Sequence[str] | Mapping[str, Sequence[str]] = DEFAULT_COLUMNS,
) -> str:
    """A fixed-width text table, one row per round.

    ``histories`` maps a name (a group header, e.g. the method) to its :class:`History`; a single
    History makes a table without group headers. ``columns`` are keys as
    :meth:`History.column` takes them, for every history, or a mapping name -> keys to give each
    history its own (e.g. the predicted increase only for methods that predict the objective).
    Missing values are shown as ``-``.
    """
    histories, lay = _layout(histories, columns)
    sep, gap = " ", "  "
    shared_w = [
        max(len(_column_label(k)), *(len(_cell(lay, None, r, k)) for r in lay.rounds))
        for k in lay.shared
    ]
    group_w = [
        [max(len(_column_label(k)), *(len(_cell(lay, n, r, k)) for r in lay.rounds)) for k in keys]
        for n, keys in lay.groups
    ]
    named = any(n for n, _ in lay.groups)
    # widen a group's first column if its name is wider than the whole group
    for (n, keys), widths in zip(lay.groups, group_w):
        need = len(label(n)) + 2 - (sum(widths) + len(sep) * (len(widths) - 1))
        if keys and need > 0:
            widths[0] += need

    def line(shared_cells: list[str], group_cells: list[list[str]]) -> str:
        parts = [sep.join(c.rjust(w) for c, w in zip(shared_cells, shared_w))]
        for cells, widths in zip(group_cells, group_w):
            if widths:
                parts.append(sep.join(c.rjust(w) for c, w in zip(cells, widths)))
        return gap.join(p for p in parts if p).rstrip()

    lines: list[str] = []
    if named:
        head = [" " * (sum(shared_w) + len(sep) * (len(shared_w) - 1))]
        for (n, _keys), widths in zip(lay.groups, group_w):
            if widths:
                span = sum(widths) + len(sep) * (len(widths) - 1)
                head.append(f" {label(n)} ".center(span, "-"))
        lines.append(gap.join(head).rstrip())
    header = line(
        [_column_label(k) for k in lay.shared],
        [[_column_label(k) for k in keys] for _, keys in lay.groups],
    )
    lines += [header, "-" * len(header)]
    for r in lay.rounds:
        lines.append(
            line(
                [_cell(lay, None, r, k) for k in lay.shared],
                [[_cell(lay, n, r, k) for k in keys] for n, keys in lay.groups],
            )
        )
    lines.append("-" * len(header))
    return "\n".join(lines)


def markdown_table(
    histories: Mapping[str, History] | History,
    columns: Sequence[str] | Mapping[str, Sequence[str]] = DEFAULT_COLUMNS,
) -> str:
    """The same table as :func:`history_table` as a GitHub-flavoured markdown pipe table; each
    per-history column is headed ``"<name> <column>"``."""
    histories, lay = _layout(histories, columns)
    heads = [_column_label(k, markdown=True) for k in lay.shared]
    for n, keys in lay.groups:
        prefix = f"{label(n)} " if n else ""
        heads += [prefix + _column_label(k, markdown=True) for k in keys]
    rows = ["| " + " | ".join(heads) + " |", "|" + "---:|" * len(heads)]
    for r in lay.rounds:
        cells = [_cell(lay, None, r, k, markdown=True) for k in lay.shared]
        for n, keys in lay.groups:
            cells += [_cell(lay, n, r, k, markdown=True) for k in keys]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------ summaries
@dataclass
class Selection:
    """The round of a history with the fewest remaining parameters whose metric stays within
    ``tolerance`` of the unpruned model's (round 0)."""

    name: str
    metric: str
    tolerance: float
    baseline: float
    record: RoundRecord
    total_params: int  # parameters of the unpruned model

    @property
    def value(self) -> float:
        return float(_value(self.record, self.metric))

    @property
    def compression(self) -> float:
        """Parameters of the unpruned model / parameters left."""
        return self.total_params / max(self.record.remaining_params, 1)


def largest_compression(
    history: History,
    metric: str = "metrics.test_accuracy",
    tolerance: float = 0.01,
    name: str = "",
) -> Selection | None:
    """The most compressed round whose ``metric`` is at most ``tolerance`` worse than round 0's
    (higher is better for accuracies, lower for losses); ``None`` without a round-0 value.

    This is a description of the run, not model selection: picked on the test set, the chosen
    round's test metric is optimistically biased.
    """
    if not history.records or history.records[0].round != 0:
        return None
    base = _value(history.records[0], metric)
    if not isinstance(base, (int, float)) or math.isnan(base):
        return None
    higher = "accuracy" in metric
    best: RoundRecord | None = None
    for rec in history.records:
        v = _value(rec, metric)
        if not isinstance(v, (int, float)) or math.isnan(v):
            continue
        ok = v >= base - tolerance if higher else v <= base + tolerance
        if ok and (best is None or rec.remaining_params < best.remaining_params):
            best = rec
    if best is None:  # pragma: no cover - round 0 always qualifies
        return None
    total = history.records[0].remaining_params
    return Selection(name, metric, tolerance, float(base), best, total)


def selection_metric(histories: Mapping[str, History]) -> str | None:
    """The metric the largest compression is chosen on: the validation accuracy when every
    history has one (choosing on the test set would bias the test value reported for the chosen
    round), else :func:`primary_metric`."""
    key = "val_accuracy"
    if histories and all(h.records and key in h.records[0].metrics for h in histories.values()):
        return f"metrics.{key}"
    return primary_metric(histories)


def _test_twin(sel: Selection) -> str:
    """``, test accuracy 91.00%`` for a round chosen on a validation metric ("" otherwise)."""
    split, _, what = sel.metric.split(".", 1)[1].partition("_")
    if split != "val":
        return ""
    v = sel.record.metrics.get(f"test_{what}")
    if not isinstance(v, (int, float)) or math.isnan(v):
        return ""
    return f", test {what.replace('_', ' ')} {_fmt(v, 'pct2' if 'accuracy' in what else 'float')}"


def selection_lines(
    histories: Mapping[str, History],
    metric: str | None = None,
    tolerance: float = 0.01,
    markdown: bool = False,
) -> list[str]:
    """A heading line, then one line per history naming its largest compression within
    ``tolerance`` of the unpruned ``metric`` (default: :func:`selection_metric` if an accuracy:
    the validation accuracy where there is one, and then the chosen round's test accuracy is
    shown beside it); empty if there is none. ``markdown=True`` gives a sentence and a bullet
    list."""
    if metric is None:
        metric = selection_metric(histories)
        if metric is None or "accuracy" not in metric:
            return []  # a tolerance on a loss has no natural default
    pct = "accuracy" in metric
    sels = {n: largest_compression(h, metric, tolerance, n) for n, h in histories.items()}
    sels = {n: s for n, s in sels.items() if s is not None}
    if not sels:
        return []
    mname = metric.split(".", 1)[1].replace("_", " ")
    if pct:
        tol = f"{100 * tolerance:g} point{'' if tolerance == 0.01 else 's'}"
    else:
        tol = f"{tolerance:g}"
    bases = {round(s.baseline, 12) for s in sels.values()}
    base = next(iter(sels.values())).baseline
    base_text = f" ({_fmt(base, 'pct2' if pct else 'float')})" if len(bases) == 1 else ""
    head = f"largest compression within {tol} of the unpruned {mname}{base_text}:"
    lines = [head[0].upper() + head[1:] if markdown else head]
    width = max(len(label(n)) for n in sels)
    for n, s in sels.items():
        rec = s.record
        what = (
            "no pruned round qualifies"
            if rec.round == 0
            else f"round {rec.round}: {100 * rec.sparsity:.1f}% pruned, "
            f"{rec.remaining_params:,} params left ({s.compression:.1f}x smaller), "
            f"{mname} {_fmt(s.value, 'pct2' if pct else 'float')}{_test_twin(s)}"
        )
        name = label(n) or "run"
        lines.append(f"- **{name}**: {what}" if markdown else f"  {name:<{width}}  {what}")
    return lines


def has_fpe(history: History) -> bool:
    """Whether some round of ``history`` has a finite FPE (``estimate_fpe`` was on)."""
    return any(isinstance(v, (int, float)) and math.isfinite(v) for v in history.column(FPE))


def model_selection_lines(histories: Mapping[str, History], markdown: bool = False) -> list[str]:
    """One line per history that recorded FPE, naming the round FPE selects and (if it has a
    validation loss) the round the validation loss selects (:meth:`History.select`)."""
    lines = []
    for name, h in histories.items():
        if not has_fpe(h):
            continue
        picks = []
        for what, criterion in (("FPE", "fpe"), ("validation loss", "validation")):
            try:
                rec = h.select(criterion)
            except ValueError:
                continue
            picks.append(f"{what} selects round {rec.round} ({rec.remaining_params:,} params)")
        if picks:
            who = label(name) or "run"
            text = "; ".join(picks)
            lines.append(f"- **{who}**: {text}" if markdown else f"  {who}  {text}")
    return lines
