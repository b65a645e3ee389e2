"""Hassibi, Stork, Wolff & Watanabe (1994), *OBS extensions*: the 5-d Gaussian-mixture problem.

A 5-9-1 net (64 weights, biases counted) is trained to a minimum of the squared error on 1000
patterns of the fully specified two-class mixture (:mod:`optbrain.data.gaussian_mixture`; the
paper: training error about 0.15 per pattern at the minimum). Weights are then removed one at a
time by OBS (α = 10⁻⁶, the OBS update, no retraining) and by OBD with 60 epochs of retraining after
each deletion, and the test error (1000 independent patterns) is recorded against the number of
weights removed. The paper: OBS's test error decreases monotonically to a minimum after 22 weights
removed; OBD's is erratic and goes up on average (retraining "reinjects the training-set noise").
Starting from an early-stopped net instead, OBS reaches its minimum after 17 removed and OBD shows
no consistent reduction.

Here: sigmoid hidden and output units, targets 0/1 (class A = 1), E = mean (t − o)². The minimum
is reached by full-batch L-BFGS; the early-stopped net by Adam on mini-batches, stopped at the
lowest error on a separate validation set of ``n_val`` patterns. OBD (½hw², Gauss–Newton
diagonal) retrains with Adam (``retrain_lr``, batches of ``retrain_batch``). Every weight and bias
is a candidate. "Test error" is the test MSE (the paper's measure); misclassification is reported
too.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import base
from .base import Claim, Progress, Result, Session
from .figures import FigureFiles, band, new_figure
from .hassibi_common import (
    LABELS,
    ShuffledBatches,
    accuracy,
    all_parameters_mask,
    delete_one_at_a_time,
    fit,
    make_pruner,
    mse_problem,
    outputs,
    sigmoid_net,
)
from .stats import fmt, mean_sd, mean_sd_curve, seeds_tag

log = logging.getLogger(__name__)

NAME = "hassibi1994-mixture"
SUMMARY = (
    "OBS extensions (Hassibi, Stork, Wolff & Watanabe 1994): test error against weights removed "
    "on the 5-d Gaussian mixture, OBS (no retraining) vs OBD with 60 retraining epochs per step"
)
TITLE = "OBS vs OBD on the 5-d Gaussian mixture (Hassibi, Stork, Wolff & Watanabe 1994)"

STARTS = ("minimum", "early_stopped")
_PAPER = {
    "train": "minimum training squared error about 0.15 per pattern (5-9-1 net, 64 weights)",
    "obs_min": "OBS (α = 1e-6, no retraining): test error decreases monotonically to a minimum "
    "after 22 weights removed",
    "obd": "OBD with 60 retraining epochs per step: test error erratic, goes up on average",
    "es_obs": "from an early-stopped net, OBS reaches its test-error minimum after 17 removed",
    "es_obd": "from an early-stopped net, OBD shows no consistent reduction of test error",
}
PAPER_MIN = {"minimum": 22, "early_stopped": 17}


@dataclass
class Config(base.Config):
    """Setting; the defaults are the full run. ``max_removed`` weights are removed by each method
    (of 64). A test-error minimum is "near the paper's" when within ``tolerance`` × the paper's
    count of removed weights."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    n_train: int = 1000
    n_test: int = 1000
    n_val: int = 1000
    hidden: int = 9
    max_iter: int = 3000
    alpha: float = 1e-6
    max_removed: int = 45
    methods: tuple[Literal["obs", "obd"], ...] = ("obs", "obd")
    starts: tuple[Literal["minimum", "early_stopped"], ...] = STARTS
    retrain_epochs: int = 60
    retrain_lr: float = 1e-3
    retrain_batch: int = 100
    es_lr: float = 1e-2
    es_batch: int = 100
    es_max_epochs: int = 500
    es_patience: int = 20
    train_error_tolerance: float = 0.03
    tolerance: float = 0.5
    figure_dpi: int = 90

    @classmethod
    def quick(cls) -> Config:
        """One seed, 30 deletions, 3 retraining epochs per OBD step."""
        return cls(seeds=(0,), max_removed=30, retrain_epochs=3, es_max_epochs=200)

    def validate(self) -> None:
        need = self.need
        self.need_seeds()
        need(self.n_train >= 10, "n_train", "must be >= 10")
        need(self.n_test >= 10, "n_test", "must be >= 10")
        need(self.hidden >= 1, "hidden", "must be >= 1")
        need(self.max_iter >= 1, "max_iter", "must be >= 1")
        need(self.alpha > 0, "alpha", "must be > 0")
        n_weights = 5 * self.hidden + 2 * self.hidden + 1
        need(1 <= self.max_removed < n_weights, "max_removed", f"must be in 1..{n_weights - 1}")
        need(len(self.methods) > 0, "methods", "give at least one of obs, obd")
        need(len(set(self.methods)) == len(self.methods), "methods", "must be distinct")
        need(len(self.starts) > 0, "starts", "give at least one of minimum, early_stopped")
        need(len(set(self.starts)) == len(self.starts), "starts", "must be distinct")
        need(
            "early_stopped" not in self.starts or self.n_val >= 10,
            "n_val",
            "early stopping needs a validation set of at least 10",
        )
        need(self.retrain_epochs >= 0, "retrain_epochs", "must be >= 0")
        need(self.retrain_lr > 0, "retrain_lr", "must be > 0")
        need(self.retrain_batch >= 1, "retrain_batch", "must be >= 1")
        need(self.es_lr > 0, "es_lr", "must be > 0")
        need(self.es_batch >= 1, "es_batch", "must be >= 1")
        need(self.es_max_epochs >= 1, "es_max_epochs", "must be >= 1")
        need(self.es_patience >= 1, "es_patience", "must be >= 1")
        need(self.train_error_tolerance > 0, "train_error_tolerance", "must be > 0")
        need(0 < self.tolerance < 1, "tolerance", "must be in (0, 1)")
        need(20 <= self.figure_dpi <= 300, "figure_dpi", "must be in [20, 300]")


