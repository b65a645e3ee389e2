"""Gorodkin, Hansen, Krogh, Svarer & Winther (1993), *A quantitative study of pruning by Optimal
Brain Damage*: the contiguity problem (PAPERS.md §7).

Only the abstract is accessible. Its claims: OBD improves the learning curve (test error against
the number of training examples) on the contiguity problem; the networks with the fewest
parameters have the smallest test error; a heuristic that "selects the smallest successful
architecture among a group of pruned networks" finds the architecture efficiently; and the OBD
approximations are "surprisingly accurate" on this problem.

The setting is ours, since the paper's is not known ([U] in PAPERS.md):

* **Data.** All 792 strings of length 10 with 2 or 3 clumps of ones
  (:mod:`optbrain.data.contiguity`; inputs ±1, target −1 for 2 clumps and +1 for 3). For each
  training-set size and seed a random training subset; the test set is every other string.
* **Architecture: a fully connected 10-10-1 tanh net with tanh output (121 parameters).** The
  problem has a known compact solution: the number of clumps is the number of rising edges
  (x_{i−1} = −1, x_i = +1, with x_0 = −1), so ten hidden units, each an edge detector looking at
  two neighbouring inputs (x_i − x_{i−1} − 1 > 0), and an output thresholding their sum between 2
  and 3 solve it exactly with about 40 weights. A fully connected net with as many hidden units
  can represent that solution, is 3× larger than it, and so leaves OBD room to find the local
  receptive fields — the classical reason for choosing contiguity (Denker et al. 1987; Solla's
  and the DTU group's studies of it).
* **Training.** Mean squared error with a small weight decay λ (so that a minimum exists), to the
  regularised minimum by full-batch L-BFGS; NNSYSID's initialisation U(−0.5, 0.5).
* **Pruning.** OBD with weight decay, (λ + ½h)w² (exact Gauss–Newton diagonal), one weight at a
  time with retraining, every weight and bias a candidate, down to ``min_kept``.
* **Selection.** "Smallest successful architecture": the smallest network along the elimination
  that still classifies every training string correctly (:meth:`History.select`
  ``"smallest_within"`` on the training error rate, tolerance 0); FPE's choice is reported beside
  it. The test set is never used to select.
* **Accuracy of OBD's ΔE.** At the full net trained on the largest training set, every weight is
  deleted alone (no retraining) and the measured change of the training error compared with its
  saliency (λ + ½h)w², with h from LeCun's recursion as published (with the f'' terms: the claim),
  the Gauss–Newton diagonal (what the pruning uses, ``curvature``) and the exact Hessian
  diagonal; along the eliminations, each step's saliency against the measured change.
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
from .dtu_common import Elimination, eliminate, spearman, tanh_net
from .figures import FigureFiles, band, new_figure
from .stats import fmt, mean_sd, seeds_tag

log = logging.getLogger(__name__)

NAME = "gorodkin1993-contiguity"
SUMMARY = (
    "OBD on the contiguity problem (Gorodkin et al. 1993): learning curves with and without OBD, "
    "the smallest-successful-architecture heuristic, OBD's predicted vs measured ΔE"
)
TITLE = "A quantitative study of OBD on the contiguity problem (Gorodkin et al. 1993)"

_PAPER = {
    "curve": "OBD improves the learning curve (test error against the number of examples)",
    "ockham": "the networks with fewer parameters have the smallest test error ('Ockham's razor')",
    "accurate": "the OBD approximations are 'surprisingly accurate' on this problem",
}


@dataclass
class Config(base.Config):
    """Setting; defaults = the full run. ``curvature``: the diagonal OBD prunes with. OBD
    "improves the learning curve" when the pruned nets'
    mean test error is below the full nets' at a fraction ≥ ``improve_fraction`` of the sizes and
    on average; the approximation is "accurate" when the median predicted/measured ΔE is within
    a factor ``accuracy_ratio`` of 1 and Spearman's ρ is ≥ ``accuracy_rho``."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    sizes: tuple[int, ...] = (40, 80, 120, 200, 300, 400)
    hidden: int = 10
    weight_decay: float = 1e-3
    max_iter: int = 1000
    retrain_iter: int = 50
    min_kept: int = 10
    per_step: int = 1
    curvature: Literal["ggn", "lecun", "hessian"] = "ggn"
    improve_fraction: float = 0.66
    accuracy_ratio: float = 2.0
    accuracy_rho: float = 0.8
    figure_dpi: int = 90

    @classmethod
    def quick(cls) -> Config:
        """One seed, two sizes, six weights per step, shorter training."""
        return cls(
            seeds=(0,), sizes=(60, 200), max_iter=300, retrain_iter=20, per_step=6, min_kept=20
        )

    def validate(self) -> None:
        need = self.need
        self.need_seeds()
        need(len(self.sizes) > 0, "sizes", "give at least one training-set size")
        need(all(10 <= n <= 700 for n in self.sizes), "sizes", "sizes must be in 10..700")
        need(list(self.sizes) == sorted(set(self.sizes)), "sizes", "must increase strictly")
        need(self.hidden >= 1, "hidden", "must be >= 1")
        need(self.weight_decay > 0, "weight_decay", "must be > 0")
        need(self.max_iter >= 1, "max_iter", "must be >= 1")
        need(self.retrain_iter >= 0, "retrain_iter", "must be >= 0")
        n = self.n_params
        need(1 <= self.min_kept < n, "min_kept", f"must be in 1..{n - 1}")
        need(self.per_step >= 1, "per_step", "must be >= 1")
        need(0 < self.improve_fraction <= 1, "improve_fraction", "must be in (0, 1]")
        need(self.accuracy_ratio > 1, "accuracy_ratio", "must be > 1")
        need(-1 <= self.accuracy_rho <= 1, "accuracy_rho", "must be in [-1, 1]")
        need(20 <= self.figure_dpi <= 300, "figure_dpi", "must be in [20, 300]")

    @property
    def n_params(self) -> int:
        return 10 * self.hidden + 2 * self.hidden + 1


