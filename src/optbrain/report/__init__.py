"""Reports of pruning runs: text and markdown tables, PNG figures, ``report.md``.

A *run directory* (what ``optbrain demo`` and ``optbrain prune`` write) holds one history per
method at ``<name>/history.json`` (or a single ``history.json`` at its top), the pruned models next
to them, ``run.json`` (title, notes and table layout of the report) and the report itself:
``report.md`` and its PNGs. :func:`regenerate` rebuilds the report from the histories alone.

Nothing here prints; matplotlib is imported only when figures are drawn.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import OptbrainError
from ..history import History
from ..jsonio import write_text
from .tables import (
    DEFAULT_COLUMNS,
    FPE,
    has_fpe,
    history_table,
    label,
    largest_compression,
    markdown_table,
    model_selection_lines,
    predicts_objective,
    primary_metric,
    selection_lines,
    selection_metric,
)

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_COLUMNS",
    "HISTORY",
    "REPORT",
    "RUN_META",
    "NoHistoryError",
    "Run",
    "default_columns",
    "history_table",
    "largest_compression",
    "load_run",
    "markdown_table",
    "model_selection_lines",
    "plot_histories",
    "regenerate",
    "selection_lines",
    "selection_metric",
    "write_report",
]

HISTORY = "history.json"
REPORT = "report.md"
RUN_META = "run.json"
_META_FORMAT = "optbrain-run-1"


class NoHistoryError(OptbrainError, FileNotFoundError):
    """A run directory holds no pruning history to report on."""


def plot_histories(histories, out_dir, metric=None) -> list[Path]:
    """See :func:`optbrain.report.figures.plot_histories` (imported lazily)."""
    from .figures import plot_histories as _plot

    return _plot(histories, out_dir, metric)


def default_columns(histories: Mapping[str, History]) -> dict[str, list[str]]:
    """Round, sparsity, remaining parameters, then per history: the primary metric (and its loss
    when it is an accuracy), the predicted increase (only for methods whose saliency estimates
    the objective) and the actual increase."""
    metric = primary_metric(histories)
    cols: dict[str, list[str]] = {}
    for name, h in histories.items():
        keys = ["round", "sparsity", "remaining_params"]
        if metric is not None:
            keys.append(metric)
            if metric.endswith("_accuracy"):
                loss = metric.replace("_accuracy", "_loss")
                if h.records and loss.split(".", 1)[1] in h.records[0].metrics:
                    keys.append(loss)
        if predicts_objective(h):
            keys.append("predicted_increase")
        keys.append("actual_increase")
        if has_fpe(h):
            keys += [FPE, "generalization.n_eff"]
        cols[name] = keys
    return cols


# ------------------------------------------------------------------------------ report.md
def _files_section(run_dir: Path, names: Sequence[str]) -> list[str]:
    lines = []
    for name in names:
        folder = run_dir / name if name else run_dir
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue
            if path.suffix not in (".json", ".pt") or path.name == RUN_META:
                continue
            rel = path.relative_to(run_dir).as_posix()
            what = {
                HISTORY: "round-by-round history (`optbrain.history.History.load`)",
                "checkpoint.pt": "per-round checkpoint (resume)",
                "model.pt": "the pruned model after the last round "
                "(`optbrain.masking.load_pruned(model, path)`)",
                "model_selected.pt": "the pruned model of the selected round (see above; "
                "`optbrain.masking.load_pruned(model, path)`)",
            }.get(path.name, "")
            lines.append(f"- `{rel}`" + (f": {what}" if what else ""))
    return lines


def _selection_section(histories: dict[str, History], metric, tolerance: float) -> list[str]:
    """Early stops, the rounds model selection picks and the largest compression in tolerance."""
    lines: list[str] = []
    for name, h in histories.items():
        if h.stopped:
            lines += [f"{label(name) or 'The run'} stopped early: {h.stopped}.", ""]
    chosen = model_selection_lines(histories, markdown=True)
    if chosen:
        lines += ["Model selection (training-data FPE, or the validation set; never the test set):"]
        lines += ["", *chosen, ""]
    sel = selection_lines(histories, metric, tolerance, markdown=True)
    if sel:
        on_val = (metric or selection_metric(histories) or "").startswith("metrics.val_")
        lines += [sel[0], "", *sel[1:]]
        lines += [
            "",
            "(The round is chosen on the validation set; its test value is not biased by the "
            "choice.)"
            if on_val
            else "(A description of the run, not model selection: chosen on the reported metric, "
            "the chosen round's value is optimistically biased.)",
            "",
        ]
    return lines


def _figures_section(run_dir: Path, figures) -> list[str]:
    if not figures:
        return []
    lines = ["## Figures", ""]
    for fig in figures:
        p = Path(fig)
        rel = Path(os.path.relpath(p.resolve(), run_dir.resolve())).as_posix()
        lines += [f"![{p.stem.replace('_', ' ')}]({rel})", ""]
    return lines


def write_report(
    run_dir: str | Path,
    histories: Mapping[str, History] | History,
    title: str = "Pruning report",
    notes: Sequence[str] | str = (),
    *,
    columns: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    metric: str | None = None,
    tolerance: float = 0.01,
    figures: Sequence[str | Path] | None = None,
) -> Path:
    """Write ``run_dir/report.md`` (and its PNGs) and ``run_dir/run.json``; return the report path.

    The report has the title, the ``notes`` (markdown paragraphs), the round table
    (:func:`markdown_table` with ``columns``, default :func:`default_columns`), for each history
    the largest compression whose ``metric`` stays within ``tolerance`` of the unpruned model's,
    the figures (``figures=None`` draws them with :func:`plot_histories`; without matplotlib the
    report says so) and the files of the run. ``run.json`` keeps title, notes and layout, so that
    :func:`regenerate` can rebuild the same report from the histories.
    """
    run_dir = Path(run_dir)
    if isinstance(histories, History):
        histories = {"": histories}
    histories = dict(histories)
    if not histories:
        raise ValueError("no histories to report")
    notes = [notes] if isinstance(notes, str) else list(notes)
    cols = columns if columns is not None else default_columns(histories)
    run_dir.mkdir(parents=True, exist_ok=True)
    if figures is None:
        try:
            figures = plot_histories(histories, run_dir, metric)
        except ImportError as exc:
            log.warning("%s; the report has no figures", exc)
            notes.append(f"*No figures: {exc}.*")
            figures = []
    lines = [f"# {title}", ""]
    for note in notes:
        lines += [note, ""]
    lines += ["## Rounds", "", markdown_table(histories, cols), ""]
    lines += [
        "Round 0 is the unpruned model. *sparsity*: fraction of the prunable weights deleted; "
        "*params*: parameters left in the whole model. Metrics are after retraining. "
        "*ΔE*: increase of the objective (the loss on the pruning data) caused by the "
        "round's deletion, before retraining; *predicted*: the sum of the deleted saliencies "
        "(shown for methods whose saliency estimates that increase).",
        "",
    ]
    lines += _selection_section(histories, metric, tolerance)
    lines += _figures_section(run_dir, figures)
    files = _files_section(run_dir, list(histories))
    if files:
        lines += ["## Files", "", *files, ""]
    path = run_dir / REPORT
    write_text(path, "\n".join(lines))
    meta: dict[str, Any] = {
        "format": _META_FORMAT,
        "title": title,
        "notes": [n for n in notes if not n.startswith("*No figures")],
        "histories": list(histories),
        "columns": cols if isinstance(cols, Mapping) else list(cols),
        "metric": metric,
        "tolerance": tolerance,
    }
    write_text(run_dir / RUN_META, json.dumps(meta, indent=1))
    return path


# ------------------------------------------------------------------------------ run dirs
class Run:
    """What a run directory holds: its histories (in report order) and the report's meta data."""

    def __init__(self, run_dir: Path, histories: dict[str, History], meta: dict[str, Any]):
        self.run_dir = run_dir
        self.histories = histories
        self.meta = meta

    @property
    def title(self) -> str:
        return self.meta.get("title") or f"Pruning report: {self.run_dir.name}"

    @property
    def notes(self) -> list[str]:
        return list(self.meta.get("notes") or [])

    def __repr__(self) -> str:
        return f"Run({str(self.run_dir)!r}, histories={list(self.histories)})"


