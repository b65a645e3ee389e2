"""``optbrain demo``: Optimal Brain Damage against magnitude pruning on the digits MLP.

The demo trains the 64-300-100-10 tanh MLP on the scikit-learn digits, then prunes a copy of it
with each method under the same geometric schedule and the same retraining budget: every round
deletes ``rate`` of the remaining weights (globally, lowest saliency first; OBD's curvature is the
exact Gauss–Newton diagonal of the training loss) and retrains for ``retrain_epochs`` epochs with
the deleted weights held at zero. It records every round in a :class:`~optbrain.history.History`
and writes a run directory::

    out_dir/
      report.md                   tables, figures, notes
      accuracy_vs_params.png      test accuracy vs remaining parameters (log)
      objective_increase.png      predicted vs actual increase of the training loss
      run.json                    what `optbrain report` needs to rebuild the report
      obd/history.json            one History per method
      obd/model.pt                the pruned model after the last round
      obd/model_selected.pt       the most compressed round within 1 point of the unpruned accuracy
      magnitude/...               the same for magnitude pruning

``optbrain.masking.load_pruned(optbrain.models.digits.digits_mlp(), "out_dir/obd/model.pt")``
loads a pruned model back. :func:`run` returns a :class:`DemoResult`; it prints nothing
(progress bars, when asked for, go to stderr through tqdm).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .history import History
from .masking import Mask, attach, current_mask, save_pruned
from .problem import Problem
from .report import write_report
from .report.progress import Bars
from .report.tables import Selection, history_table, label, largest_compression, selection_lines

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_OUT", "METHODS", "DemoResult", "run"]

DEFAULT_OUT = Path("optbrain-runs") / "demo"
METHODS = ("obd", "magnitude")


@dataclass
class DemoResult:
    """What the demo measured and wrote; ``str(result)`` is the printed table."""

    histories: dict[str, History]
    selected: dict[str, Selection | None]
    run_dir: Path
    report: Path
    files: list[Path]
    n_params: int
    train_seconds: float
    seconds: float = 0.0
    table: str = field(default="", repr=False)

    def __str__(self) -> str:
        return self.table


def _pruner(method: str, seed: int):
    from .pruners import make

    return make(method, seed)


def _check(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def run(
    out_dir: str | Path = DEFAULT_OUT,
    *,
    epochs: int = 40,
    rounds: int = 8,
    rate: float = 0.35,
    retrain_epochs: int = 3,
    seed: int = 0,
    methods: Sequence[str] = METHODS,
    hidden: Sequence[int] = (300, 100),
    lr: float = 1e-3,
    tolerance: float = 0.01,
    progress: bool = False,
) -> DemoResult:
    """Train the digits MLP, prune it with each of ``methods``, write the run directory.

    ``epochs``: training of the unpruned net (Adam, ``lr``, batch 64); ``rounds`` rounds of a
    geometric schedule deleting ``rate`` of the remaining weights each (8 × 0.35 → 96.8 %);
    ``retrain_epochs`` epochs of retraining per round (0: none); ``hidden``: the hidden layer
    sizes (small ones make a quick test); ``tolerance``: the accuracy drop (a fraction: 0.01 = 1
    point) within which the table's last lines look for the largest compression. Files are
    written only under ``out_dir`` (relative paths are taken from the current directory).
    """
    _check("epochs", epochs, 0)
    _check("rounds", rounds, 1)
    _check("retrain_epochs", retrain_epochs, 0)
    if not methods:
        raise ValueError("the demo needs at least one method")
    cfg = _Settings(epochs, rounds, rate, retrain_epochs, seed, tuple(hidden), lr, tolerance)
    pruners = {m: _pruner(m, seed) for m in methods}  # unknown methods fail before any work
    t_start = time.perf_counter()
    run_dir = Path(out_dir)
    bars = Bars(progress)
    net = _train_base(cfg, bars)
    histories: dict[str, History] = {}
    snapshots: dict[str, dict[int, tuple[Mask, dict[str, torch.Tensor]]]] = {}
    for method, pruner in pruners.items():
        histories[method], snapshots[method] = _prune(cfg, net, method, pruner, bars)
        log.info("%s: %d rounds", method, len(histories[method].records) - 1)
    files, selected = _save_models(cfg, run_dir, histories, snapshots)
    report = _write_report(cfg, net, run_dir, histories)
    files += [report, run_dir / "run.json"]
    files += sorted(run_dir.glob("*.png"))
    seconds = time.perf_counter() - t_start
    return DemoResult(
        histories=histories,
        selected=selected,
        run_dir=run_dir,
        report=report,
        files=files,
        n_params=net.n_params,
        train_seconds=net.train_seconds,
        seconds=seconds,
        table=_table(cfg, net, histories, seconds),
    )


@dataclass
class _Settings:
    """The settings of one demo run (see :func:`run`)."""

    epochs: int
    rounds: int
    rate: float
    retrain_epochs: int
    seed: int
    hidden: tuple[int, ...]
    lr: float
    tolerance: float


@dataclass
class _Net:
    """The trained unpruned net and what every method's run shares."""

    base: nn.Module
    data: Any
    train_loader: Any
    test_loader: Any
    pruning_data: DataLoader
    loss_fn: nn.Module
    arch: str
    n_params: int
    train_seconds: float

    def metrics(self, model: nn.Module) -> dict[str, float]:
        from .train import evaluate

        tr = evaluate(model, self.pruning_data, self.loss_fn)
        te = evaluate(model, self.test_loader, self.loss_fn)
        return {
            "train_loss": tr["loss"],
            "train_accuracy": tr["accuracy"],
            "test_loss": te["loss"],
            "test_accuracy": te["accuracy"],
        }