def _problem(model: nn.Module, x: Tensor, y: Tensor):
    from ..problem import Problem

    return Problem(model, nn.MSELoss(), (x, y))


@torch.no_grad()
def _metrics(model: nn.Module, data) -> dict[str, float]:
    from ..problem import eval_mode

    out = {}
    with eval_mode(model):
        for split, x, y in (
            ("train", data.x_train, data.y_train),
            ("test", data.x_test, data.y_test),
        ):
            o = model(x)
            out[f"{split}_mse"] = float(nn.functional.mse_loss(o, y))
            out[f"{split}_error_rate"] = float(((o > 0) != (y > 0)).to(torch.float64).mean())
    return out


DIAGONALS = {
    "ggn": "Gauss–Newton diagonal",
    "lecun": "LeCun's recursion with the f'' terms",
    "hessian": "exact Hessian diagonal",
}


def single_deletions(model: nn.Module, lam: float, x: Tensor, y: Tensor) -> dict[str, list]:
    """For deleting each parameter alone (no retraining): the measured change of the training
    MSE (``"measured"``) and the OBD saliency (λ + ½h)w² with each diagonal h of
    :data:`DIAGONALS`; ``model`` is left unchanged."""
    from ..curvature import ExactHessianDiagonal, GGNDiagonal, LeCunDiagonal
    from ..paramdict import named_parameters
    from ..saliency import OBD

    problem = _problem(model, x, y)
    curvatures = {
        "ggn": GGNDiagonal(),
        "lecun": LeCunDiagonal(gauss_newton=False),
        "hessian": ExactHessianDiagonal(),
    }
    scores = {k: OBD(c, weight_decay=lam)(problem) for k, c in curvatures.items()}
    e0 = problem.objective()
    out: dict[str, list] = {"measured": [], **{k: [] for k in curvatures}}
    for name, p in named_parameters(model).items():
        for i in range(p.numel()):
            old = float(p.detach().view(-1)[i])
            with torch.no_grad():
                p.view(-1)[i] = 0.0
            out["measured"].append(problem.objective() - e0)
            with torch.no_grad():
                p.view(-1)[i] = old
            for k in curvatures:
                out[k].append(float(scores[k][name].reshape(-1)[i]))
    return out