def _loader(x: Tensor, y: Tensor, batch: int, seed: int) -> ShuffledBatches:
    return ShuffledBatches(x, y, batch, seed)


def _metrics(model: nn.Module, data) -> dict[str, float]:
    return {
        "train_mse": float(nn.functional.mse_loss(outputs(model, data.x_train), data.y_train)),
        "test_mse": float(nn.functional.mse_loss(outputs(model, data.x_test), data.y_test)),
        "test_error_rate": 1.0 - accuracy(model, data.x_test, data.y_test),
    }


def _start_net(cfg: Config, start: str, seed: int, data) -> tuple[nn.Module, dict[str, Any]]:
    from ..train import train

    model = sigmoid_net(5, cfg.hidden, seed)
    if start == "minimum":
        res = fit(model, data.x_train, data.y_train, max_iter=cfg.max_iter)
        return model, {"iterations": res.iterations}
    val = [(data.x_val, data.y_val)]
    res = train(
        model,
        _loader(data.x_train, data.y_train, cfg.es_batch, seed),
        nn.MSELoss(),
        epochs=cfg.es_max_epochs,
        lr=cfg.es_lr,
        val_loader=val,
        patience=cfg.es_patience,
        seed=seed,
    )
    return model, {"epochs": res.epochs_run, "best_epoch": res.best_epoch}


def _curve(cfg: Config, method: str, model: nn.Module, data, seed: int) -> list[dict[str, Any]]:
    """Remove ``max_removed`` weights one at a time; metrics after each removal."""
    from ..masking import attach, detach
    from ..train import train

    work = copy.deepcopy(model)
    problem = mse_problem(work, data.x_train, data.y_train)
    mask = all_parameters_mask(work)
    pruner = make_pruner(method, alpha=cfg.alpha)
    rows = [{"removed": 0, "saliency": 0.0, **_metrics(work, data)}]
    masks = [mask]

    def retrain(m: nn.Module, k: int) -> None:  # OBD only: masked retraining after each step
        attach(m, masks[-1])
        train(
            m,
            _loader(data.x_train, data.y_train, cfg.retrain_batch, seed * 1000 + k),
            nn.MSELoss(),
            epochs=cfg.retrain_epochs,
            lr=cfg.retrain_lr,
            seed=seed * 1000 + k,
        )
        detach(m, bake=True)

    def after(step) -> None:
        rows.append(
            {
                "removed": step.round,
                "saliency": step.info.predicted_increase,
                **_metrics(work, data),
            }
        )

    delete_one_at_a_time(
        work,
        problem,
        pruner,
        mask,
        min_kept=mask.total() - cfg.max_removed,
        retrain=retrain if method == "obd" and cfg.retrain_epochs > 0 else None,
        after=after,
        deleted=lambda step: masks.append(step.new),
    )
    return rows