def _train_base(cfg: _Settings, bars: Bars) -> _Net:
    from .data import load_digits_split, loaders
    from .models import digits_mlp
    from .train import train

    data = load_digits_split(seed=cfg.seed)
    train_loader, test_loader = loaders(data, batch_size=64, shuffle=True, seed=cfg.seed)
    pruning_data = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=512)
    loss_fn = nn.CrossEntropyLoss()
    base = digits_mlp(cfg.hidden, "tanh", seed=cfg.seed)
    n_params = sum(p.numel() for p in base.parameters())
    arch = "-".join(str(s) for s in (data.n_features, *cfg.hidden, data.n_classes))
    t0 = time.perf_counter()
    with bars.stage("training", total=cfg.epochs) as cb:
        train(base, train_loader, loss_fn, epochs=cfg.epochs, lr=cfg.lr, seed=cfg.seed, progress=cb)
    seconds = time.perf_counter() - t0
    return _Net(
        base, data, train_loader, test_loader, pruning_data, loss_fn, arch, n_params, seconds
    )


def _prune(cfg: _Settings, net: _Net, method: str, pruner, bars: Bars):
    """One method's prune–retrain run on a copy of the net; (history, snapshots by round)."""
    from .loop import iterative_prune
    from .schedule import geometric
    from .train import train

    schedule = geometric(cfg.rate)
    model = copy.deepcopy(net.base)
    snaps: dict[int, tuple[Mask, dict[str, torch.Tensor]]] = {}

    def snapshot(r: int) -> None:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        snaps[r] = (current_mask(model), state)

    def retrain(m: nn.Module, r: int) -> None:
        kw = dict(epochs=cfg.retrain_epochs, lr=cfg.lr, seed=cfg.seed + 1000 * r)
        train(m, net.train_loader, net.loss_fn, **kw)

    config = {
        "demo": "digits OBD vs magnitude",
        "method": method,
        "pruner": repr(pruner),
        "model": f"digits_mlp {net.arch} tanh",
        "schedule": repr(schedule),
        "rounds": cfg.rounds,
        "epochs": cfg.epochs,
        "retrain_epochs": cfg.retrain_epochs,
        "lr": cfg.lr,
        "seed": cfg.seed,
        "pruning_data": "training split",
    }
    snapshot(0)
    with bars.stage(f"pruning {label(method)}", total=cfg.rounds) as stage:

        def done(r: int, total: int) -> None:
            snapshot(r)
            if stage is not None:
                stage(r, total)

        history = iterative_prune(
            model,
            pruner,
            schedule,
            rounds=cfg.rounds,
            make_problem=lambda m: Problem(m, net.loss_fn, net.pruning_data),
            retrain=retrain if cfg.retrain_epochs > 0 else None,
            evaluate=net.metrics,
            config=config,
            progress=done,
        )
    return history, snaps


def _save_models(cfg: _Settings, run_dir: Path, histories, snapshots):
    """Each method's history, last model and most compressed model within the tolerance."""
    from .models import digits_mlp

    files: list[Path] = []
    selected: dict[str, Selection | None] = {}
    for method, history in histories.items():
        folder = run_dir / method
        history.save(folder / "history.json")
        files.append(folder / "history.json")
        sel = largest_compression(history, "metrics.test_accuracy", cfg.tolerance, method)
        selected[method] = sel
        rounds = {"model.pt": history.last.round}
        if sel is not None:
            rounds["model_selected.pt"] = sel.record.round
        for filename, r in rounds.items():
            mask, state = snapshots[method][r]
            fresh = digits_mlp(cfg.hidden, "tanh")
            if len(mask):
                attach(fresh, mask)
            fresh.load_state_dict(state)
            save_pruned(fresh, folder / filename)
            files.append(folder / filename)
    return files, selected