def _diagonal(name: str):
    from ..curvature import ExactHessianDiagonal, GGNDiagonal, LeCunDiagonal

    if name == "lecun":
        return LeCunDiagonal(gauss_newton=False)
    return ExactHessianDiagonal() if name == "hessian" else GGNDiagonal()


# --------------------------------------------------------------------------- the experiment
def _one(cfg: Config, n_train: int, seed: int) -> dict[str, Any]:
    """Train the full net on one training subset, eliminate by OBD, select."""
    from ..data.contiguity import contiguity_split
    from ..masking import attach
    from ..pruners import obd
    from .hassibi_common import all_parameters_mask, fit

    data = contiguity_split(n_train, seed=seed)
    lam = cfg.weight_decay
    net = tanh_net(10, cfg.hidden, seed, out_tanh=True)
    fit(net, data.x_train, data.y_train, weight_decay=lam, max_iter=cfg.max_iter)
    single = single_deletions(net, lam, data.x_train, data.y_train)
    work = tanh_net(10, cfg.hidden, seed, out_tanh=True)
    work.load_state_dict(net.state_dict())
    attach(work, all_parameters_mask(work))

    def retrain(m: nn.Module, step: int) -> None:
        if cfg.retrain_iter:
            fit(m, data.x_train, data.y_train, weight_decay=lam, max_iter=cfg.retrain_iter)

    el = eliminate(
        work,
        obd(_diagonal(cfg.curvature), weight_decay=lam, steps=None, min_kept=0),
        lambda m: _problem(m, data.x_train, data.y_train),
        retrain=retrain,
        evaluate=lambda m: _metrics(m, data),
        min_kept=cfg.min_kept,
        weight_decay=lam,
        per_step=cfg.per_step,
    )
    i = el.select("smallest_within", tolerance=0.0, metric="metrics.train_error_rate")
    return {"elimination": el, "single": single, "fields": receptive_fields(el.states[i]["mask"])}


def receptive_fields(mask_state: dict[str, Tensor]) -> list[list[int]]:
    """The input positions (0 … 9) of every live hidden unit (one whose output weight is kept
    and which still has an input weight) of a masked 10-H-1 net."""
    w1, w2 = mask_state["0.weight"], mask_state["2.weight"][0]
    return [
        sorted(int(j) for j in torch.nonzero(w1[u]).reshape(-1))
        for u in range(w1.shape[0])
        if bool(w2[u]) and bool(w1[u].any())
    ]


def is_local(field: list[int]) -> bool:
    """One input, or two neighbouring ones: an edge detector's receptive field."""
    return len(field) == 1 or (len(field) == 2 and field[1] - field[0] == 1)


def run(config: Config, out_dir: str | Path, progress: Progress | None = None) -> Result:
    """Run the reproduction into ``out_dir`` (see the module docstring) and return the result."""
    cfg = config
    session = Session(cfg, out_dir, len(cfg.seeds) * len(cfg.sizes) + 1, progress, log)
    runs: dict[int, dict[int, dict[str, Any]]] = {n: {} for n in cfg.sizes}
    for n in cfg.sizes:
        for seed in cfg.seeds:
            r = _one(cfg, n, seed)
            runs[n][seed] = r
            r["elimination"].history.save(session.path(f"histories/n{n}_seed{seed}.json"))
            session.tick(f"{n} training strings, seed {seed}: OBD elimination")
    session.write_json(
        "receptive_fields.json", {str(n): {str(s): runs[n][s]["fields"] for s in cfg.seeds}
                                  for n in cfg.sizes},
    )  # fmt: skip
    session.write_json(
        "single_deletions.json",
        {str(s): runs[cfg.sizes[-1]][s]["single"] for s in cfg.seeds},
    )
    result = session.result(NAME, TITLE)
    result.notes = _notes(cfg)
    _fields_table(cfg, runs, result)
    curves = _learning_curves(cfg, runs, result)
    _claims(cfg, runs, curves, result)
    return session.finish(result, _figures(cfg, runs, curves, session.out))