# --------------------------------------------------------------------------- the experiment
def run(config: Config, out_dir: str | Path, progress: Progress | None = None) -> Result:
    """Run the reproduction into ``out_dir`` (see the module docstring) and return the result."""
    from ..data.gaussian_mixture import bayes_posterior, load_gaussian_mixture

    cfg = config
    total = len(cfg.seeds) * len(cfg.starts) * (1 + len(cfg.methods)) + 1
    session = Session(cfg, out_dir, total, progress, log)
    tick = session.tick
    runs: dict[str, dict[int, dict[str, Any]]] = {s: {} for s in cfg.starts}
    bayes: list[float] = []
    for seed in cfg.seeds:
        data = load_gaussian_mixture(
            cfg.n_train, cfg.n_test, cfg.n_val, seed=seed, dtype=torch.float64
        )
        p = bayes_posterior(data.x_test)
        bayes.append(float(nn.functional.mse_loss(p, data.y_test)))
        for start in cfg.starts:
            model, info = _start_net(cfg, start, seed, data)
            tick(f"seed {seed}: {start} net trained")
            entry: dict[str, Any] = {"info": info, "start": _metrics(model, data), "curves": {}}
            for method in cfg.methods:
                entry["curves"][method] = _curve(cfg, method, model, data, seed)
                tick(f"seed {seed}: {start}, {LABELS[method]} curve")
            runs[start][seed] = entry
    session.write_json(
        "curves.json", {s: {str(k): v for k, v in r.items()} for s, r in runs.items()}
    )
    result = session.result(NAME, TITLE)
    result.notes = _notes(cfg, bayes)
    for start in cfg.starts:
        _analyse(cfg, start, runs[start], result)
    return session.finish(result, _figures(cfg, runs, bayes, session.out))


# --------------------------------------------------------------------------- analysis
def _mean_curve(runs: dict[int, dict[str, Any]], method: str, key: str):
    """Per weights removed: (mean, sd) over seeds of ``row[key]`` along ``method``'s curve."""
    return mean_sd_curve([[row[key] for row in r["curves"][method]] for r in runs.values()])


def _argmin(values: list[float]) -> int:
    return min(range(len(values)), key=lambda i: (values[i], i))


def _slope(ys: list[float]) -> float:
    """Least-squares slope of ys against 0..n-1."""
    n = len(ys)
    if n < 2:
        return math.nan
    mx = (n - 1) / 2
    my = sum(ys) / n
    sxx = sum((i - mx) ** 2 for i in range(n))
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sxx


def _analyse(cfg: Config, start: str, runs: dict[int, dict[str, Any]], result: Result) -> None:
    seeds = list(runs)
    ns = len(seeds)
    name = "trained to the minimum" if start == "minimum" else "early-stopped"
    tag = seeds_tag(ns, f"{name} net")
    paper_k = PAPER_MIN[start]
    _method_claims(cfg, start, runs, result, seeds, tag, paper_k)
    _comparison_and_tables(cfg, start, runs, result, tag)


def _method_claims(cfg, start, runs, result, seeds, tag, paper_k):
    """The claims of OBS (no retraining) and OBD with retraining."""
    if start == "minimum":
        tr = mean_sd([runs[s]["start"]["train_mse"] for s in seeds])
        result.claims.append(
            Claim(
                name="training error at the minimum about 0.15 per pattern",
                held=abs(tr[0] - 0.15) <= cfg.train_error_tolerance,
                detail=f"mean (t − o)² per pattern {fmt(tr, 3)} (criterion: within "
                f"{cfg.train_error_tolerance:g} of 0.15)",
                paper=_PAPER["train"],
            )
        )
    if "obs" in cfg.methods:
        curve = _mean_curve(runs, "obs", "test_mse")
        means = [c[0] for c in curve]
        k = _argmin(means)
        per_seed = [_argmin([r["test_mse"] for r in runs[s]["curves"]["obs"]]) for s in seeds]
        down = sum(means[i + 1] <= means[i] for i in range(k))
        near = abs(k - paper_k) <= cfg.tolerance * paper_k
        result.claims.append(
            Claim(
                name=f"OBS: test error falls to a minimum near {paper_k} weights removed {tag}",
                held=near and means[k] < means[0],
                detail=f"minimum of the mean test MSE at {k} removed ({means[k]:.4f} vs "
                f"{means[0]:.4f} unpruned; falls at {down} of the {k} steps before it); per-seed "
                f"minima at {per_seed} ({fmt(mean_sd(per_seed))}); near = within "
                f"{cfg.tolerance * paper_k:g} of {paper_k}",
                paper=_PAPER["obs_min" if start == "minimum" else "es_obs"],
            )
        )
    if "obd" in cfg.methods:
        curve = _mean_curve(runs, "obd", "test_mse")
        means = [c[0] for c in curve]
        slope = _slope(means)
        kk = min(paper_k, len(means) - 1)
        if start == "minimum":
            held, crit = slope > 0, "held if the least-squares slope of the mean curve is > 0"
        else:
            held = means[kk] >= means[0]
            crit = f"held if the mean test MSE at {kk} removed is not below the start"
        ups = sum(means[i + 1] > means[i] for i in range(len(means) - 1))
        result.claims.append(
            Claim(
                name=f"OBD with {cfg.retrain_epochs} retraining epochs per step: test error does "
                f"not improve {tag}",
                held=held,
                detail=f"mean test MSE {means[0]:.4f} unpruned, {means[kk]:.4f} at {kk} removed, "
                f"{means[-1]:.4f} at {len(means) - 1}; slope {slope:+.2e} per weight; rises at "
                f"{ups} of {len(means) - 1} steps ({crit})",
                paper=_PAPER["obd" if start == "minimum" else "es_obd"],
            )
        )


