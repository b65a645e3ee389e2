"""Input selection with retraining, as Cibas et al. (1994/96) do it with Optimal Cell Damage.

Scores per input variable of a classifier's first layer (:func:`input_scores`: OCD, fan-out
magnitude, permutation importance, mutual information, random), removal of inputs by masking their
fan-out (:func:`remove_inputs`), and the RFE-shaped loop (:func:`iterative_removal`): remove the
lowest-scoring inputs, retrain, rescore, repeat. :func:`train_net` and :func:`removal_path` run
both with the training settings of an experiment's config (:class:`SelectionSettings`). Used by
:mod:`optbrain.experiments.cibas1994_waveform` and :mod:`optbrain.experiments.digits_ocd`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .stats import mean_sd_curve

__all__ = [
    "SelectionSettings",
    "Split",
    "accuracy",
    "chosen_round",
    "fit",
    "input_scores",
    "iterative_removal",
    "log_loss",
    "ranks",
    "removal_curve",
    "removal_path",
    "remove_inputs",
    "train_net",
]


@dataclass
class Split:
    """Train / validation / test tensors (``x`` float32 N×d, ``y`` int64)."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor


def fit(
    model: nn.Module,
    split: Split,
    *,
    epochs: int,
    patience: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> int:
    """Train with Adam and early stopping on the validation loss (best weights restored); returns
    the number of epochs run."""
    from torch.utils.data import DataLoader, TensorDataset

    from ..train import train

    loader = DataLoader(
        TensorDataset(split.x_train, split.y_train),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    res = train(
        model,
        loader,
        nn.CrossEntropyLoss(),
        epochs=epochs,
        lr=lr,
        val_loader=[(split.x_val, split.y_val)],
        patience=patience,
        seed=seed,
    )
    return res.epochs_run


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    from ..problem import eval_mode

    with eval_mode(model):
        return float((model(x).argmax(1) == y).to(torch.float64).mean())


@torch.no_grad()
def log_loss(model: nn.Module, x: Tensor, y: Tensor) -> float:
    from ..problem import eval_mode

    with eval_mode(model):
        return float(nn.functional.cross_entropy(model(x).to(torch.float64), y))


def input_scores(
    method: str,
    model: nn.Module,
    split: Split,
    *,
    curvature: str = "ggn",
    seed: int = 0,
    repeats: int = 10,
) -> Tensor:
    """A float64 score per input of ``model``'s first layer; higher = more important.

    ``"ocd"``: Σ over the input's fan-out weights of ½ h w² on the training data
    (:class:`~optbrain.saliency.OCD`, ``method="sum"``); ``"magnitude"``: Σ ½ w² over the fan-out;
    ``"permutation"``: scikit-learn's permutation importance on the validation data (mean drop of
    the log-likelihood over ``repeats`` shuffles); ``"mutual_info"``: scikit-learn's
    ``mutual_info_classif`` on the training data; ``"random"``: uniform draws from ``seed``.
    """
    from ..cells import cell_sums, cells
    from ..curvature import ESTIMATORS
    from ..problem import Problem
    from ..saliency import OCD, Magnitude

    if method == "ocd":
        problem = Problem(model, nn.CrossEntropyLoss(), [(split.x_train, split.y_train)])
        sal = OCD(ESTIMATORS[curvature](), kinds=("input",), method="sum")(problem)
        return sal.values.to(torch.float64)
    if method == "magnitude":
        problem = Problem(model, nn.CrossEntropyLoss(), [(split.x_train, split.y_train)])
        found = cells(model, ("input",))
        return cell_sums(Magnitude()(problem), found, "fan_out").to(torch.float64).cpu()
    if method == "permutation":
        return _permutation_importance(model, split.x_val, split.y_val, seed, repeats)
    if method == "mutual_info":
        from sklearn.feature_selection import mutual_info_classif

        mi = mutual_info_classif(
            split.x_train.double().numpy(), split.y_train.numpy(), random_state=seed
        )
        return torch.as_tensor(mi, dtype=torch.float64)
    if method == "random":
        n = len(cells(model, ("input",)))
        return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    raise ValueError(f"unknown input ranking {method!r}")


class _TorchClassifier:
    """The minimal estimator interface scikit-learn's ``permutation_importance`` needs."""

    def __init__(self, model: nn.Module):
        self.model = model

    def fit(self, x, y):  # pragma: no cover - never called (the net is already trained)
        return self

    @torch.no_grad()
    def predict_log_proba(self, x) -> Tensor:
        from ..problem import eval_mode

        p = next(self.model.parameters())
        with eval_mode(self.model):
            xs = torch.as_tensor(x, dtype=p.dtype, device=p.device)
            return self.model(xs).log_softmax(1).cpu()


def _permutation_importance(model: nn.Module, x: Tensor, y: Tensor, seed: int, repeats: int):
    from sklearn.inspection import permutation_importance

    def neg_log_loss(est: _TorchClassifier, xs, ys) -> float:
        lp = est.predict_log_proba(xs).to(torch.float64)
        return float(lp[torch.arange(len(ys)), torch.as_tensor(ys)].mean())

    res = permutation_importance(
        _TorchClassifier(model),
        x.double().numpy(),
        y.numpy(),
        scoring=neg_log_loss,
        n_repeats=repeats,
        random_state=seed,
    )
    return torch.as_tensor(res.importances_mean, dtype=torch.float64)


def remove_inputs(model: nn.Module, indices: Sequence[int]) -> None:
    """Remove input variables: mask (and zero) their fan-out weights in place
    (:func:`optbrain.cells.cell_mask` + :func:`optbrain.masking.attach`)."""
    from ..cells import cell_mask, cells
    from ..masking import Mask, attach

    found = cells(model, ("input",))
    picked = [found[i] for i in indices]
    names = sorted({s.name for c in picked for s in c.fan_out})
    # attach() ANDs with a mask already attached: earlier removals stay removed
    attach(model, cell_mask(Mask.ones(model, names), picked, "fan_out"))


def iterative_removal(
    model: nn.Module,
    split: Split,
    score: Callable[[nn.Module, int], Tensor],
    *,
    step: int,
    min_inputs: int,
    retrain: Callable[[nn.Module, int], None],
    tick: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Remove the ``step`` lowest-scoring remaining inputs, retrain, repeat until ``min_inputs``
    remain (RFE-shaped OCD). ``score(model, round)`` gives a score per input (higher = keep; ties
    broken by input index); ``retrain(model, round)`` retrains in place. Works on a copy; returns
    one row per round (round 0 = the trained net): inputs kept, inputs removed that round, val/test
    accuracy and loss. The rounds are :func:`optbrain.elimination.eliminate` with the scores
    injected into a :class:`~optbrain.pruners.CellPruner` over the inputs."""
    from ..cells import cells
    from ..elimination import Step, eliminate
    from ..masking import Mask
    from ..problem import Problem
    from ..pruners import CellPruner
    from ..saliency.ocd import OCD, CellSaliencies

    work = copy.deepcopy(model)
    found = tuple(cells(work, ("input",)))
    d = len(found)
    rows = [_removal_row(0, list(range(d)), [], work, split)]

    def target(r: int, mask: Mask) -> int | None:
        alive = rows[-1]["kept"]
        if alive <= min_inputs:
            return None
        return d - alive + min(step, alive - min_inputs)

    def after(s: Step) -> None:
        values = s.scores.values  # removed lowest score first, ties by index
        gone = sorted((i for _, _, i in s.info.removed), key=lambda i: (float(values[i]), i))
        alive = [i for i in rows[-1]["alive"] if i not in gone]
        rows.append(_removal_row(s.round, alive, gone, work, split))
        if tick is not None:
            tick(f"round {s.round}: {len(alive)} inputs kept")

    eliminate(
        work,
        CellPruner(OCD(kinds=("input",))),  # its scores are injected: never computed
        target,
        make_problem=lambda m: Problem(m, nn.CrossEntropyLoss(), [(split.x_train, split.y_train)]),
        mask=Mask.ones(work, sorted({sl.name for c in found for sl in c.fan_out})),
        scores=lambda s: CellSaliencies(found, score(work, s.round).to(torch.float64), "sum"),
        retrain=retrain,
        after=after,
    )
    return rows


def _removal_row(r: int, alive: list[int], gone: list[int], model: nn.Module, split: Split):
    return {
        "round": r,
        "kept": len(alive),
        "removed": list(gone),
        "alive": list(alive),
        "val_accuracy": accuracy(model, split.x_val, split.y_val),
        "test_accuracy": accuracy(model, split.x_test, split.y_test),
        "val_loss": log_loss(model, split.x_val, split.y_val),
    }


def chosen_round(rows: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    """The smallest input set whose validation accuracy is within ``tolerance`` of the best."""
    best = max(r["val_accuracy"] for r in rows)
    ok = [r for r in rows if r["val_accuracy"] >= best - tolerance - 1e-12]
    return min(ok, key=lambda r: (r["kept"], -r["val_accuracy"]))


def ranks(scores: Tensor) -> Tensor:
    """0 = lowest score (removed first); ties broken by index."""
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    out = torch.empty(len(scores), dtype=torch.long)
    out[order] = torch.arange(len(scores))
    return out


class SelectionSettings(Protocol):
    """The settings of an input-selection experiment's ``Config`` that :func:`train_net` and
    :func:`removal_path` read."""

    lr: float
    batch_size: int
    epochs: int
    patience: int
    remove_per_round: int
    min_inputs: int
    retrain_epochs: int
    retrain_patience: int


def train_net(model: nn.Module, split: Split, cfg: SelectionSettings, seed: int) -> dict[str, Any]:
    """Train ``model`` in place with :func:`fit` (``cfg.epochs``, ``cfg.patience``, ``cfg.lr``,
    ``cfg.batch_size``, ``seed``); returns ``seed``, ``epochs`` run, ``val_accuracy`` and
    ``test_accuracy``."""
    epochs = fit(
        model,
        split,
        epochs=cfg.epochs,
        patience=cfg.patience,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        seed=seed,
    )
    return {
        "seed": seed,
        "epochs": epochs,
        "val_accuracy": accuracy(model, split.x_val, split.y_val),
        "test_accuracy": accuracy(model, split.x_test, split.y_test),
    }


def removal_path(
    model: nn.Module,
    split: Split,
    score: Callable[[nn.Module, int], Tensor],
    cfg: SelectionSettings,
    seed: int,
) -> list[dict[str, Any]]:
    """:func:`iterative_removal` of ``cfg.remove_per_round`` inputs per round down to
    ``cfg.min_inputs``, retraining with :func:`fit` (``cfg.retrain_epochs``,
    ``cfg.retrain_patience``, seeded ``seed * 1000 + round``) after every round."""

    def retrain(m: nn.Module, r: int) -> None:
        fit(
            m,
            split,
            epochs=cfg.retrain_epochs,
            patience=cfg.retrain_patience,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            seed=seed * 1000 + r,
        )

    return iterative_removal(
        model, split, score, step=cfg.remove_per_round, min_inputs=cfg.min_inputs, retrain=retrain
    )


def removal_curve(
    runs: list[list[dict[str, Any]]], key: str, scale: float = 1.0
) -> tuple[list[int], list[tuple[float, float]]]:
    """Along removal paths (rows of :func:`iterative_removal`, one path per seed, aligned by round):
    the inputs kept per round and (mean, sd) of ``scale * row[key]`` over the paths."""
    stats = mean_sd_curve([[scale * row[key] for row in rows] for rows in runs])
    return [runs[0][i]["kept"] for i in range(len(stats))], stats