# --------------------------------------------------------------------------- analysis
def _choices(el: Elimination) -> dict[str, int]:
    return {
        "smallest successful": el.select(
            "smallest_within", tolerance=0.0, metric="metrics.train_error_rate"
        ),
        "FPE": el.select("fpe"),
    }


def _learning_curves(cfg: Config, runs, result: Result) -> dict[str, list]:
    curves: dict[str, list] = {"full": [], "smallest successful": [], "FPE": []}
    for n in cfg.sizes:
        vals: dict[str, list[float]] = {k: [] for k in curves}
        sizes: dict[str, list[float]] = {k: [] for k in curves}
        for s in cfg.seeds:
            el = runs[n][s]["elimination"]
            recs = el.history.records
            vals["full"].append(recs[0].metrics["test_error_rate"])
            sizes["full"].append(recs[0].remaining)
            for k, i in _choices(el).items():
                vals[k].append(recs[i].metrics["test_error_rate"])
                sizes[k].append(recs[i].remaining)
        row: dict[str, Any] = {"training strings": n}
        for k in curves:
            st = mean_sd(vals[k])
            curves[k].append(st)
            row[f"{k}: test error %"] = fmt((100 * st[0], 100 * st[1]), 1)
            row[f"{k}: parameters"] = fmt(mean_sd(sizes[k]), 1)
        result.tables.setdefault("learning_curves", []).append(row)
    return curves


def _fields_table(cfg: Config, runs, result: Result) -> None:
    for n in cfg.sizes:
        fields = [runs[n][s]["fields"] for s in cfg.seeds]
        units = [len(f) for f in fields]
        inputs = [len(u) for f in fields for u in f]
        local = sum(is_local(u) for f in fields for u in f)
        result.tables.setdefault("receptive_fields", []).append(
            {
                "training strings": n,
                "live hidden units": fmt(mean_sd(units), 1),
                "inputs per unit": fmt(mean_sd(inputs), 2),
                "units with one input or two neighbours": f"{local}/{sum(units)}",
                "seed 0": " ".join("".join(map(str, u)) for u in fields[0]),
            }
        )


def _ockham(el: Elimination) -> float:
    """Spearman ρ(parameters, test error) over the nets of the elimination that classify the
    training set as well as the best of them (the 'successful' ones)."""
    recs = el.history.records
    best = min(r.metrics["train_error_rate"] for r in recs)
    ok = [r for r in recs if r.metrics["train_error_rate"] <= best]
    return spearman([r.remaining for r in ok], [r.metrics["test_error_rate"] for r in ok])


