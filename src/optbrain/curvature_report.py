"""``optbrain curvature``: train a digits MLP, then compare the diagonal curvature estimators on it.

The demo trains the 64-300-100-10 tanh MLP on the scikit-learn digits, builds a
:class:`~optbrain.problem.Problem` on the training split and runs each diagonal estimator of
:mod:`optbrain.curvature` on it. For every estimator it reports

* its run time as a multiple of one full gradient pass (forward + backward over the same data,
  measured in the same run right before and after each estimator, median of a few repeats);
* the Optimal Brain Damage saliency Σ ½ h_kk w_k² summed per layer (the predicted increase of the
  training loss if the whole layer were zeroed, to second order without cross terms);
* Spearman rank correlations against the exact Gauss–Newton diagonal (:class:`GGNDiagonal`): of the
  diagonal itself and of the OBD saliencies it implies (the ranking that decides what is pruned).

``run(...)`` returns a :class:`CurvatureReport`; it prints nothing (progress bars, when asked for,
go to stderr through tqdm).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from . import distributed
from .paramdict import ParamDict
from .problem import Problem
from .report.progress import Bars

log = logging.getLogger(__name__)

__all__ = [
    "ReportEstimator",
    "CurvatureReport",
    "EstimatorRow",
    "default_estimators",
    "run",
    "spearman",
]

Progress = Callable[[int, int], None]

#: label of the estimator every other one is compared with
REFERENCE = "GGN (exact)"


@dataclass
class ReportEstimator:
    """One estimator of the demo: a table label, the estimator, and optionally the parameters it
    is restricted to (for estimators too costly to run on all 50,610 parameters)."""

    label: str
    estimator: Any
    params: Sequence[str] | None = None
    note: str = ""


@dataclass
class EstimatorRow:
    """One row of the demo table."""

    label: str
    estimator: str
    seconds: float
    ratio: float  # seconds / one gradient pass
    n_params: int
    layer_saliency: dict[str, float | None]
    spearman_diag: float | None
    spearman_saliency: float | None
    min_diag: float
    note: str = ""
    engine: str = ""  # the engine the estimator took and why (optbrain.curvature.paths)


@dataclass
class CurvatureReport:
    """Everything the demo measured; ``table`` is the formatted report (``str(result)``)."""

    model: str
    n_params: int
    n_train: int
    n_test: int
    epochs: int
    train_seconds: float
    train_accuracy: float
    test_accuracy: float
    gradient_seconds: float
    layers: list[str]
    rows: list[EstimatorRow]
    total_seconds: float = 0.0
    table: str = field(default="", repr=False)

    def __str__(self) -> str:
        return self.table

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, directory: str | Path) -> list[Path]:
        """Write ``curvature.txt`` (the table) and ``curvature.json`` (all numbers) into
        ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        txt, js = out / "curvature.txt", out / "curvature.json"
        txt.write_text(self.table + "\n", encoding="utf-8")
        data = self.to_dict()
        data.pop("table")
        js.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n", encoding="utf-8")
        return [txt, js]


