"""Figures of pruning histories (PNG), drawn on :class:`matplotlib.figure.Figure` objects directly.

No pyplot: nothing here touches matplotlib's global state (current figure, backend), so the
functions are safe in scripts, notebooks and threads alike. matplotlib is imported when a figure
is drawn, not when optbrain is imported (``pip install 'optbrain[plot]'``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from ..history import History
from .tables import FPE, has_fpe, label, predicts_objective, primary_metric

__all__ = ["ACCURACY_PNG", "GENERALIZATION_PNG", "INCREASE_PNG", "LOSS_PNG", "plot_histories"]

ACCURACY_PNG = "accuracy_vs_params.png"
LOSS_PNG = "loss_vs_params.png"
INCREASE_PNG = "objective_increase.png"
GENERALIZATION_PNG = "generalization_vs_params.png"

#: NNSYSID's pruning figure: (label, column candidates, marker)
_GENERALIZATION_CURVES = (
    ("training error", ("generalization.train_error", "metrics.train_loss"), "x"),
    ("FPE", (FPE,), "+"),
    ("validation error", ("metrics.val_loss",), "s"),
    ("test error", ("metrics.test_loss",), "o"),
)


def new_figure(width: float, height: float, **kwargs):
    """A :class:`matplotlib.figure.Figure` (no pyplot: no global state, no backend change);
    matplotlib is imported on first use."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plots need matplotlib; install it with `pip install 'optbrain[plot]'`"
        ) from exc
    return Figure(figsize=(width, height), layout="constrained", **kwargs)


def _finite(xs, ys):
    pts = [
        (x, y)
        for x, y in zip(xs, ys)
        if isinstance(x, (int, float))
        and isinstance(y, (int, float))
        and math.isfinite(x)
        and math.isfinite(y)
    ]
    return [p[0] for p in pts], [p[1] for p in pts]


def _metric_plot(histories: Mapping[str, History], metric: str, path: Path) -> Path:
    key = metric.split(".", 1)[1]
    accuracy = "accuracy" in key
    scale = 100.0 if accuracy else 1.0
    fig = new_figure(6.4, 4.2)
    ax = fig.add_subplot()
    for i, (name, h) in enumerate(histories.items()):
        color = f"C{i}"
        x, y = _finite(h.column("remaining_params"), h.column(metric))
        ax.plot(x, [scale * v for v in y], "o-", color=color, label=f"{label(name)}: retrained")
        # right after each deletion, before retraining (round 0 has none)
        recs = h.records[1:]
        xp, yp = _finite(
            [r.remaining_params for r in recs], [r.metrics_pruned.get(key, math.nan) for r in recs]
        )
        if xp:
            ax.plot(
                xp,
                [scale * v for v in yp],
                "x:",
                color=color,
                alpha=0.7,
                label=f"{label(name)}: before retraining",
            )
    first = next(iter(histories.values()))
    if first.records and key in first.records[0].metrics:
        base = scale * first.records[0].metrics[key]
        ax.axhline(base, color="0.5", lw=0.8, ls="--", label="unpruned")
        if accuracy:
            ax.axhline(base - 1.0, color="0.7", lw=0.8, ls=":", label="unpruned − 1 point")
    ax.set_xscale("log")
    _param_ticks(ax, [x for h in histories.values() for x in h.column("remaining_params")])
    ax.invert_xaxis()  # pruning proceeds to the right
    ax.set_xlabel("remaining parameters (log scale)")
    text = key.replace("_", " ")
    ax.set_ylabel(f"{text} (%)" if accuracy else text)
    if not accuracy:
        ax.set_yscale("log")
    ax.set_title(f"{text} vs remaining parameters")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax)
    fig.savefig(path, dpi=120)
    return path


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _compact(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.3g}M"
    if n >= 1e3:
        return f"{n / 1e3:.3g}k"
    return f"{n:.0f}"