def _claims(cfg: Config, runs, curves, result: Result) -> None:
    ns, k = len(cfg.seeds), len(cfg.sizes)
    full = [c[0] for c in curves["full"]]
    pruned = [c[0] for c in curves["smallest successful"]]
    better = sum(p < f for p, f in zip(pruned, full))
    result.claims.append(
        Claim(
            name=f"OBD improves the learning curve {seeds_tag(ns, 'smallest successful net')}",
            held=better >= cfg.improve_fraction * k and sum(pruned) < sum(full),
            detail="mean test error %, full → pruned: "
            + "; ".join(
                f"{n}: {100 * f:.1f} → {100 * p:.1f}" for n, f, p in zip(cfg.sizes, full, pruned)
            )
            + f"; lower at {better}/{k} sizes (held if ≥ {cfg.improve_fraction:.0%} and lower on "
            "average)",
            paper=_PAPER["curve"],
        )
    )
    rhos = [_ockham(runs[n][s]["elimination"]) for n in cfg.sizes for s in cfg.seeds]
    rho = mean_sd(rhos)
    smallest_best = 0
    for n in cfg.sizes:
        for s in cfg.seeds:
            el = runs[n][s]["elimination"]
            recs = el.history.records
            i = _choices(el)["smallest successful"]
            best = min(r.metrics["train_error_rate"] for r in recs)
            ok = [
                r.metrics["test_error_rate"] for r in recs if r.metrics["train_error_rate"] <= best
            ]
            smallest_best += recs[i].metrics["test_error_rate"] <= min(ok) + 1e-12
    result.claims.append(
        Claim(
            name=f"among successful pruned nets, the smallest generalise best "
            f"{seeds_tag(ns, f'{k} sizes')}",
            held=rho[0] > 0,
            detail=f"Spearman ρ(parameters, test error) over the nets of each elimination that fit "
            f"the training set as well as the best: {fmt(rho, 2)} over {len(rhos)} runs (held if "
            f"> 0); the smallest successful net has the least test error of them in "
            f"{smallest_best}/{len(rhos)} runs",
            paper=_PAPER["ockham"],
        )
    )
    _accuracy_claim(cfg, runs, result)


