"""Larsen, Hansen, Svarer & Ohlsson (NNSP 1996), *Design and regularization of neural networks:
the optimal use of a validation set* (PAPERS.md §14.3).

Only the abstract was reachable: architectures are searched by "approximate combinatorial search
with validation-set based OBD/OBS", for linear models and feed-forward nets. Validation-set OBD
ranks a weight by the second-order change of the *validation* error when it is zeroed,
−w ∂E_val/∂w + ½w² ∂²E_val/∂w² (:class:`optbrain.saliency.ValidationOBD`), instead of the
training error's ½hw² (plus λw² with weight decay).

Here, on synthetic data where the true architecture is known, the schemes below eliminate one
weight at a time with retraining on the training set and choose one network along the way; the
test error of the chosen network (on 5000 fresh samples) is what is compared:

* **validation OBD**: ranked by the validation saliency, chosen by the validation error;
* **training OBD**: ranked by the training saliency, chosen by the validation error;
* **training OBD + FPE**: the same elimination, chosen by FPE (no validation set used for the
  choice);
* **pooled + FPE**: the validation set is merged into the training set (the "optimal use" a
  validation set has when FPE does the choosing), training OBD, chosen by FPE;
* the unpruned model, and (as a bound, not a method) the best test error along the training-OBD
  elimination.

Problems: a **linear model** y = xᵀw* + ε with ``linear_inputs`` standard normal inputs of which
``linear_relevant`` carry weight, noise σ = ``linear_noise``; and a **small net**: a fixed random
tanh teacher with ``net_relevant`` of ``net_inputs`` inputs and ``teacher_hidden`` units, noise σ
= ``net_noise``, fitted by a ``net_inputs``-``net_hidden``-1 tanh student with weight decay
``net_decay`` (FPE with decay, full form). Both are trained by full-batch L-BFGS. Weights are the
candidates; biases stay.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import base
from .base import Claim, Progress, Result, Session
from .dtu_common import eliminate, tanh_net
from .figures import FigureFiles, new_figure
from .stats import fmt, mean_sd, seeds_tag

log = logging.getLogger(__name__)

NAME = "larsen1996-validation"
SUMMARY = (
    "Validation-set OBD (Larsen, Hansen, Svarer & Ohlsson 1996) against training-set OBD and "
    "FPE selection on a linear model and a small net: test error of the selected architectures"
)
TITLE = "Validation-set OBD against training-set OBD and FPE (Larsen et al. 1996)"

PROBLEMS = ("linear", "net")
SCHEMES = ("validation_obd", "training_obd", "training_obd_fpe", "pooled_fpe", "full", "best")
LABELS = {
    "validation_obd": "validation OBD (chosen on validation)",
    "training_obd": "training OBD (chosen on validation)",
    "training_obd_fpe": "training OBD (chosen by FPE)",
    "pooled_fpe": "training + validation pooled, OBD, FPE",
    "full": "unpruned",
    "best": "best along training OBD (bound, uses test)",
}
METHODS = ("validation_obd", "training_obd", "training_obd_fpe", "pooled_fpe")


@dataclass
class Config(base.Config):
    """Setting; defaults = the full run. A scheme is "at least as good" as another when its mean
    test error is at most ``margin`` (relative) above."""

    seeds: tuple[int, ...] = tuple(range(10))
    problems: tuple[Literal["linear", "net"], ...] = PROBLEMS
    n_train: int = 50
    n_val: int = 50
    n_test: int = 5000
    linear_inputs: int = 15
    linear_relevant: int = 5
    linear_noise: float = 1.0
    net_inputs: int = 8
    net_relevant: int = 3
    teacher_hidden: int = 2
    net_hidden: int = 4
    net_noise: float = 0.2
    net_decay: float = 1e-3
    max_iter: int = 1000
    retrain_iter: int = 100
    margin: float = 0.02
    figure_dpi: int = 90

    @classmethod
    def quick(cls) -> Config:
        """One seed, shorter training."""
        return cls(seeds=(0,), n_test=2000, max_iter=300, retrain_iter=30)

    def validate(self) -> None:
        need = self.need
        self.need_seeds()
        need(len(self.problems) > 0, "problems", "give at least one of linear, net")
        need(len(set(self.problems)) == len(self.problems), "problems", "must be distinct")
        need(self.n_train >= 5, "n_train", "must be >= 5")
        need(self.n_val >= 5, "n_val", "must be >= 5")
        need(self.n_test >= 10, "n_test", "must be >= 10")
        need(1 <= self.linear_relevant <= self.linear_inputs, "linear_relevant", "1..inputs")
        need(self.linear_inputs + 1 < self.n_train, "linear_inputs", "needs N > p for FPE")
        need(1 <= self.net_relevant <= self.net_inputs, "net_relevant", "must be in 1..inputs")
        need(self.teacher_hidden >= 1, "teacher_hidden", "must be >= 1")
        need(self.net_hidden >= 1, "net_hidden", "must be >= 1")
        need(self.linear_noise > 0, "linear_noise", "must be > 0")
        need(self.net_noise > 0, "net_noise", "must be > 0")
        need(self.net_decay > 0, "net_decay", "must be > 0")
        need(self.max_iter >= 1, "max_iter", "must be >= 1")
        need(self.retrain_iter >= 0, "retrain_iter", "must be >= 0")
        need(0 <= self.margin < 1, "margin", "must be in [0, 1)")
        need(20 <= self.figure_dpi <= 300, "figure_dpi", "must be in [20, 300]")


# --------------------------------------------------------------------------- data and models
@dataclass
class _Data:
    x: dict[str, Tensor]
    y: dict[str, Tensor]
    relevant: list[int]


def make_data(cfg: Config, problem: str, seed: int) -> _Data:
    """Train / val / test samples of the linear or the teacher-net problem (own generator)."""
    gen = torch.Generator().manual_seed(10_000 * (problem == "net") + seed)
    d = cfg.linear_inputs if problem == "linear" else cfg.net_inputs
    k = cfg.linear_relevant if problem == "linear" else cfg.net_relevant
    relevant = sorted(torch.randperm(d, generator=gen)[:k].tolist())
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    x = {s: torch.randn(n, d, generator=gen, dtype=torch.float64) for s, n in sizes.items()}
    if problem == "linear":
        w = torch.zeros(d, 1, dtype=torch.float64)
        w[relevant, 0] = (0.5 + torch.rand(k, generator=gen, dtype=torch.float64)) * torch.where(
            torch.rand(k, generator=gen) < 0.5, -1.0, 1.0
        ).to(torch.float64)

        def f(t: Tensor) -> Tensor:
            return t @ w

        noise = cfg.linear_noise
    else:
        w1 = torch.randn(cfg.teacher_hidden, k, generator=gen, dtype=torch.float64)
        w2 = torch.randn(1, cfg.teacher_hidden, generator=gen, dtype=torch.float64)

        def f(t: Tensor) -> Tensor:
            return torch.tanh(t[:, relevant] @ w1.T) @ w2.T

        noise = cfg.net_noise
    y = {
        s: f(x[s]) + noise * torch.randn(x[s].shape[0], 1, generator=gen, dtype=torch.float64)
        for s in sizes
    }
    return _Data(x, y, relevant)


def _model(cfg: Config, problem: str, seed: int) -> nn.Module:
    """The linear model starts at zero (least squares: the start does not matter); the net from
    NNSYSID's U(−0.5, 0.5)."""
    if problem == "linear":
        with torch.random.fork_rng(devices=[]):  # nn.Linear's init draws from the global RNG
            model = nn.Linear(cfg.linear_inputs, 1).to(torch.float64)
        with torch.no_grad():
            model.weight.zero_()
            model.bias.zero_()
        return model
    return tanh_net(cfg.net_inputs, cfg.net_hidden, seed)