def _param_ticks(ax, values) -> None:
    """Ticks at the rounds' parameter counts (thinned to at most 10), labelled 50.6k, 2.01k, ..."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ticks = sorted({float(v) for v in values if isinstance(v, (int, float)) and v > 0})
    if not ticks:
        return
    step = max(1, math.ceil(len(ticks) / 10))
    ticks = ticks[::-1][::step][::-1]  # keep the largest (the unpruned model)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _compact(v)))


def _increase_plot(histories: Mapping[str, History], path: Path) -> Path:
    predicting = {n: h for n, h in histories.items() if predicts_objective(h)}
    fig = new_figure(11.0 if predicting else 6.4, 4.2)
    axes = fig.subplots(1, 2 if predicting else 1, squeeze=False)[0]
    if predicting:
        ax = axes[0]
        lo, hi = math.inf, -math.inf
        for i, (name, h) in enumerate(histories.items()):
            if name not in predicting:
                continue
            recs = [
                r
                for r in h.records[1:]
                if r.predicted_increase > 0 and r.actual_increase > 0
                and math.isfinite(r.predicted_increase) and math.isfinite(r.actual_increase)
            ]  # fmt: skip
            if not recs:
                continue
            xs = [r.predicted_increase for r in recs]
            ys = [r.actual_increase for r in recs]
            lo, hi = min(lo, *xs, *ys), max(hi, *xs, *ys)
            ax.plot(xs, ys, "o", color=f"C{i}", label=label(name))
            for r, x, y in zip(recs, xs, ys):
                ax.annotate(str(r.round), (x, y), textcoords="offset points", xytext=(4, 3),
                            fontsize="x-small")  # fmt: skip
        if lo < hi:
            ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls="--", label="actual = predicted")
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel("predicted increase (sum of deleted saliencies)")
        ax.set_ylabel("actual increase of the objective")
        ax.set_title("objective increase per round: predicted vs actual")
        ax.grid(True, which="both", alpha=0.3)
        _legend(ax)
    ax = axes[-1]
    any_positive = False
    for i, (name, h) in enumerate(histories.items()):
        recs = [r for r in h.records[1:] if math.isfinite(r.actual_increase)]
        if not recs:
            continue
        ys = [r.actual_increase for r in recs]
        any_positive = any_positive or any(y > 0 for y in ys)
        ax.plot([r.round for r in recs], ys, "o-", color=f"C{i}", label=f"{label(name)} actual")
        if name in predicting:
            ax.plot(
                [r.round for r in recs],
                [r.predicted_increase for r in recs],
                "x--",
                color=f"C{i}",
                alpha=0.7,
                label=f"{label(name)} predicted",
            )
    if any_positive:
        ax.set_yscale("symlog", linthresh=_linthresh(histories))
    ax.set_xlabel("round")
    ax.set_ylabel("objective increase caused by the deletion")
    ax.set_title("objective increase per round (before retraining)")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax)
    fig.savefig(path, dpi=120)
    return path


def _linthresh(histories: Mapping[str, History]) -> float:
    vals = [
        abs(v)
        for h in histories.values()
        for r in h.records[1:]
        for v in (r.actual_increase, r.predicted_increase if predicts_objective(h) else 0.0)
        if math.isfinite(v) and v != 0
    ]
    return min(vals) if vals else 1e-6


def _generalization_plot(histories: Mapping[str, History], path: Path) -> Path:
    """NNSYSID's figure, one panel per history that recorded FPE: training error, FPE,
    validation and test error against the remaining parameters; dotted lines mark the rounds
    FPE and the validation error select."""
    shown = {n: h for n, h in histories.items() if has_fpe(h)}
    fig = new_figure(6.4 * len(shown), 4.2)
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    for ax, (name, h) in zip(axes, shown.items()):
        for i, (text, keys, marker) in enumerate(_GENERALIZATION_CURVES):
            for key in keys:
                x, y = _finite(h.column("remaining_params"), h.column(key))
                if x:
                    ax.plot(x, y, f"{marker}-", color=f"C{i}", label=text, ms=5, lw=0.8)
                    break
        for criterion, color in (("fpe", "C1"), ("validation", "C2")):
            try:
                rec = h.select(criterion)
            except ValueError:
                continue
            ax.axvline(
                rec.remaining_params, color=color, ls=":", lw=1.0, label=f"{criterion} selects"
            )
        ax.set_xlabel("remaining parameters")
        ax.set_ylabel("error (the loss's units)")
        ax.set_yscale("log")
        ax.set_title(f"{label(name) or 'run'}: training, FPE, validation and test error")
        ax.grid(True, which="both", alpha=0.3)
        _legend(ax)
    fig.savefig(path, dpi=120)
    return path


def plot_histories(
    histories: Mapping[str, History] | History,
    out_dir: str | Path,
    metric: str | None = None,
) -> list[Path]:
    """Draw the run's figures into ``out_dir`` and return their paths.

    * ``accuracy_vs_params.png`` (``loss_vs_params.png`` for a run without accuracies): the
      ``metric`` (default: test, else validation, else training accuracy, else loss) against the
      remaining parameters on a log axis, after retraining and right after each deletion;
    * ``objective_increase.png``: the objective increase each deletion caused, against the
      increase the saliencies predicted (for methods whose saliency estimates it: OBD-like), and
      per round for every method;
    * ``generalization_vs_params.png`` for runs that recorded FPE (``estimate_fpe``): training
      error, FPE, validation and test error against the remaining parameters (NNSYSID's figure).
    """
    if isinstance(histories, History):
        histories = {"": histories}
    if not histories:
        raise ValueError("no histories to plot")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    metric = metric or primary_metric(histories)
    if metric is not None:
        name = ACCURACY_PNG if "accuracy" in metric else LOSS_PNG
        paths.append(_metric_plot(histories, metric, out / name))
    paths.append(_increase_plot(histories, out / INCREASE_PNG))
    if any(has_fpe(h) for h in histories.values()):
        paths.append(_generalization_plot(histories, out / GENERALIZATION_PNG))
    return paths