def _comparison_and_tables(cfg, start, runs, result, tag):
    """OBS against OBD, and the per-method tables."""
    if "obs" in cfg.methods and "obd" in cfg.methods:
        obs_best = min(c[0] for c in _mean_curve(runs, "obs", "test_mse"))
        obd_best = min(c[0] for c in _mean_curve(runs, "obd", "test_mse")[1:])
        result.claims.append(
            Claim(
                name=f"OBS's best test error below OBD's (removals ≥ 1) {tag}",
                held=obs_best < obd_best,
                detail=f"OBS {obs_best:.4f}, OBD with retraining {obd_best:.4f} (mean curves)",
                paper="OBS's curve lies below OBD's (Fig. 3 of the paper)",
            )
        )
    for method in cfg.methods:
        mse = _mean_curve(runs, method, "test_mse")
        err = _mean_curve(runs, method, "test_error_rate")
        trn = _mean_curve(runs, method, "train_mse")
        for i in range(len(mse)):
            result.tables.setdefault(f"test_error_{start}", []).append(
                {
                    "method": LABELS[method],
                    "removed": i,
                    "test_mse": round(mse[i][0], 5),
                    "test_mse_sd": round(mse[i][1], 5),
                    "test_error_rate_%": round(100 * err[i][0], 2),
                    "train_mse": round(trn[i][0], 5),
                }
            )


def _notes(cfg: Config, bayes: list[float]) -> list[str]:
    return [
        f"Data: {cfg.n_train} training, {cfg.n_test} test (and {cfg.n_val} validation, for early "
        "stopping only) patterns of the paper's mixture per seed; components equiprobable within "
        f"a class (not stated in the paper). Bayes-optimal test MSE {fmt(mean_sd(bayes), 4)}.",
        f"Net: 5-{cfg.hidden}-1 sigmoid, {5 * cfg.hidden + 2 * cfg.hidden + 1} weights (all "
        f"prunable). Minimum: full-batch L-BFGS (≤ {cfg.max_iter} iterations). Early-stopped: "
        f"Adam lr {cfg.es_lr:g}, batch {cfg.es_batch}, best validation MSE, patience "
        f"{cfg.es_patience}. Seeds {list(cfg.seeds)} set data and initialisation.",
        f"OBS: α = {cfg.alpha:g}, H⁻¹ recomputed before each removal, no retraining. OBD: ½hw² "
        f"(Gauss–Newton diagonal), then {cfg.retrain_epochs} epochs of Adam (lr "
        f"{cfg.retrain_lr:g}, batch {cfg.retrain_batch}) per removal. Curves: mean over seeds.",
    ]


def _figures(cfg: Config, runs, bayes: list[float], out: Path) -> list[str]:
    figs = FigureFiles(out, cfg.figure_dpi)
    starts = list(cfg.starts)
    fig = new_figure(1.0 + 4.0 * len(starts), 3.6)
    axes = fig.subplots(1, len(starts), squeeze=False)[0]
    for ax, start in zip(axes, starts):
        for j, method in enumerate(cfg.methods):
            curve = _mean_curve(runs[start], method, "test_mse")
            band(
                ax,
                list(range(len(curve))),
                curve,
                color=f"C{j}",
                label=LABELS[method]
                + (" (no retraining)" if method == "obs" else f" ({cfg.retrain_epochs} epochs)"),
            )
        ax.axvline(PAPER_MIN[start], color="grey", ls=":", lw=1, label="paper's OBS minimum")
        ax.axhline(mean_sd(bayes)[0], color="k", ls="--", lw=0.8, label="Bayes-optimal")
        ax.set_xlabel("weights removed")
        ax.set_ylabel("test MSE")
        ax.set_title(
            "from the minimum" if start == "minimum" else "from the early-stopped net",
            fontsize=9,
        )
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figs.save(fig, "test_error_vs_removed.png")
    return figs.paths
