"""LeCun, Denker & Solla (1990), *Optimal Brain Damage*: figures 1a, 1b and 2 on the 8×8 digits.

The paper pruned a 2,578-parameter shared-weight network trained on ~9,300 zip-code digits
(PAPERS.md §1.4). That data and net are not available offline, so this reproduction trains, for each
seed, a small LeCun-style constrained network with shared weights (:func:`~optbrain.models.digits.
digits_cnn`, 1,898 parameters) and an MLP (:func:`~optbrain.models.digits.digits_mlp`, 64-32-10:
2,410 parameters) on scikit-learn's 1,797 8×8 digits with a fixed stratified split, and then

* **Fig. 1a** deletes weights in small steps *without retraining* by OBD, magnitude and random order
  and records the training objective in dB (10·log10 E);
* **Fig. 1b** compares the OBD prediction (E0 + the sum of the deleted saliencies) with the actual
  objective along the same deletion;
* **Fig. 2** records train and test loss (cross-entropy, our training objective) and the MSE of the
  softmax outputs against one-hot targets (the paper's measure), both in dB, without retraining
  (the Fig. 1a deletion) and with retraining (:func:`~optbrain.loop.iterative_prune`, a geometric
  schedule, a few epochs of retraining per round);
* our own bar: with retraining, at least ``target_factor`` (8) times fewer weights at no more than
  one point of test accuracy lost against the unpruned network, mean over seeds. The round is
  chosen on a **validation set** (the smallest network whose validation accuracy is within the
  point of the unpruned network's), never on the test set: the held-out digits are split
  (stratified) into validation and test halves (``val_fraction``), and the test accuracy lost is
  then read at the chosen round.

Deletion order. The paper deletes "by order of saliency" and plots as prediction "the sum of the
saliencies of the deleted parameters" under the Quadratic-Extremum-Diagonal approximation, which
is an expansion about the trained minimum; we read that as ranking once, at the trained network
(``ranking="initial"``, the default). ``ranking="reestimate"`` recomputes the saliencies on the
damaged network before each deletion step; both variants are always computed and plotted, and the
claims are stated for both.

"Parameters": only weights are deleted (the library's default prunable set); biases are never
deleted but are counted in "remaining parameters" on the figures' axes, as the paper's "free
parameters" include them. Compression factors are given both ways.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import base
from .base import Claim, Progress, Result, Session
from .figures import FigureFiles, band, new_figure
from .stats import fmt, mean_sd, mean_sd_curve, seeds_tag

log = logging.getLogger(__name__)

NAME = "lecun1990"
SUMMARY = (
    "Optimal Brain Damage (LeCun, Denker & Solla 1990), figures 1a, 1b, 2 on the 8x8 digits "
    "with a shared-weight CNN and an MLP"
)
TITLE = "Optimal Brain Damage (LeCun, Denker & Solla 1990) on the 8×8 digits"

SWEEP_METHODS = ("obd_initial", "obd_reestimate", "magnitude", "random")
_LABELS = {
    "obd_initial": "OBD (initial ranking)",
    "obd_reestimate": "OBD (re-estimated each step)",
    "magnitude": "magnitude",
    "random": "random",
    "obd": "OBD",
}
_PAPER = {
    "fig1a": "Fig. 1a: deleting by OBD saliency raises the objective significantly less than by "
    "magnitude; random deletion is so bad it cannot be shown on the same scale "
    "(2578-parameter net, ~9300 training digits)",
    "fig1a_range": "Fig. 1a: OBD curve lowest over the whole range of remaining parameters",
    "fig1b": "Fig. 1b: predicted (sum of deleted saliencies) and actual objective agree well up "
    "to ~800 deleted parameters (~30 %), then split",
    "fig2": "Fig. 2: after retraining, train and test log-MSE stay almost the same up to 1500 "
    "deleted parameters (60 % of the total)",
    "bar": "Conclusion: parameters reduced by a factor of four interactively plus a factor of "
    "more than two by automatic OBD (> 8× overall), accuracy slightly increased",
}


@dataclass
class Config(base.Config):
    """Setting of the reproduction; the defaults are the full run (5 seeds, both nets).

    Fractions are of the prunable weights (biases are never deleted). ``rounds`` rounds of a
    geometric schedule reach ``final_sparsity``; each round retrains ``retrain_epochs`` epochs.
    ``curvature`` picks the diagonal for OBD: ``"ggn"`` (exact Gauss–Newton diagonal),
    ``"lecun"`` (the paper's recursion, Levenberg–Marquardt form), ``"empirical_fisher"``.
    """

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    models: tuple[Literal["cnn", "mlp"], ...] = ("cnn", "mlp")
    mlp_hidden: tuple[int, ...] = (32,)
    test_size: float = 0.3
    val_fraction: float = 0.5
    split_seed: int = 0
    epochs: int = 60
    lr: float = 3e-3
    batch_size: int = 32
    weight_decay: float = 0.0
    curvature: Literal["ggn", "lecun", "empirical_fisher"] = "ggn"
    ranking: Literal["initial", "reestimate"] = "initial"
    sweep_step: float = 0.025
    sweep_max: float = 0.95
    claim_fractions: tuple[float, ...] = (0.5, 0.8)
    ordering_tol_db: float = 0.25
    agreement_db: float = 1.0
    agreement_min_fraction: float = 0.2
    agreement_ratio: float = 2.0
    retrain: bool = True
    retrain_methods: tuple[Literal["obd", "magnitude"], ...] = ("obd",)
    rounds: int = 14
    final_sparsity: float = 0.97
    retrain_epochs: int = 30
    retrain_lr: float = 1e-3
    little_loss_fraction: float = 0.6
    little_loss_db: float = 1.0
    accuracy_drop: float = 0.01
    target_factor: float = 8.0
    figure_dpi: int = 90

    @classmethod
    def quick(cls) -> Config:
        """One seed, both nets, coarser deletion steps and a short retraining schedule."""
        return cls(seeds=(0,), sweep_step=0.05, rounds=6, retrain_epochs=3, final_sparsity=0.9)

    def validate(self) -> None:
        need = self.need
        self.need_seeds()
        need(len(self.models) > 0, "models", "give at least one of cnn, mlp")
        need(len(set(self.models)) == len(self.models), "models", "models must be distinct")
        need(all(h >= 1 for h in self.mlp_hidden), "mlp_hidden", "layer sizes must be >= 1")
        need(0.0 < self.test_size < 1.0, "test_size", "must be in (0, 1)")
        need(0.0 < self.val_fraction < 1.0, "val_fraction", "must be in (0, 1)")
        need(self.epochs >= 1, "epochs", "must be >= 1")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(0.0 < self.sweep_max < 1.0, "sweep_max", "must be in (0, 1)")
        need(0.0 < self.sweep_step <= self.sweep_max, "sweep_step", "must be in (0, sweep_max]")
        need(
            len(self.claim_fractions) > 0
            and all(0.0 < f <= self.sweep_max for f in self.claim_fractions),
            "claim_fractions",
            "give fractions in (0, sweep_max]",
        )
        need(self.ordering_tol_db >= 0, "ordering_tol_db", "must be >= 0")
        need(self.agreement_db > 0, "agreement_db", "must be > 0")
        need(0 < self.agreement_min_fraction < 1, "agreement_min_fraction", "must be in (0, 1)")
        need(self.agreement_ratio > 1, "agreement_ratio", "must be > 1")
        need(len(self.retrain_methods) > 0, "retrain_methods", "give at least one method")
        need(self.rounds >= 1, "rounds", "must be >= 1")
        need(0.0 < self.final_sparsity < 1.0, "final_sparsity", "must be in (0, 1)")
        need(self.retrain_epochs >= 0, "retrain_epochs", "must be >= 0")
        need(self.retrain_lr > 0, "retrain_lr", "must be > 0")
        need(0 < self.little_loss_fraction < 1, "little_loss_fraction", "must be in (0, 1)")
        need(self.little_loss_db > 0, "little_loss_db", "must be > 0")
        need(0 <= self.accuracy_drop < 1, "accuracy_drop", "must be in [0, 1)")
        need(self.target_factor > 1, "target_factor", "must be > 1")
        need(20 <= self.figure_dpi <= 300, "figure_dpi", "must be in [20, 300]")


# --------------------------------------------------------------------------- small helpers
def db(x: float) -> float:
    """10·log10(x); NaN for x <= 0."""
    return 10.0 * math.log10(x) if x > 0 and math.isfinite(x) else math.nan


def _pct(f: float) -> str:
    return f"{100 * f:.1f}".rstrip("0").rstrip(".") + " %"


@dataclass
class _Data:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_val: Tensor
    y_val: Tensor


def _load(cfg: Config, model_name: str) -> _Data:
    from sklearn.model_selection import train_test_split

    from ..data.digits import load_digits_split

    d = load_digits_split(test_size=cfg.test_size, seed=cfg.split_seed, flat=model_name == "mlp")
    # the held-out digits: a stratified validation part (selection) and a test part (reporting)
    idx = torch.arange(d.y_test.shape[0])
    i_test, i_val = train_test_split(
        idx.numpy(),
        test_size=cfg.val_fraction,
        random_state=cfg.split_seed,
        stratify=d.y_test.numpy(),
    )
    i_test, i_val = torch.as_tensor(i_test), torch.as_tensor(i_val)
    return _Data(
        d.x_train, d.y_train, d.x_test[i_test], d.y_test[i_test], d.x_test[i_val], d.y_test[i_val]
    )


def _build(cfg: Config, model_name: str, seed: int) -> nn.Module:
    from ..models.digits import digits_cnn, digits_mlp

    if model_name == "cnn":
        return digits_cnn(seed=seed)
    return digits_mlp(hidden=cfg.mlp_hidden, activation="tanh", seed=seed)


def _pruner(cfg: Config, method: str, seed: int):
    from ..curvature import ESTIMATORS
    from ..pruners import magnitude, obd, random

    # the paper's procedure: one step per call, no guard keeping a weight per layer
    if method.startswith("obd"):
        return obd(
            ESTIMATORS[cfg.curvature](), weight_decay=cfg.weight_decay, steps=None, min_kept=0
        )
    if method == "magnitude":
        return magnitude(min_kept=0)
    if method == "random":
        return random(seed=10_000 + seed, min_kept=0)
    raise ValueError(f"unknown method {method!r}")


@torch.no_grad()
def _metrics(model: nn.Module, data: _Data) -> dict[str, float]:
    """Cross-entropy (the training objective), accuracy and MSE of the softmax outputs against
    one-hot targets (summed over the 10 outputs, averaged over samples: LeCun's E without ½)."""
    from ..problem import eval_mode

    out: dict[str, float] = {}
    with eval_mode(model):
        for split, x, y in (
            ("train", data.x_train, data.y_train),
            ("val", data.x_val, data.y_val),
            ("test", data.x_test, data.y_test),
        ):
            logits = model(x).to(torch.float64)
            out[f"{split}_loss"] = float(nn.functional.cross_entropy(logits, y))
            out[f"{split}_accuracy"] = float((logits.argmax(1) == y).to(torch.float64).mean())
            onehot = nn.functional.one_hot(y, logits.shape[1]).to(torch.float64)
            out[f"{split}_mse"] = float((logits.softmax(1) - onehot).square().sum(1).mean())
    return out


def _problem(model: nn.Module, data: _Data):
    from ..problem import Problem

    return Problem(model, nn.CrossEntropyLoss(), [(data.x_train, data.y_train)])


def _retrain_schedule(cfg: Config):
    from ..schedule import geometric

    rate = 1.0 - (1.0 - cfg.final_sparsity) ** (1.0 / cfg.rounds)
    return geometric(rate, final=cfg.final_sparsity)


def _sweep_fractions(cfg: Config) -> list[float]:
    n = int(math.floor(cfg.sweep_max / cfg.sweep_step + 1e-9))
    fr = {round(k * cfg.sweep_step, 9) for k in range(0, n + 1)}
    fr |= {round(f, 9) for f in cfg.claim_fractions}
    fr.add(round(cfg.little_loss_fraction, 9))
    if cfg.retrain:
        sched = _retrain_schedule(cfg)
        fr |= {round(sched(r), 9) for r in range(1, cfg.rounds + 1)}
    return sorted(fr)


# --------------------------------------------------------------------------- one net, one seed
def _sweep(
    cfg: Config, method: str, model: nn.Module, data: _Data, fractions: list[float], seed: int
) -> list[dict[str, Any]]:
    """Delete along ``fractions`` without retraining; one row of measurements per fraction."""
    from ..masking import Mask, apply_

    pruner = _pruner(cfg, method, seed)
    work = copy.deepcopy(model)
    problem = _problem(work, data)
    n_params = sum(p.numel() for p in work.parameters())
    ones = Mask.ones(work)
    rows: list[dict[str, Any]] = []
    if method == "obd_reestimate":  # re-estimate after every deletion: the elimination loop
        from ..elimination import eliminate

        rows = [
            _row(f, ones, n_params, problem.objective(), 0.0, work, data)
            for f in fractions
            if f <= 0
        ]
        positive = [f for f in fractions if f > 0]
        total = [0.0]

        def after(step) -> None:
            total[0] += step.info.predicted_increase
            obj = problem.objective()
            rows.append(_row(step.target, step.new, n_params, obj, total[0], work, data))

        eliminate(
            work,
            pruner,
            lambda r, m: positive[r - 1] if r <= len(positive) else None,
            make_problem=lambda m: problem,
            mask=ones,
            after=after,
            apply=apply_,
        )
        return rows
    scores = pruner.scores(problem, ones)
    state = {k: v.clone() for k, v in work.state_dict().items()}
    for f in fractions:
        mask = pruner.selector(scores, ones, f) if f > 0 else ones
        work.load_state_dict(state)
        apply_(work, mask)
        predicted = 0.0
        for k in mask.names:
            deleted = ~mask[k]
            if deleted.any():
                predicted += float(scores[k].detach().to(torch.float64)[deleted].sum())
        rows.append(_row(f, mask, n_params, problem.objective(), predicted, work, data))
    return rows


def _row(f, mask, n_params, objective, predicted, model, data) -> dict[str, Any]:
    return {
        "fraction": f,
        "remaining": mask.kept(),
        "total": mask.total(),
        "remaining_params": n_params - mask.pruned(),
        "objective": objective,
        "predicted_increase": predicted,
        **_metrics(model, data),
    }


def _train(cfg: Config, model: nn.Module, data: _Data, epochs: int, lr: float, seed: int) -> None:
    """Adam on the training cross-entropy in place, batches shuffled from ``seed``."""
    from torch.utils.data import DataLoader, TensorDataset

    from ..train import train

    loader = DataLoader(
        TensorDataset(data.x_train, data.y_train),
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    train(
        model,
        loader,
        nn.CrossEntropyLoss(),
        epochs=epochs,
        lr=lr,
        weight_decay=cfg.weight_decay,
        seed=seed,
    )


def _train_base(cfg: Config, model_name: str, seed: int, data: _Data) -> nn.Module:
    model = _build(cfg, model_name, seed)
    _train(cfg, model, data, cfg.epochs, cfg.lr, seed)
    return model


def _retrain_run(
    cfg: Config,
    method: str,
    model: nn.Module,
    data: _Data,
    seed: int,
    model_name: str,
    tick: Callable[[str], None],
):
    from ..loop import iterative_prune

    work = copy.deepcopy(model)

    def retrain(m: nn.Module, r: int) -> None:
        _train(cfg, m, data, cfg.retrain_epochs, cfg.retrain_lr, seed * 1000 + r)

    return iterative_prune(
        work,
        _pruner(cfg, method, seed),
        _retrain_schedule(cfg),
        rounds=cfg.rounds,
        make_problem=lambda m: _problem(m, data),
        retrain=retrain if cfg.retrain_epochs > 0 else None,
        evaluate=lambda m: _metrics(m, data),
        config={"experiment": NAME, "model": model_name, "method": method, "seed": seed},
        progress=lambda r, n: tick(f"{model_name} seed {seed}: {method} retrain round {r}/{n}"),
    )


# --------------------------------------------------------------------------- the experiment
def run(config: Config, out_dir: str | Path, progress: Progress | None = None) -> Result:
    """Run the reproduction into ``out_dir`` (see the module docstring) and return the result."""
    cfg = config
    per_seed = 2 + (cfg.rounds * len(cfg.retrain_methods) if cfg.retrain else 0)
    session = Session(cfg, out_dir, len(cfg.models) * len(cfg.seeds) * per_seed + 1, progress, log)
    tick = session.tick
    fractions = _sweep_fractions(cfg)

    # runs[model][seed] = {"base": metrics, "sweeps": {method: rows}, "histories": {method: H}}
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    sizes: dict[str, dict[str, int]] = {}
    for model_name in cfg.models:
        data = _load(cfg, model_name)
        runs[model_name] = {}
        for seed in cfg.seeds:
            model = _train_base(cfg, model_name, seed, data)
            base_metrics = _metrics(model, data)
            tick(f"{model_name} seed {seed}: trained")
            n_params = sum(p.numel() for p in model.parameters())
            from ..masking import Mask

            n_weights = Mask.ones(model).total()
            sizes[model_name] = {"params": n_params, "weights": n_weights}
            sweeps = {m: _sweep(cfg, m, model, data, fractions, seed) for m in SWEEP_METHODS}
            session.write_json(
                f"sweeps/{model_name}_seed{seed}.json",
                {"fractions": fractions, "base": base_metrics, **sweeps},
            )
            tick(f"{model_name} seed {seed}: deletion without retraining")
            histories = {}
            if cfg.retrain:
                for method in cfg.retrain_methods:
                    h = _retrain_run(cfg, method, model, data, seed, model_name, tick)
                    h.save(session.path(f"histories/{model_name}_{method}_seed{seed}.json"))
                    histories[method] = h
            runs[model_name][seed] = {
                "base": base_metrics,
                "sweeps": sweeps,
                "histories": histories,
            }

    result = session.result(NAME, TITLE)
    for model_name in cfg.models:
        _analyse(cfg, model_name, runs[model_name], sizes[model_name], result)
    result.notes = _notes(cfg, sizes)
    return session.finish(result, _figures(cfg, runs, sizes, session.out))


# --------------------------------------------------------------------------- analysis
def _curve(runs: dict[int, dict[str, Any]], method: str, key: str, fn=db):
    """Per fraction: (mean, std) over seeds of fn(row[key]) along the sweep of ``method``."""
    return mean_sd_curve([[fn(row[key]) for row in r["sweeps"][method]] for r in runs.values()])


def _sweep_col(runs, method: str, key: str) -> list[Any]:
    first = next(iter(runs.values()))
    return [row[key] for row in first["sweeps"][method]]


def _hist_curve(runs, method: str, key: str, fn=db):
    """Per round: (mean, std) over seeds of fn(metrics[key]) after retraining."""
    return mean_sd_curve(
        [[fn(rec.metrics[key]) for rec in r["histories"][method].records] for r in runs.values()]
    )


def _at(fractions: list[float], f: float) -> int:
    return min(range(len(fractions)), key=lambda i: abs(fractions[i] - f))


@dataclass
class _Analysis:
    """What every claim of one model's analysis reads."""

    cfg: Config
    model_name: str
    runs: dict
    size: dict
    result: Result
    seeds: list = field(init=False)
    ns: int = field(init=False)
    fr: list = field(init=False)
    main: str = field(init=False)
    other: str = field(init=False)
    obj: dict = field(init=False)
    tag: str = field(init=False)

    def __post_init__(self) -> None:
        self.seeds = list(self.runs)
        self.ns = len(self.seeds)
        self.fr = _sweep_col(self.runs, "obd_initial", "fraction")
        self.main = "obd_initial" if self.cfg.ranking == "initial" else "obd_reestimate"
        self.other = "obd_reestimate" if self.main == "obd_initial" else "obd_initial"
        self.obj = {m: _curve(self.runs, m, "objective") for m in SWEEP_METHODS}
        self.tag = seeds_tag(self.ns, self.model_name)


def _analyse(cfg, model_name, runs, size, result: Result) -> None:
    a = _Analysis(cfg, model_name, runs, size, result)
    _fig1a_ordering(a)
    _fig1a_range(a)
    pred = _fig1b(a)
    _fig1_table(a, pred)
    if not cfg.retrain:
        return
    for method in cfg.retrain_methods:
        _fig2(a, method)
    for method in cfg.retrain_methods:
        _compression(a, method)


def _fig1a_ordering(a: _Analysis) -> None:
    """Fig. 1a ordering at the claim fractions, for both OBD variants."""
    cfg = a.cfg
    runs = a.runs
    result = a.result
    seeds = a.seeds
    ns = a.ns
    fr = a.fr
    main = a.main
    other = a.other
    obj = a.obj
    tag = a.tag
    for variant in (main, other):
        parts, ok = [], True
        for f in cfg.claim_fractions:
            i = _at(fr, f)
            o, m, r = obj[variant][i][0], obj["magnitude"][i][0], obj["random"][i][0]
            ok &= o < m < r
            n_ok = sum(
                db(runs[s]["sweeps"][variant][i]["objective"])
                < db(runs[s]["sweeps"]["magnitude"][i]["objective"])
                < db(runs[s]["sweeps"]["random"][i]["objective"])
                for s in seeds
            )
            parts.append(
                f"{_pct(fr[i])} deleted: OBD {o:.1f} dB, magnitude {m:.1f}, random {r:.1f} "
                f"(ordered in {n_ok}/{ns} seeds)"
            )
        which = (
            "initial ranking" if variant == "obd_initial" else "saliencies re-estimated per step"
        )
        result.claims.append(
            Claim(
                name=f"Fig. 1a ordering OBD < magnitude < random, {which} {tag}",
                held=ok,
                detail="; ".join(parts) + " (training CE in dB, mean over seeds)",
                paper=_PAPER["fig1a"]
                + ("" if variant == main else " [variant, not the paper's default here]"),
            )
        )


def _fig1a_range(a: _Analysis) -> None:
    """Fig. 1a over the whole range (main variant)."""
    cfg = a.cfg
    result = a.result
    fr = a.fr
    main = a.main
    obj = a.obj
    tag = a.tag
    pts = [i for i, f in enumerate(fr) if 0 < f <= cfg.sweep_max + 1e-9]
    below = [i for i in pts if obj[main][i][0] <= obj["magnitude"][i][0] + cfg.ordering_tol_db]
    worst = [
        i
        for i in pts
        if obj["random"][i][0] > max(obj[main][i][0], obj["magnitude"][i][0]) - cfg.ordering_tol_db
    ]
    bad = [fr[i] for i in pts if i not in below]
    detail = (
        f"OBD ≤ magnitude + {cfg.ordering_tol_db} dB at {len(below)}/{len(pts)} deletion levels "
        f"in (0, {_pct(cfg.sweep_max)}]; random worst at {len(worst)}/{len(pts)}"
    )
    if bad:
        detail += f"; OBD above magnitude from {_pct(min(bad))} deleted (at {len(bad)} levels)"
    result.claims.append(
        Claim(
            name=f"Fig. 1a OBD lowest over the whole range {tag}",
            held=len(below) == len(pts) and len(worst) == len(pts),
            detail=detail,
            paper=_PAPER["fig1a_range"],
        )
    )


def _fig1b(a: _Analysis) -> list[float]:
    """Fig. 1b: predicted vs actual objective (main variant), in dB."""
    cfg = a.cfg
    runs = a.runs
    size = a.size
    result = a.result
    seeds = a.seeds
    ns = a.ns
    fr = a.fr
    main = a.main
    obj = a.obj
    tag = a.tag
    e0 = [runs[s]["sweeps"][main][0]["objective"] for s in seeds]
    pred = [
        mean_sd(
            [
                db(e0[j] + runs[s]["sweeps"][main][i]["predicted_increase"])
                for j, s in enumerate(seeds)
            ]
        )[0]
        for i in range(len(fr))
    ]
    gap = [abs(pred[i] - obj[main][i][0]) for i in range(len(fr))]
    agree = 0.0
    for i, f in enumerate(fr):
        if gap[i] > cfg.agreement_db:
            break
        agree = f
    diverged = any(g > cfg.agreement_db for g in gap)
    ratios, strict_ok = [], True
    for f in (0.1, 0.2, 0.3, 0.5):
        i = _at(fr, f)
        act = sum(runs[s]["sweeps"][main][i]["objective"] - e0[j] for j, s in enumerate(seeds)) / ns
        prd = sum(runs[s]["sweeps"][main][i]["predicted_increase"] for s in seeds) / ns
        ratio = prd / act if act > 0 else math.nan
        if f <= 0.3 + 1e-9:
            strict_ok &= 1.0 / cfg.agreement_ratio <= ratio <= cfg.agreement_ratio
        ratios.append((fr[i], act, prd, ratio))
    result.claims.append(
        Claim(
            name=f"Fig. 1b prediction agrees for small deletions, then diverges {tag}",
            held=agree >= cfg.agreement_min_fraction and diverged,
            detail=(
                f"E0 + Σ deleted saliencies within {cfg.agreement_db} dB of the actual objective "
                f"up to {_pct(agree)} deleted ({round(agree * size['weights'])} weights)"
                + (f", gap up to {max(gap):.1f} dB beyond" if diverged else ", never diverges")
                + f"; held if agreement ≥ {_pct(cfg.agreement_min_fraction)} and divergence later"
            ),
            paper=_PAPER["fig1b"],
        )
    )
    result.claims.append(
        Claim(
            name=f"Fig. 1b, stricter: predicted ΔE within {cfg.agreement_ratio:g}× of the actual "
            f"ΔE up to 30 % deleted {tag}",
            held=strict_ok,
            detail="predicted / actual objective increase: "
            + "; ".join(f"{_pct(f)}: {p:.2g} / {a:.2g} = {r:.2f}" for f, a, p, r in ratios),
            paper=_PAPER["fig1b"] + " [read on a dB scale, where small ΔE are invisible]",
        )
    )
    return pred


def _fig1_table(a: _Analysis, pred: list[float]) -> None:
    """The table of Fig. 1a/1b."""
    model_name = a.model_name
    runs = a.runs
    result = a.result
    fr = a.fr
    main = a.main
    obj = a.obj
    rows = []
    for i, f in enumerate(fr):
        row = {
            "model": model_name,
            "deleted": round(f, 4),
            "remaining_params": _sweep_col(runs, main, "remaining_params")[i],
        }
        for m in SWEEP_METHODS:
            row[f"{m}_dB"] = round(obj[m][i][0], 3)
            row[f"{m}_sd"] = round(obj[m][i][1], 3)
        row["predicted_dB"] = round(pred[i], 3)
        rows.append(row)
    result.tables.setdefault("fig1a_fig1b_objective_dB", []).extend(rows)


def _fig2(a: _Analysis, method: str) -> None:
    """Fig. 2 with retraining: the round table, and for OBD the little-loss claim."""
    model_name = a.model_name
    runs = a.runs
    result = a.result
    seeds = a.seeds
    fr = a.fr
    main = a.main
    hs = {s: runs[s]["histories"][method] for s in seeds}
    n = min(len(h.records) for h in hs.values())
    sp = [hs[seeds[0]].records[i].sparsity for i in range(n)]
    tg = [hs[seeds[0]].records[i].target for i in range(n)]  # = a sweep fraction
    cols = {
        k: _hist_curve(runs, method, k, fn)
        for k, fn in (
            ("train_mse", db),
            ("test_mse", db),
            ("train_loss", db),
            ("test_loss", db),
            ("test_accuracy", float),
            ("train_accuracy", float),
        )
    }
    for i in range(n):
        j = _at(fr, tg[i])
        nr = runs[seeds[0]]["sweeps"][main][j]
        result.tables.setdefault("fig2_retraining", []).append(
            {
                "model": model_name,
                "method": method,
                "round": i,
                "deleted": round(sp[i], 4),
                "remaining_params": hs[seeds[0]].records[i].remaining_params,
                "train_mse_dB": round(cols["train_mse"][i][0], 2),
                "test_mse_dB": round(cols["test_mse"][i][0], 2),
                "train_ce_dB": round(cols["train_loss"][i][0], 2),
                "test_ce_dB": round(cols["test_loss"][i][0], 2),
                "test_acc": round(cols["test_accuracy"][i][0], 4),
                "test_acc_sd": round(cols["test_accuracy"][i][1], 4),
                "no_retrain_test_mse_dB": round(
                    mean_sd([db(runs[s]["sweeps"][main][j]["test_mse"]) for s in seeds])[0],
                    2,
                )
                if abs(nr["fraction"] - tg[i]) < 1e-6
                else math.nan,
                "no_retrain_test_acc": round(
                    mean_sd([runs[s]["sweeps"][main][j]["test_accuracy"] for s in seeds])[0],
                    4,
                )
                if abs(nr["fraction"] - tg[i]) < 1e-6
                else math.nan,
            }
        )
    if method == "obd":
        _little_loss(a, cols, sp, tg, n)


def _little_loss(a: _Analysis, cols: dict, sp: list, tg: list, n: int) -> None:
    """Little loss up to 60 %: retrained test MSE within little_loss_db and test accuracy within
    accuracy_drop of the unpruned net, at every round up to the level."""
    cfg, runs, result, seeds, fr, main, tag = a.cfg, a.runs, a.result, a.seeds, a.fr, a.main, a.tag
    base_mse, base_acc = cols["test_mse"][0][0], cols["test_accuracy"][0][0]
    base_tr = cols["train_mse"][0][0]
    ok_to = 0.0
    for i in range(1, n):
        if (
            cols["test_mse"][i][0] <= base_mse + cfg.little_loss_db
            and cols["test_accuracy"][i][0] >= base_acc - cfg.accuracy_drop - 1e-12
        ):
            ok_to = sp[i]
        else:
            break
    i60 = min(range(1, n), key=lambda i: abs(sp[i] - cfg.little_loss_fraction))
    j60 = _at(fr, tg[i60])
    nr_mse = mean_sd([db(runs[s]["sweeps"][main][j60]["test_mse"]) for s in seeds])[0]
    result.claims.append(
        Claim(
            name=f"Fig. 2 with retraining, little loss up to {_pct(cfg.little_loss_fraction)} "
            f"deleted {tag}",
            held=ok_to >= cfg.little_loss_fraction - 1e-9,
            detail=(
                f"retrained test MSE within {cfg.little_loss_db} dB and test accuracy within "
                f"{100 * cfg.accuracy_drop:.0f} point of the unpruned net up to {_pct(ok_to)} "
                f"deleted; at {_pct(sp[i60])}: test MSE {cols['test_mse'][i60][0]:.2f} dB "
                f"(unpruned {base_mse:.2f}: {cols['test_mse'][i60][0] - base_mse:+.2f} dB; "
                f"without retraining {nr_mse:.2f}), train MSE "
                f"{cols['train_mse'][i60][0]:.1f} dB (unpruned {base_tr:.1f}), test accuracy "
                f"{100 * cols['test_accuracy'][i60][0]:.1f} % (unpruned {100 * base_acc:.1f} %)"
            ),
            paper=_PAPER["fig2"],
        )
    )


def _compression(a: _Analysis, method: str) -> None:
    """The compression bar per method (a claim for OBD): the round is chosen on the validation
    set, the test accuracy lost read there."""
    cfg, size = a.cfg, a.size
    tol = cfg.accuracy_drop + 1e-12
    factors, factors_all, contiguous, drops = [], [], [], []
    for s in a.seeds:
        hist = a.runs[s]["histories"][method]
        recs = hist.records
        a0 = recs[0].metrics["test_accuracy"]
        best, cont = bar_choice(hist, tol)
        f_w = best.total / max(best.remaining, 1)
        factors.append(f_w)
        factors_all.append(size["params"] / max(best.remaining_params, 1))
        contiguous.append(cont.total / max(cont.remaining, 1))
        drops.append(a0 - best.metrics["test_accuracy"])
        a.result.tables.setdefault("compression", []).append(
            {
                "model": a.model_name,
                "method": method,
                "seed": s,
                "chosen_round": best.round,
                "unpruned_val_acc": round(recs[0].metrics["val_accuracy"], 4),
                "val_acc_there": round(best.metrics["val_accuracy"], 4),
                "remaining_weights": best.remaining,
                "remaining_params": best.remaining_params,
                "factor_weights": round(f_w, 2),
                "factor_params": round(factors_all[-1], 2),
                "unpruned_test_acc": round(a0, 4),
                "test_acc_there": round(best.metrics["test_accuracy"], 4),
                "factor_weights_contiguous": round(contiguous[-1], 2),
            }
        )
    if method == "obd":
        a.result.claims.append(_bar_claim(a, factors, factors_all, contiguous, drops))


def _bar_claim(a: _Analysis, factors, factors_all, contiguous, drops) -> Claim:
    cfg, size = a.cfg, a.size
    fw, fa, fc = mean_sd(factors), mean_sd(factors_all), mean_sd(contiguous)
    drop = mean_sd(drops)
    cap = 1.0 / (1.0 - _retrain_schedule(cfg)(cfg.rounds))
    return Claim(
        name=f"Our bar: ≥ {cfg.target_factor:g}× fewer parameters at ≤ "
        f"{100 * cfg.accuracy_drop:.0f} point test accuracy lost, with retraining, "
        f"chosen on validation {a.tag}",
        held=fw[0] >= cfg.target_factor and drop[0] <= cfg.accuracy_drop + 1e-12,
        detail=(
            f"round chosen on the validation set (the smallest net within "
            f"{100 * cfg.accuracy_drop:.0f} point of the best validation accuracy): "
            f"compression of the {size['weights']} weights {fmt(fw)}× (per seed "
            f"{', '.join(f'{x:.1f}' for x in factors)}), test accuracy lost there "
            f"{fmt((100 * drop[0], 100 * drop[1]))} points (per seed "
            f"{', '.join(f'{100 * x:+.1f}' for x in drops)}); counting the never-deleted "
            f"biases too ({size['params']} parameters): {fmt(fa)}×; stopping before the "
            f"first round that falls out on validation: {fmt(fc)}×; schedule reaches at "
            f"most {cap:.1f}×; held if ≥ {cfg.target_factor:g}× and ≤ "
            f"{100 * cfg.accuracy_drop:.0f} point lost on the test set"
        ),
        paper=_PAPER["bar"],
    )


def bar_choice(history, tolerance: float):
    """The rounds the bar reads, both chosen on the validation accuracy only: the smallest
    network within ``tolerance`` of the best round's (``History.select("smallest_within")``),
    and the conservative one — the last round before the first that falls out of it."""
    best = history.select("smallest_within", tolerance=tolerance, metric="metrics.val_accuracy")
    recs = history.records
    v_best = max(r.metrics["val_accuracy"] for r in recs)
    cont = recs[0]
    for rec in recs[1:]:
        if rec.metrics["val_accuracy"] < v_best - tolerance:
            break
        cont = rec
    return best, cont


def _notes(cfg: Config, sizes: dict[str, dict[str, int]]) -> list[str]:
    nets = []
    for m, s in sizes.items():
        desc = (
            "shared-weight CNN conv(1→8,3×3)·LeCun tanh·avgpool·conv(8→16,3×3)·LeCun tanh·"
            "avgpool·linear(64→10)"
            if m == "cnn"
            else f"MLP 64-{'-'.join(str(h) for h in cfg.mlp_hidden)}-10 (tanh)"
        )
        nets.append(f"{m}: {desc}, {s['params']} parameters of which {s['weights']} weights")
    main = "initial ranking" if cfg.ranking == "initial" else "re-estimated saliencies"
    return [
        f"Data: scikit-learn `load_digits` (1797 8×8 digits, pixels/16), one stratified split "
        f"(test_size={cfg.test_size}, seed {cfg.split_seed}), the held-out part split "
        f"(stratified) into validation ({cfg.val_fraction:.0%}, for choosing rounds) and test "
        f"(for reporting); seeds {list(cfg.seeds)} vary "
        "initialisation and batch order.",
        "Nets: " + "; ".join(nets) + ".",
        f"Training: Adam lr {cfg.lr}, batch {cfg.batch_size}, {cfg.epochs} epochs, weight decay "
        f"{cfg.weight_decay}; objective = mean cross-entropy on the training set (CE); "
        "dB = 10·log10. MSE = mean over samples of Σ_c (softmax_c − onehot_c)² (the paper's "
        "measure, computed on our CE-trained nets).",
        f"OBD: s = ½ h w² with the {cfg.curvature} diagonal; deletion without retraining by "
        f"{main} (the default reading of the paper; the other variant is also shown); "
        f"steps of {_pct(cfg.sweep_step)} of the weights. Only weights are deleted; biases are "
        "counted in 'remaining parameters'.",
        f"Retraining: {cfg.rounds} rounds of a geometric schedule to {_pct(cfg.final_sparsity)} "
        f"of the weights, saliencies recomputed each round, {cfg.retrain_epochs} epochs of Adam "
        f"(lr {cfg.retrain_lr}) per round; methods {list(cfg.retrain_methods)}.",
    ]


# --------------------------------------------------------------------------- figures
_COLORS = {
    "obd_initial": "C0",
    "obd_reestimate": "C2",
    "magnitude": "C1",
    "random": "C3",
    "obd": "C0",
}


def _figures(cfg: Config, runs, sizes, out: Path) -> list[str]:
    main = "obd_initial" if cfg.ranking == "initial" else "obd_reestimate"
    models = list(cfg.models)
    figs = FigureFiles(out, cfg.figure_dpi)
    _figure_1a(cfg, runs, sizes, main, models, figs)
    _figure_1b(cfg, runs, sizes, main, models, figs)
    if not cfg.retrain or "obd" not in cfg.retrain_methods:
        return figs.paths
    _figure_2(cfg, runs, sizes, main, models, figs)
    _figure_accuracy(cfg, runs, sizes, main, models, figs)
    return figs.paths


def _figure_1a(cfg: Config, runs, sizes, main: str, models: list, figs: FigureFiles) -> None:
    """Fig. 1a: training objective against remaining parameters, no retraining."""
    fig = new_figure(4.6 * len(models), 3.6)
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, m in zip(axes, models):
        x = _sweep_col(runs[m], main, "remaining_params")
        for meth in SWEEP_METHODS:
            style = "--" if meth.startswith("obd") and meth != main else "-"
            band(
                ax,
                x,
                _curve(runs[m], meth, "objective"),
                color=_COLORS[meth],
                ls=style,
                label=_LABELS[meth],
            )
        ax.set_title(f"Fig. 1a — {m}, no retraining")
        ax.set_xlabel("remaining parameters (weights + biases)")
        ax.set_ylabel("training objective (CE) [dB]")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figs.save(fig, "fig1a_objective.png")


def _figure_1b(cfg: Config, runs, sizes, main: str, models: list, figs: FigureFiles) -> None:
    """Fig. 1b: predicted against actual objective."""
    fig = new_figure(4.6 * len(models), 3.6)
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, m in zip(axes, models):
        x = _sweep_col(runs[m], main, "remaining_params")
        seeds = list(runs[m])
        e0 = {s: runs[m][s]["sweeps"][main][0]["objective"] for s in seeds}
        pred = [
            mean_sd(
                [db(e0[s] + runs[m][s]["sweeps"][main][i]["predicted_increase"]) for s in seeds]
            )
            for i in range(len(x))
        ]
        band(ax, x, _curve(runs[m], main, "objective"), color="C0", label="actual")
        band(ax, x, pred, color="C4", ls="--", label="predicted: E0 + Σ deleted saliencies")
        total_w = sizes[m]["weights"]
        ax.axvline(
            sizes[m]["params"] - 0.3 * total_w, color="grey", lw=0.8, ls=":", label="30 % deleted"
        )
        ax.set_title(f"Fig. 1b — {m}, {_LABELS[main]}")
        ax.set_xlabel("remaining parameters (weights + biases)")
        ax.set_ylabel("training objective (CE) [dB]")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figs.save(fig, "fig1b_predicted_vs_actual.png")


def _figure_2(cfg: Config, runs, sizes, main: str, models: list, figs: FigureFiles) -> None:
    """Fig. 2: rows = model, columns = train / test, with and without retraining."""
    fig = new_figure(9.2, 3.4 * len(models))
    axes = fig.subplots(len(models), 2, squeeze=False)
    for row, m in zip(axes, models):
        x = _sweep_col(runs[m], main, "remaining_params")
        seeds = list(runs[m])
        hx = [r.remaining_params for r in runs[m][seeds[0]]["histories"]["obd"].records]
        for ax, split in zip(row, ("train", "test")):
            for key, color, name in ((f"{split}_mse", "C0", "MSE"), (f"{split}_loss", "C1", "CE")):
                band(
                    ax,
                    x,
                    _curve(runs[m], main, key),
                    color=color,
                    ls="--",
                    label=f"{name}, no retraining",
                )
                band(
                    ax,
                    hx,
                    _hist_curve(runs[m], "obd", key),
                    color=color,
                    marker="o",
                    ms=3,
                    label=f"{name}, with retraining",
                )
            ax.axvline(
                sizes[m]["params"] - cfg.little_loss_fraction * sizes[m]["weights"],
                color="grey",
                lw=0.8,
                ls=":",
                label=f"{_pct(cfg.little_loss_fraction)} deleted",
            )
            ax.set_title(f"Fig. 2{'a' if split == 'train' else 'b'} — {m}, {split} set (OBD)")
            ax.set_xlabel("remaining parameters (weights + biases)")
            ax.set_ylabel("log loss [dB]")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    figs.save(fig, "fig2_retraining.png")


def _figure_accuracy(cfg: Config, runs, sizes, main: str, models: list, figs: FigureFiles) -> None:
    """Test accuracy against remaining parameters, and the bar."""
    fig = new_figure(4.6 * len(models), 3.6)
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, m in zip(axes, models):
        x = _sweep_col(runs[m], main, "remaining_params")
        seeds = list(runs[m])
        pct = lambda v: 100 * v  # noqa: E731
        band(
            ax,
            x,
            _curve(runs[m], main, "test_accuracy", pct),
            color="C0",
            ls="--",
            label="OBD, no retraining",
        )
        band(
            ax,
            x,
            _curve(runs[m], "magnitude", "test_accuracy", pct),
            color="C1",
            ls="--",
            label="magnitude, no retraining",
        )
        for meth in cfg.retrain_methods:
            hx = [r.remaining_params for r in runs[m][seeds[0]]["histories"][meth].records]
            band(
                ax,
                hx,
                _hist_curve(runs[m], meth, "test_accuracy", pct),
                color=_COLORS[meth],
                marker="o",
                ms=3,
                label=f"{_LABELS[meth]}, with retraining",
            )
        a0 = mean_sd([runs[m][s]["base"]["test_accuracy"] for s in seeds])[0]
        ax.axhline(
            100 * (a0 - cfg.accuracy_drop), color="grey", lw=0.8, ls=":", label="unpruned − 1 point"
        )
        n_bias = sizes[m]["params"] - sizes[m]["weights"]
        ax.axvline(
            n_bias + sizes[m]["weights"] / cfg.target_factor,
            color="k",
            lw=0.8,
            ls="-.",
            label=f"{cfg.target_factor:g}× fewer weights",
        )
        ax.set_ylim(max(0.0, 100 * a0 - 25), 100.5)
        ax.set_title(f"test accuracy — {m}")
        ax.set_xlabel("remaining parameters (weights + biases)")
        ax.set_ylabel("test accuracy [%]")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figs.save(fig, "accuracy_vs_params.png")