def load_run(run_dir: str | Path) -> Run:
    """Read the histories (``history.json`` and ``*/history.json``) and ``run.json`` of a run
    directory. Raises :class:`NoHistoryError` when there is no history, ``ValueError`` when one
    is corrupt."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NoHistoryError(f"{run_dir} is not a directory")
    found: dict[str, Path] = {}
    if (run_dir / HISTORY).is_file():
        found[""] = run_dir / HISTORY
    for path in sorted(run_dir.glob(f"*/{HISTORY}")):
        found[path.parent.name] = path
    if not found and (run_dir / "result.json").is_file():
        raise NoHistoryError(
            f"{run_dir} is an experiment run (it has result.json, no {HISTORY}); its report.md "
            "is written by `optbrain reproduce` (or optbrain.experiments.Result.load(dir).save())"
        )
    if not found:
        raise NoHistoryError(
            f"{run_dir} holds no pruning history (looked for {HISTORY} and */{HISTORY}); "
            "`optbrain demo` and `optbrain prune` write run directories that have one"
        )
    meta: dict[str, Any] = {}
    meta_path = run_dir / RUN_META
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            log.warning("ignoring unreadable %s: %s", meta_path, exc)
        if not isinstance(meta, dict):
            meta = {}
    order = [n for n in meta.get("histories", []) if n in found]
    order += [n for n in found if n not in order]
    histories = {}
    for name in order:
        try:
            histories[name] = History.load(found[name])
        except ValueError as exc:
            raise ValueError(f"cannot read the history {found[name]}: {exc}") from exc
    return Run(run_dir, histories, meta)


def regenerate(run_dir: str | Path) -> Path:
    """Rebuild ``report.md`` and its PNGs in ``run_dir`` from its histories; return the report
    path. Title, notes and table layout come from ``run.json`` when it is there."""
    run = load_run(run_dir)
    columns = run.meta.get("columns")
    if isinstance(columns, Mapping):
        columns = {n: c for n, c in columns.items() if n in run.histories} or None
    return write_report(
        run.run_dir,
        run.histories,
        run.title,
        run.notes,
        columns=columns,
        metric=run.meta.get("metric"),
        tolerance=float(run.meta.get("tolerance", 0.01)),
    )