def _columns(histories) -> dict[str, list[str]]:
    return {
        m: ["round", "sparsity", "remaining_params", "metrics.test_accuracy", "metrics.test_loss"]
        + (["predicted_increase"] if m == "obd" else [])
        + ["actual_increase"]
        for m in histories
    }


def _write_report(cfg: _Settings, net: _Net, run_dir: Path, histories) -> Path:
    base_acc = histories[next(iter(histories))].records[0].metrics["test_accuracy"]
    names = " vs ".join(label(m) for m in histories)
    arg = "" if cfg.hidden == (300, 100) else repr(cfg.hidden)
    load = f"optbrain.masking.load_pruned(optbrain.models.digits.digits_mlp({arg}), path)"
    data = net.data
    notes = [
        f"{names} pruning of the {net.arch} tanh MLP ({net.n_params:,} parameters) trained for "
        f"{cfg.epochs} epochs on {len(data.y_train)} scikit-learn digits (test: "
        f"{len(data.y_test)} digits, accuracy {100 * base_acc:.2f}% unpruned).",
        f"Every method ran the same schedule — {cfg.rounds} rounds, each deleting "
        f"{100 * cfg.rate:g}% of the remaining weights, ranked globally — and the same retraining "
        f"({cfg.retrain_epochs} epochs of Adam, lr {cfg.lr:g}, per round, deleted weights held at "
        "zero). OBD's saliency is ½ h w² with h the exact Gauss–Newton diagonal of the training "
        "loss; magnitude pruning ranks by ½ w² (OBD with h = 1), so its predicted increase is not "
        "in loss units and is not shown.",
        "OBD's prediction is a second-order expansion about a minimum that leaves out the cross "
        "terms between deleted weights: when one round deletes thousands of weights, compare "
        "the predicted and actual ΔE columns to see how far that approximation carries.",
        f"Load a pruned model with `{load}` (`path`: one of the `model*.pt` files below).",
    ]
    return write_report(
        run_dir,
        histories,
        title=f"optbrain demo: {names} pruning on the digits MLP",
        notes=notes,
        columns=_columns(histories),
        metric="metrics.test_accuracy",
        tolerance=cfg.tolerance,
    )


def _table(cfg: _Settings, net: _Net, histories, seconds: float) -> str:
    base_acc = histories[next(iter(histories))].records[0].metrics["test_accuracy"]
    names = " vs ".join(label(m) for m in histories)
    n_train, n_test = len(net.data.y_train), len(net.data.y_test)
    head = [
        f"optbrain demo: {names} pruning of the digits MLP {net.arch} (tanh), "
        f"{net.n_params:,} parameters",
        f"trained {cfg.epochs} epochs (Adam, lr {cfg.lr:g}) in {net.train_seconds:.1f} s on "
        f"{n_train} digits: test accuracy {100 * base_acc:.2f}% ({n_test} digits)",
        f"schedule: {cfg.rounds} rounds, each deleting {100 * cfg.rate:g}% of the remaining "
        f"weights, then retraining {cfg.retrain_epochs} "
        f"epoch{'' if cfg.retrain_epochs == 1 else 's'}",
        "OBD saliency 1/2 h w^2 with h the exact Gauss-Newton diagonal of the training loss",
        "dE: increase of the training loss caused by the round's deletion (before retraining);",
        "    pred: the sum of the deleted OBD saliencies. test acc/loss: after retraining.",
        "",
    ]
    return "\n".join(
        [
            *head,
            history_table(histories, _columns(histories)),
            *selection_lines(histories, "metrics.test_accuracy", cfg.tolerance),
            f"total time {seconds:.1f} s (training, pruning, report)",
        ]
    )


_CURVATURE_NAMES = {
    "DemoEstimator": "ReportEstimator",
    "DemoResult": "CurvatureReport",
    "EstimatorRow": "EstimatorRow",
    "default_estimators": "default_estimators",
    "format_table": "format_table",
    "spearman": "spearman",
}


def __getattr__(name: str):
    """Names of the curvature comparison, which lived here before it moved to
    :mod:`optbrain.curvature_report` (``optbrain.demo.run`` is now the pruning demo)."""
    if name in _CURVATURE_NAMES:
        import warnings

        from . import curvature_report

        warnings.warn(
            f"optbrain.demo.{name} has moved to optbrain.curvature_report.{_CURVATURE_NAMES[name]}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(curvature_report, _CURVATURE_NAMES[name])
    if name == "PruningDemoResult":
        return DemoResult
    raise AttributeError(f"module 'optbrain.demo' has no attribute {name!r}")