# ------------------------------------------------------------------------------ statistics
def _ranks(x: Tensor) -> Tensor:
    """Ranks 0..n-1 of ``x`` (float64), ties given their average rank."""
    x = x.reshape(-1)
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    _, counts = torch.unique_consecutive(sorted_x, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    avg = ends - (counts.to(torch.float64) + 1) / 2  # mean of the 0-based positions in each group
    ranks = torch.empty(x.numel(), dtype=torch.float64)
    ranks[order] = torch.repeat_interleave(avg, counts)
    return ranks


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two equally long tensors (ties get average ranks).

    Returns NaN when either input is constant.
    """
    a, b = a.detach().reshape(-1).cpu(), b.detach().reshape(-1).cpu()
    if a.numel() != b.numel():
        raise ValueError(f"spearman needs equally long inputs, got {a.numel()} and {b.numel()}")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum()) / denom if denom > 0 else math.nan


# ------------------------------------------------------------------------------ estimators
def default_estimators(seed: int = 0, hutchinson_samples: int = 500) -> list[ReportEstimator]:
    """The demo's estimators, the reference (:class:`GGNDiagonal`) first."""
    from .curvature import (
        EmpiricalFisherDiagonal,
        ExactHessianDiagonal,
        GGNDiagonal,
        HutchinsonDiagonal,
        LeCunDiagonal,
        MCFisherDiagonal,
    )

    return [
        ReportEstimator(REFERENCE, GGNDiagonal()),
        ReportEstimator("LeCun (Gauss-Newton)", LeCunDiagonal(gauss_newton=True)),
        ReportEstimator("LeCun (full)", LeCunDiagonal(gauss_newton=False)),
        ReportEstimator("Hessian (exact)", ExactHessianDiagonal()),
        ReportEstimator("Empirical Fisher", EmpiricalFisherDiagonal()),
        ReportEstimator("MC Fisher (1 sample)", MCFisherDiagonal(samples=1, seed=seed)),
        ReportEstimator(
            f"Hutchinson ({hutchinson_samples})",
            HutchinsonDiagonal(samples=hutchinson_samples, seed=seed),
        ),
    ]


# ------------------------------------------------------------------------------ progress
_Bars = Bars  # the progress bars live in optbrain.report.progress


@contextmanager
def _progress_attached(estimator: Any, progress: Progress | None) -> Iterator[None]:
    """Temporarily point ``estimator.progress`` at ``progress`` (restored afterwards)."""
    if progress is None or not hasattr(estimator, "progress"):
        yield
        return
    old = estimator.progress
    estimator.progress = progress
    try:
        yield
    finally:
        estimator.progress = old


# ------------------------------------------------------------------------------ measurements
def _gradient_pass(problem: Problem, params: list[nn.Parameter]) -> None:
    grads = None
    for x, y in problem.batches():
        g = torch.autograd.grad(problem.batch_objective(problem.model(x), y), params)
        grads = g if grads is None else [a + b for a, b in zip(grads, g)]


def _time_gradient(problem: Problem, repeats: int) -> list[float]:
    """Wall times of ``repeats`` gradient passes (forward + backward over all of the data)."""
    params = list(problem.parameters().values())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _gradient_pass(problem, params)
        times.append(time.perf_counter() - t0)
    return times


def _layer_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _obd(diag: ParamDict, weights: dict[str, Tensor]) -> ParamDict:
    return {
        k: 0.5 * h.detach().to(torch.float64) * weights[k].detach().to(torch.float64) ** 2
        for k, h in diag.items()
    }


def _flat(d: ParamDict, names: Sequence[str]) -> Tensor:
    return torch.cat([d[n].detach().reshape(-1).to(torch.float64) for n in names])


def _trained(epochs: int, seed: int, bars, loss_fn):
    """The digits MLP trained for ``epochs`` epochs: (data, model, seconds, train and test
    evaluation)."""
    from .data import load_digits_split, loaders
    from .models import digits_mlp
    from .train import evaluate, train

    data = load_digits_split(seed=seed)
    train_loader, test_loader = loaders(data, batch_size=64, shuffle=True, seed=seed)
    model = digits_mlp((300, 100), "tanh", seed=seed)
    t0 = time.perf_counter()
    with bars.stage("training") as cb:
        train(model, train_loader, loss_fn, epochs=epochs, lr=1e-3, seed=seed, progress=cb)
    seconds = time.perf_counter() - t0
    train_eval = evaluate(
        model, DataLoader(TensorDataset(data.x_train, data.y_train), 512), loss_fn
    )
    test_eval = evaluate(model, test_loader, loss_fn)
    log.info("trained in %.2f s: test accuracy %.4f", seconds, test_eval["accuracy"])
    return data, model, seconds, train_eval, test_eval


def _timed(entry, sub: Problem, problem: Problem, repeats: int, bars):
    """An estimator's diagonal on ``sub``, its seconds, and the gradient-pass times around it
    (timed right before and after, so that a machine whose load changes during the demo still
    gives fair ratios)."""
    local = _time_gradient(problem, repeats)
    with bars.stage(entry.label) as cb, _progress_attached(entry.estimator, cb):
        t0 = time.perf_counter()
        diag = entry.estimator.diagonal(sub)
        seconds = time.perf_counter() - t0
    local += _time_gradient(problem, repeats)
    log.info("%s: %.3f s (gradient pass %.4f s)", entry.label, seconds, statistics.median(local))
    return diag, seconds, local


def _row(entry, diag: ParamDict, reference: ParamDict, weights, layers, is_ref) -> EstimatorRow:
    """An estimator's row (time fields 0): OBD saliency per layer, rank agreement with the
    reference estimator, smallest diagonal entry."""
    names = list(weights)
    covered = [n for n in names if n in diag]
    sal = _obd(diag, weights)
    ref_sal = _obd({n: reference[n] for n in covered}, weights)
    by_layer: dict[str, float | None] = {}
    for layer in layers:
        members = [n for n in names if _layer_of(n) == layer]
        ok = all(n in diag for n in members)
        by_layer[layer] = float(sum(float(sal[n].sum()) for n in members)) if ok else None
    return EstimatorRow(
        label=entry.label,
        estimator=repr(entry.estimator),
        seconds=0.0,
        ratio=0.0,
        n_params=sum(diag[n].numel() for n in covered),
        layer_saliency=by_layer,
        spearman_diag=None if is_ref else spearman(_flat(diag, covered), _flat(reference, covered)),
        spearman_saliency=None
        if is_ref
        else spearman(_flat(sal, covered), _flat(ref_sal, covered)),
        min_diag=float(_flat(diag, covered).min()),
        note=entry.note,
    )


# ------------------------------------------------------------------------------ the demo
def _check_run(epochs: int, repeats: int) -> None:
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs!r}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    distributed.refuse(
        "the curvature comparison", "it times every estimator in one process: run it alone"
    )