def _decay(cfg: Config, problem: str) -> float:
    return 0.0 if problem == "linear" else cfg.net_decay


# --------------------------------------------------------------------------- one scheme
def _run_scheme(cfg: Config, problem: str, method: str, data: _Data, seed: int) -> dict:
    from ..masking import Mask, attach
    from ..problem import Problem
    from ..pruners import obd, validation_obd
    from .hassibi_common import fit

    lam = _decay(cfg, problem)
    pooled = method == "pooled_fpe"
    xt = torch.cat([data.x["train"], data.x["val"]]) if pooled else data.x["train"]
    yt = torch.cat([data.y["train"], data.y["val"]]) if pooled else data.y["train"]
    model = _model(cfg, problem, seed)
    fit(model, xt, yt, weight_decay=lam, max_iter=cfg.max_iter)
    attach(model, Mask.ones(model))  # the weights; biases stay
    if method == "validation_obd":
        pruner = validation_obd(validation=(data.x["val"], data.y["val"]), min_kept=0)
    else:
        pruner = obd(weight_decay=lam, steps=None, min_kept=0)

    def retrain(m: nn.Module, step: int) -> None:
        if cfg.retrain_iter:
            fit(m, xt, yt, weight_decay=lam, max_iter=cfg.retrain_iter)

    def evaluate(m: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            return {
                "val_loss": float(nn.functional.mse_loss(m(data.x["val"]), data.y["val"])),
                "test_mse": float(nn.functional.mse_loss(m(data.x["test"]), data.y["test"])),
            }

    el = eliminate(
        model,
        pruner,
        lambda m: Problem(m, nn.MSELoss(), (xt, yt)),
        retrain=retrain,
        evaluate=evaluate,
        min_kept=1,
        weight_decay=lam,
    )
    return {"elimination": el}


def _choose(method: str, el) -> int:
    if method in ("validation_obd", "training_obd"):
        return el.select("validation")
    return el.select("fpe")


def _summary(method: str, el, relevant: list[int], problem: str) -> dict[str, Any]:
    recs = el.history.records
    i = _choose(method, el)
    return {
        "test_mse": recs[i].metrics["test_mse"],
        "weights": recs[i].remaining,
        "inputs_kept": _inputs(el.states[i]["mask"], problem),
        "relevant": relevant,
    }


def _inputs(mask_state: dict[str, Tensor], problem: str) -> list[int]:
    w = mask_state["weight"] if problem == "linear" else mask_state["0.weight"]
    if problem != "linear":
        w = w & mask_state["2.weight"][0][:, None]
    return sorted(int(j) for j in torch.nonzero(w.any(0)).reshape(-1))


# --------------------------------------------------------------------------- the experiment
def run(config: Config, out_dir: str | Path, progress: Progress | None = None) -> Result:
    """Run the reproduction into ``out_dir`` (see the module docstring) and return the result."""
    cfg = config
    total = len(cfg.problems) * len(cfg.seeds) * len(METHODS) + 1
    session = Session(cfg, out_dir, total, progress, log)
    out: dict[str, dict[int, dict[str, Any]]] = {p: {} for p in cfg.problems}
    for problem in cfg.problems:
        for seed in cfg.seeds:
            data = make_data(cfg, problem, seed)
            row: dict[str, Any] = {}
            for method in METHODS:
                el = _run_scheme(cfg, problem, method, data, seed)["elimination"]
                el.history.save(session.path(f"histories/{problem}_{method}_seed{seed}.json"))
                row[method] = _summary(method, el, data.relevant, problem)
                if method == "training_obd":
                    recs = el.history.records
                    row["full"] = {
                        "test_mse": recs[0].metrics["test_mse"],
                        "weights": recs[0].remaining,
                    }
                    best = min(recs, key=lambda r: r.metrics["test_mse"])
                    row["best"] = {"test_mse": best.metrics["test_mse"], "weights": best.remaining}
                    row["curve"] = [
                        (r.remaining, r.metrics["val_loss"], r.metrics["test_mse"],
                         r.generalization.get("fpe", math.nan))
                        for r in recs
                    ]  # fmt: skip
                session.tick(f"{problem} seed {seed}: {method}")
            out[problem][seed] = row
    session.write_json("selected.json", out)
    result = session.result(NAME, TITLE)
    result.notes = _notes(cfg)
    for problem in cfg.problems:
        _analyse(cfg, problem, out[problem], result)
    return session.finish(result, _figures(cfg, out, session.out))


# --------------------------------------------------------------------------- analysis
def _analyse(cfg: Config, problem: str, rows: dict[int, dict[str, Any]], result: Result) -> None:
    seeds = list(rows)
    stats = {m: mean_sd([rows[s][m]["test_mse"] for s in seeds]) for m in SCHEMES}
    sizes = {m: mean_sd([rows[s][m]["weights"] for s in seeds]) for m in SCHEMES}
    for m in SCHEMES:
        entry = {
            "problem": problem,
            "scheme": LABELS[m],
            "test MSE": f"{stats[m][0]:.4g} ± {stats[m][1]:.2g}",
            "relative to unpruned": round(stats[m][0] / stats["full"][0], 3),
            "weights": fmt(sizes[m], 1),
        }
        if m in METHODS:
            exact = sum(rows[s][m]["inputs_kept"] == rows[s][m]["relevant"] for s in seeds)
            entry["true inputs found"] = f"{exact}/{len(seeds)}"
        result.tables.setdefault("selected", []).append(entry)
    tag = seeds_tag(len(seeds), problem)
    v, t = stats["validation_obd"][0], stats["training_obd"][0]
    wins = sum(rows[s]["validation_obd"]["test_mse"] <= rows[s]["training_obd"]["test_mse"]
               for s in seeds)  # fmt: skip
    result.claims.append(
        Claim(
            name=f"validation-set OBD chooses architectures at least as good as training-set OBD "
            f"{tag}",
            held=v <= (1 + cfg.margin) * t,
            detail=f"test MSE of the chosen nets: validation OBD {v:.4g}, training OBD {t:.4g} "
            f"(both chosen on the validation set); validation OBD lower or equal in "
            f"{wins}/{len(seeds)} seeds; held if within {cfg.margin:.0%} or lower",
            paper="architecture search with validation-set based OBD/OBS (abstract; no numbers "
            "reached)",
        )
    )
    beat = [m for m in METHODS if stats[m][0] < stats["full"][0]]
    result.claims.append(
        Claim(
            name=f"every selection scheme beats the unpruned model {tag}",
            held=len(beat) == len(METHODS),
            detail="test MSE relative to unpruned: "
            + ", ".join(f"{LABELS[m]} {stats[m][0] / stats['full'][0]:.3f}" for m in METHODS),
            paper="pruning with a selection rule improves generalisation (the DTU premise)",
        )
    )
    f, p = stats["training_obd_fpe"][0], stats["pooled_fpe"][0]
    result.claims.append(
        Claim(
            name=f"FPE selection with the validation data pooled into training is at least as "
            f"good as validation-set selection {tag}",
            held=p <= (1 + cfg.margin) * min(v, t),
            detail=f"test MSE: pooled + FPE {p:.4g}, training OBD + FPE (train only) {f:.4g}, best "
            f"validation-selected {min(v, t):.4g}; held if within {cfg.margin:.0%} or lower",
            paper="(ours: 'the optimal use of a validation set' — using it for training instead "
            "of for selection)",
        )
    )


def _notes(cfg: Config) -> list[str]:
    return [
        f"Linear: y = xᵀw* + ε, {cfg.linear_inputs} N(0, 1) inputs, {cfg.linear_relevant} with "
        f"|w*| in [0.5, 1.5], σ = {cfg.linear_noise:g}; model Linear({cfg.linear_inputs}, 1) "
        "by least squares (L-BFGS), no decay; FPE = (N + p)/(N − p)·E.",
        f"Net: teacher tanh {cfg.net_relevant}-{cfg.teacher_hidden}-1 with N(0, 1) weights on "
        f"{cfg.net_relevant} of {cfg.net_inputs} inputs, σ = {cfg.net_noise:g}; student "
        f"{cfg.net_inputs}-{cfg.net_hidden}-1 tanh, weight decay λ = {cfg.net_decay:g}, FPE "
        "with decay (full form).",
        f"{cfg.n_train} training, {cfg.n_val} validation and {cfg.n_test} test samples per seed; "
        f"full-batch L-BFGS ({cfg.max_iter} iterations, {cfg.retrain_iter} after each deletion); "
        "one weight deleted per step down to one; biases stay.",
    ]


def _figures(cfg: Config, out_rows, out: Path) -> list[str]:
    figs = FigureFiles(out, cfg.figure_dpi)
    fig = new_figure(4.4 * len(cfg.problems), 3.6)
    axes = fig.subplots(1, len(cfg.problems), squeeze=False)[0]
    for ax, problem in zip(axes, cfg.problems):
        rows = out_rows[problem]
        seeds = list(rows)
        data = [[rows[s][m]["test_mse"] / rows[s]["full"]["test_mse"] for s in seeds]
                for m in (*METHODS, "best")]  # fmt: skip
        ax.boxplot(data, tick_labels=["val OBD", "train OBD", "train OBD\n+FPE", "pooled\n+FPE",
                                      "best\n(bound)"])  # fmt: skip
        ax.axhline(1.0, color="grey", lw=0.8, ls=":", label="unpruned")
        ax.set_ylabel("test MSE / unpruned")
        ax.set_title(f"{problem}: chosen architectures ({len(seeds)} seeds)", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    figs.save(fig, "test_error_of_chosen.png")
    return figs.paths
