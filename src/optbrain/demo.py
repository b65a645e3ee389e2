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
    from .data import load_digits_split, loaders
    from .loop import iterative_prune
    from .models import digits_mlp
    from .schedule import geometric
    from .train import evaluate, train

    _check("epochs", epochs, 0)
    _check("rounds", rounds, 1)
    _check("retrain_epochs", retrain_epochs, 0)
    if not methods:
        raise ValueError("the demo needs at least one method")
    schedule = geometric(rate)
    pruners = {m: _pruner(m, seed) for m in methods}  # unknown methods fail before any work
    t_start = time.perf_counter()
    run_dir = Path(out_dir)
    bars = Bars(progress)

    data = load_digits_split(seed=seed)
    train_loader, test_loader = loaders(data, batch_size=64, shuffle=True, seed=seed)
    pruning_data = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=512)
    loss_fn = nn.CrossEntropyLoss()
    base = digits_mlp(tuple(hidden), "tanh", seed=seed)
    n_params = sum(p.numel() for p in base.parameters())
    arch = "-".join(str(s) for s in (data.n_features, *hidden, data.n_classes))

    t0 = time.perf_counter()
    with bars.stage("training", total=epochs) as cb:
        train(base, train_loader, loss_fn, epochs=epochs, lr=lr, seed=seed, progress=cb)
    train_seconds = time.perf_counter() - t0

    def metrics(model: nn.Module) -> dict[str, float]:
        tr = evaluate(model, pruning_data, loss_fn)
        te = evaluate(model, test_loader, loss_fn)
        return {
            "train_loss": tr["loss"],
            "train_accuracy": tr["accuracy"],
            "test_loss": te["loss"],
            "test_accuracy": te["accuracy"],
        }

    histories: dict[str, History] = {}
    snapshots: dict[str, dict[int, tuple[Mask, dict[str, torch.Tensor]]]] = {}
    for method, pruner in pruners.items():
        model = copy.deepcopy(base)
        snaps: dict[int, tuple[Mask, dict[str, torch.Tensor]]] = {}

        def snapshot(r: int, model: nn.Module = model, snaps=snaps) -> None:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            snaps[r] = (current_mask(model), state)

        def retrain(model: nn.Module, r: int) -> None:
            train(model, train_loader, loss_fn, epochs=retrain_epochs, lr=lr, seed=seed + 1000 * r)

        config = {
            "demo": "digits OBD vs magnitude",
            "method": method,
            "pruner": repr(pruner),
            "model": f"digits_mlp {arch} tanh",
            "schedule": repr(schedule),
            "rounds": rounds,
            "epochs": epochs,
            "retrain_epochs": retrain_epochs,
            "lr": lr,
            "seed": seed,
            "pruning_data": "training split",
        }
        snapshot(0)
        with bars.stage(f"pruning {label(method)}", total=rounds) as stage:

            def done(r: int, total: int, stage=stage, snapshot=snapshot) -> None:
                snapshot(r)
                if stage is not None:
                    stage(r, total)

            histories[method] = iterative_prune(
                model,
                pruner,
                schedule,
                rounds=rounds,
                make_problem=lambda m: Problem(m, loss_fn, pruning_data),
                retrain=retrain if retrain_epochs > 0 else None,
                evaluate=metrics,
                config=config,
                progress=done,
            )
        snapshots[method] = snaps
        log.info("%s: %d rounds", method, len(histories[method].records) - 1)

    # ---------------------------------------------------------------- write the run directory
    files: list[Path] = []
    selected: dict[str, Selection | None] = {}
    for method, history in histories.items():
        folder = run_dir / method
        history.save(folder / "history.json")
        files.append(folder / "history.json")
        snaps = snapshots[method]
        for filename, r in (
            ("model.pt", history.last.round),
            ("model_selected.pt", None),
        ):
            if r is None:
                sel = largest_compression(history, "metrics.test_accuracy", tolerance, method)
                selected[method] = sel
                if sel is None:
                    continue
                r = sel.record.round
            mask, state = snaps[r]
            fresh = digits_mlp(tuple(hidden), "tanh")
            if len(mask):
                attach(fresh, mask)
            fresh.load_state_dict(state)
            save_pruned(fresh, folder / filename)
            files.append(folder / filename)

    base_acc = histories[next(iter(histories))].records[0].metrics["test_accuracy"]
    columns = {
        m: ["round", "sparsity", "remaining_params", "metrics.test_accuracy", "metrics.test_loss"]
        + (["predicted_increase"] if m == "obd" else [])
        + ["actual_increase"]
        for m in histories
    }
    names = " vs ".join(label(m) for m in histories)
    arg = "" if tuple(hidden) == (300, 100) else repr(tuple(hidden))
    load = f"optbrain.masking.load_pruned(optbrain.models.digits.digits_mlp({arg}), path)"
    notes = [
        f"{names} pruning of the {arch} tanh MLP ({n_params:,} parameters) trained for "
        f"{epochs} epochs on {len(data.y_train)} scikit-learn digits (test: "
        f"{len(data.y_test)} digits, accuracy {100 * base_acc:.2f}% unpruned).",
        f"Every method ran the same schedule — {rounds} rounds, each deleting "
        f"{100 * rate:g}% of the remaining weights, ranked globally — and the same retraining "
        f"({retrain_epochs} epochs of Adam, lr {lr:g}, per round, deleted weights held at zero). "
        "OBD's saliency is ½ h w² with h the exact Gauss–Newton diagonal of the training loss; "
        "magnitude pruning ranks by ½ w² (OBD with h = 1), so its predicted increase is not in "
        "loss units and is not shown.",
        "OBD's prediction is a second-order expansion about a minimum that leaves out the cross "
        "terms between deleted weights: when one round deletes thousands of weights, compare "
        "the predicted and actual ΔE columns to see how far that approximation carries.",
        f"Load a pruned model with `{load}` (`path`: one of the `model*.pt` files below).",
    ]
    report = write_report(
        run_dir,
        histories,
        title=f"optbrain demo: {names} pruning on the digits MLP",
        notes=notes,
        columns=columns,
        metric="metrics.test_accuracy",
        tolerance=tolerance,
    )
    files += [report, run_dir / "run.json"]
    files += sorted(run_dir.glob("*.png"))
    seconds = time.perf_counter() - t_start
    head = [
        f"optbrain demo: {names} pruning of the digits MLP {arch} (tanh), {n_params:,} parameters",
        f"trained {epochs} epochs (Adam, lr {lr:g}) in {train_seconds:.1f} s on "
        f"{len(data.y_train)} digits: test accuracy {100 * base_acc:.2f}% "
        f"({len(data.y_test)} digits)",
        f"schedule: {rounds} rounds, each deleting {100 * rate:g}% of the remaining weights, then "
        f"retraining {retrain_epochs} epoch{'' if retrain_epochs == 1 else 's'}",
        "OBD saliency 1/2 h w^2 with h the exact Gauss-Newton diagonal of the training loss",
        "dE: increase of the training loss caused by the round's deletion (before retraining);",
        "    pred: the sum of the deleted OBD saliencies. test acc/loss: after retraining.",
        "",
    ]
    table = "\n".join(
        [
            *head,
            history_table(histories, columns),
            *selection_lines(histories, "metrics.test_accuracy", tolerance),
            f"total time {seconds:.1f} s (training, pruning, report)",
        ]
    )
    return DemoResult(
        histories=histories,
        selected=selected,
        run_dir=run_dir,
        report=report,
        files=files,
        n_params=n_params,
        train_seconds=train_seconds,
        seconds=seconds,
        table=table,
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