def run(
    epochs: int = 40,
    seed: int = 0,
    progress: bool = False,
    *,
    hutchinson_samples: int = 500,
    estimators: Sequence[ReportEstimator] | None = None,
    repeats: int = 3,
    out: str | Path | None = None,
) -> CurvatureReport:
    """Train the digits MLP for ``epochs`` epochs and compare the curvature estimators on it.

    ``estimators`` replaces :func:`default_estimators` (the first one is the reference of the rank
    correlations); the time baseline of each estimator is the median of ``repeats`` gradient passes
    right before and ``repeats`` right after it;
    ``out`` names a directory to write ``curvature.txt`` and ``curvature.json`` into.
    """
    _check_run(epochs, repeats)
    t_start = time.perf_counter()
    bars = _Bars(progress)
    loss_fn = nn.CrossEntropyLoss()

    data, model, train_seconds, train_eval, test_eval = _trained(epochs, seed, bars, loss_fn)
    n_params = sum(p.numel() for p in model.parameters())

    curvature_loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=256)
    problem = Problem(model, loss_fn, curvature_loader).check()
    weights = problem.parameters()
    names = list(weights)
    layers = list(dict.fromkeys(_layer_of(n) for n in names))

    _time_gradient(problem, 1)  # warm-up
    grad_times: list[float] = []

    entries = list(estimators) if estimators is not None else default_estimators(
        seed=seed, hutchinson_samples=hutchinson_samples
    )  # fmt: skip
    if not entries:
        raise ValueError("the demo needs at least one estimator")

    reference: ParamDict | None = None
    rows: list[EstimatorRow] = []
    for entry in entries:
        sub = problem
        if entry.params is not None:
            sub = Problem(model, loss_fn, curvature_loader, params=list(entry.params)).check()
        diag, seconds, local = _timed(entry, sub, problem, repeats, bars)
        grad_times += local
        if reference is None:
            if entry.params is not None:
                raise ValueError("the reference estimator (the first) must cover all parameters")
            reference = diag
        row = _row(entry, diag, reference, weights, layers, entry is entries[0])
        row.seconds, row.ratio = seconds, seconds / statistics.median(local)
        row.engine = _engine(entry.estimator, sub)
        rows.append(row)

    result = CurvatureReport(
        model="digits MLP 64-300-100-10 (tanh)",
        n_params=n_params,
        n_train=len(data.y_train),
        n_test=len(data.y_test),
        epochs=epochs,
        train_seconds=train_seconds,
        train_accuracy=train_eval["accuracy"],
        test_accuracy=test_eval["accuracy"],
        gradient_seconds=statistics.median(grad_times),
        layers=layers,
        rows=rows,
    )
    result.total_seconds = time.perf_counter() - t_start
    result.table = format_table(result)
    if out is not None:
        result.save(out)
    return result