def _accuracy_claim(cfg: Config, runs, result: Result) -> None:
    n = cfg.sizes[-1]
    stats: dict[str, dict[str, Any]] = {}
    for k in DIAGONALS:
        ratios, rhos = [], []
        for s in cfg.seeds:
            single = runs[n][s]["single"]
            pred, meas = single[k], single["measured"]
            rhos.append(spearman(pred, meas))
            ratios += [p / m for p, m in zip(pred, meas) if m > 1e-12]
        stats[k] = {"ratios": ratios, "rho": mean_sd(rhos)}
    step_ratios = [
        rec.predicted_increase / rec.actual_increase
        for s in cfg.seeds
        for rec in runs[n][s]["elimination"].history.records[1:]
        if rec.actual_increase > 1e-12
    ]
    lo, hi = 1 / cfg.accuracy_ratio, cfg.accuracy_ratio
    for k, label in DIAGONALS.items():
        r = stats[k]["ratios"]
        result.tables.setdefault("obd_accuracy", []).append(
            {
                "deletions": "single, from the full net",
                "diagonal": label,
                "median predicted/measured": round(_median(r), 3),
                "quartiles": f"{_quantile(r, 0.25):.2f}–{_quantile(r, 0.75):.2f}",
                "Spearman rho": fmt(stats[k]["rho"], 3),
            }
        )
    result.tables["obd_accuracy"].append(
        {
            "deletions": "each elimination step, before retraining",
            "diagonal": DIAGONALS[cfg.curvature],
            "median predicted/measured": round(_median(step_ratios), 3),
            "quartiles": f"{_quantile(step_ratios, 0.25):.2f}–{_quantile(step_ratios, 0.75):.2f}",
            "Spearman rho": "",
        }
    )
    main = stats["lecun"]
    med = _median(main["ratios"])
    others = "; ".join(
        f"{DIAGONALS[k]}: median {_median(stats[k]['ratios']):.2f}, ρ {stats[k]['rho'][0]:.3f}"
        for k in ("ggn", "hessian")
    )
    result.claims.append(
        Claim(
            name=f"OBD's predicted ΔE is accurate (LeCun's recursion) "
            f"{seeds_tag(len(cfg.seeds), f'{n} strings')}",
            held=lo <= med <= hi and main["rho"][0] >= cfg.accuracy_rho,
            detail=f"single deletions from the trained full net, OBD with the paper's recursion: "
            f"Spearman ρ(saliency, measured ΔE) {fmt(main['rho'], 3)}, median saliency/measured "
            f"{med:.2f} (quartiles {_quantile(main['ratios'], 0.25):.2f}–"
            f"{_quantile(main['ratios'], 0.75):.2f}); {others}; held if the median is within "
            f"{lo:.2g}–{hi:g} and ρ ≥ {cfg.accuracy_rho}",
            paper=_PAPER["accurate"],
        )
    )


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(x for x in xs if math.isfinite(x))
    if not xs:
        return math.nan
    pos = q * (len(xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _median(xs: list[float]) -> float:
    return _quantile(xs, 0.5)


def _notes(cfg: Config) -> list[str]:
    return [
        "Data: all 792 strings of length 10 with 2 or 3 clumps (330 + 462); per size and seed a "
        "random training subset, the rest is the test set; inputs ±1, targets ±1.",
        f"Net: 10-{cfg.hidden}-1, tanh hidden and output, {cfg.n_params} parameters (all "
        "prunable); MSE with weight decay λ = "
        f"{cfg.weight_decay:g}; initial weights U(−0.5, 0.5); full-batch L-BFGS, "
        f"{cfg.max_iter} iterations, {cfg.retrain_iter} after each deletion of {cfg.per_step}.",
        f"OBD: (λ + ½h)w², exact Gauss–Newton diagonal; down to {cfg.min_kept} parameters. "
        "'Successful' = every training string classified correctly (sign of the output), or as "
        "few errors as the best net of the elimination when none is perfect.",
    ]


# --------------------------------------------------------------------------- figures
def _figures(cfg: Config, runs, curves, out: Path) -> list[str]:
    figs = FigureFiles(out, cfg.figure_dpi)
    fig = new_figure(4.6, 3.4)
    ax = fig.subplots()
    for j, (k, label) in enumerate(
        (
            ("full", "full 10-10-1 net"),
            ("smallest successful", "OBD: smallest successful"),
            ("FPE", "OBD: least FPE"),
        )
    ):
        stats = [(100 * m, 100 * s) for m, s in curves[k]]
        band(ax, list(cfg.sizes), stats, color=f"C{j}", marker="o", ms=3, label=label)
    ax.set_xlabel("training strings")
    ax.set_ylabel("test error [%]")
    ax.set_title("learning curves (mean ± sd over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    figs.save(fig, "learning_curves.png")

    fig = new_figure(8.4, 3.4)
    ax1, ax2 = fig.subplots(1, 2)
    n = cfg.sizes[-1]
    for j, k in enumerate(("lecun", "ggn")):
        pred = [p for s in cfg.seeds for p in runs[n][s]["single"][k]]
        meas = [m for s in cfg.seeds for m in runs[n][s]["single"]["measured"]]
        ax1.scatter(
            [max(p, 1e-9) for p in pred],
            [max(m, 1e-9) for m in meas],
            s=5,
            alpha=0.5,
            color=f"C{j}",
            label=DIAGONALS[k],
        )
    ax1.plot([1e-9, 1], [1e-9, 1], color="grey", lw=0.8, ls=":", label="measured = predicted")
    ax1.legend(fontsize=6)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("OBD saliency (λ + ½h)w²")
    ax1.set_ylabel("measured ΔE (training MSE)")
    ax1.set_title(f"single deletions from the full net ({n} strings)", fontsize=9)
    ax1.grid(alpha=0.3)
    mid = cfg.sizes[len(cfg.sizes) // 2]
    for j, s in enumerate(cfg.seeds):
        recs = runs[mid][s]["elimination"].history.records
        ax2.plot(
            [r.remaining for r in recs],
            [100 * r.metrics["test_error_rate"] for r in recs],
            color=f"C{j}",
            lw=1,
        )
        i = _choices(runs[mid][s]["elimination"])["smallest successful"]
        ax2.plot(
            [recs[i].remaining], [100 * recs[i].metrics["test_error_rate"]], "o", color=f"C{j}"
        )
    ax2.set_xlabel("parameters")
    ax2.set_ylabel("test error [%]")
    ax2.set_title(f"test error along OBD ({mid} strings; dots: smallest successful)", fontsize=9)
    ax2.grid(alpha=0.3)
    figs.save(fig, "obd_accuracy_and_path.png")
    return figs.paths