def _engine(estimator, problem: Problem) -> str:
    """``engine: reason`` for estimators that say which engine they take, "" otherwise."""
    path = getattr(estimator, "path", None)
    return str(path(problem)) if callable(path) else ""


def _engine_lines(rows: Sequence[EstimatorRow]) -> list[str]:
    """One line per distinct engine: which estimators took it and why."""
    by_engine: dict[str, list[str]] = {}
    for r in rows:
        if r.engine:
            by_engine.setdefault(r.engine, []).append(r.label)
    return [f"engine {eng} -- {', '.join(labels)}" for eng, labels in by_engine.items()]


# ------------------------------------------------------------------------------ formatting
def _num(x: float | None, width: int, fmt: str) -> str:
    if x is None:
        return f"{'-':>{width}}"
    if isinstance(x, float) and math.isnan(x):
        return f"{'nan':>{width}}"
    return f"{x:>{width}{fmt}}"


def format_table(result: CurvatureReport) -> str:
    """The fixed-width report of a :class:`CurvatureReport`."""
    lines = [
        f"optbrain curvature: {result.model}, {result.n_params:,} parameters,"
        f" {result.n_train} train / {result.n_test} test digits",
        f"trained {result.epochs} epochs (Adam, lr 1e-3, batch 64) in {result.train_seconds:.1f} s:"
        f" accuracy train {100 * result.train_accuracy:.1f} %,"
        f" test {100 * result.test_accuracy:.1f} %",
        "curvature of the mean cross-entropy on the training digits;"
        f" one gradient pass = {1e3 * result.gradient_seconds:.2f} ms",
        "",
    ]
    label_w = max(22, *(len(r.label) + 1 for r in result.rows))
    lw = 11
    layer_w = lw * len(result.layers)
    head = f"{'estimator':<{label_w}} {'time s':>8} {'x grad':>7} {'diag':>7} {'OBD':>7}" + "".join(
        f"{'layer ' + layer:>{lw}}" for layer in result.layers
    )
    lines += [
        f"{'':<{label_w}} {'':>8} {'':>7} {'rho vs GGN':>15}"
        + f"{'OBD saliency sum 1/2 h w^2':>{layer_w}}",
        head,
        "-" * len(head),
    ]
    notes = []
    for r in result.rows:
        mark = ""
        if r.note:
            notes.append(r.note)
            mark = "*" * len(notes)
        lines.append(
            f"{r.label + mark:<{label_w}} {r.seconds:>8.3f} {r.ratio:>7.1f}"
            f" {_num(r.spearman_diag, 7, '.3f')} {_num(r.spearman_saliency, 7, '.3f')}"
            + "".join(_num(r.layer_saliency.get(layer), lw, ".3e") for layer in result.layers)
        )
    lines.append("-" * len(head))
    lines.append(
        "x grad: time / one gradient pass. rho: Spearman rank correlation with the GGN diagonal"
        " (diag)"
    )
    lines.append("and of the OBD saliencies with GGN-based ones (OBD), over all parameters.")
    for i, note in enumerate(notes, 1):
        lines.append(f"{'*' * i} {note}")
    lines += _engine_lines(result.rows)
    lines.append(f"total time {result.total_seconds:.1f} s")
    return "\n".join(lines)
