"""Cibas, Fogelman Soulié, Gallinari & Raudys (1994/96), *Variable selection with Optimal Cell
Damage*, on Breiman's waveform data with 19 appended pure-noise inputs (PAPERS.md §8).

For each seed a fresh data set is drawn (:func:`~optbrain.data.waveform.load_waveform_split`:
independent train, validation and test draws) and an MLP 40-H-3 is trained with early stopping on
the validation split. Then

* **rankings**: the OCD saliency of every input (the sum of the OBD saliencies ½ h w² of its fan-out
  weights, :class:`~optbrain.saliency.OCD`) is compared with scikit-learn's permutation importance
  (on the same net, validation data, drop in log-likelihood) and mutual information between each
  input and the class (training data, model-free). The paper's claim: the 19 appended noise inputs
  rank below all 21 wave inputs. Inputs 1 and 21 are zero in every base wave, so they are pure noise
  too (21 pure-noise inputs in all) and inputs 2 and 20 carry a wave of amplitude 1 only; the
  claims are therefore stated both literally and for the 19 informative inputs 2..20;
* **iterative removal** (RFE-shaped, the paper's procedure): remove the input(s) of lowest
  saliency, retrain with early stopping, recompute the saliencies, repeat down to ``min_inputs``;
  validation and test accuracy against inputs kept; the chosen variable set is the smallest one
  whose validation accuracy is within ``tolerance`` of the best validation accuracy seen;
* **context**: the accuracy of the Bayes rule on each test set (the class likelihoods integrate
  over the mixing weight u numerically), ≈ 86 %.

The scores and the removal loop are those of :mod:`optbrain.experiments.input_selection`, shared
with :mod:`optbrain.experiments.digits_ocd`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import base
from .base import Claim, Progress, Result, Session
from .figures import FigureFiles, band, new_figure
from .input_selection import (
    Split,
    chosen_round,
    input_scores,
    ranks,
    removal_curve,
    removal_path,
    train_net,
)
from .stats import fmt, mean_sd, seeds_tag

log = logging.getLogger(__name__)

NAME = "cibas1994-waveform"
SUMMARY = (
    "Optimal Cell Damage variable selection (Cibas et al. 1994/96) on Breiman's waveform data "
    "with 19 pure-noise inputs, against permutation importance and mutual information"
)
TITLE = "Optimal Cell Damage (Cibas et al. 1994/96): variable selection on the waveform data"

RANKERS = ("ocd", "permutation", "mutual_info")
_LABELS = {
    "ocd": "OCD",
    "permutation": "permutation importance",
    "mutual_info": "mutual information",
    "magnitude": "fan-out magnitude",
    "random": "random order",
}
_PAPER = {
    "literal": "OCD ranks the 19 pure-noise inputs lowest (Cibas et al., waveform with 40 "
    "inputs; PAPERS.md §8, issue #5)",
    "informative": "(ours) inputs 1 and 21 are pure noise as well: the 21 pure-noise inputs rank "
    "below the 19 informative inputs 2..20",
    "removal": "OCD removes inputs while the classifier trains; the variable set with the best "
    "validation performance is kept (procedure [U-detail], PAPERS.md §8)",
    "bayes": "Bayes rate ≈ 86 % accuracy (CART book) [U]",
}


@dataclass
class Config(base.Config):
    """Setting of the reproduction; the defaults are the full run (10 seeds).

    Each seed draws its own data (``n_train`` / ``n_val`` / ``n_test`` samples) and initialisation.
    Training: Adam (``lr``, ``batch_size``) with early stopping on the validation loss
    (``patience``, at most ``epochs``); after each removal step ``retrain_epochs`` /
    ``retrain_patience``. ``remove_per_round`` inputs are removed per step down to ``min_inputs``.
    ``removal_methods``: saliencies that drive the iterative removal (``"ocd"`` re-estimated after
    every retraining; ``"mutual_info"`` a fixed order computed once on the training data).
    """

    seeds: tuple[int, ...] = tuple(range(10))
    n_train: int = 1000
    n_val: int = 1000
    n_test: int = 5000
    hidden: int = 10
    lr: float = 1e-3
    batch_size: int = 32
    epochs: int = 300
    patience: int = 20
    curvature: Literal["ggn", "hessian", "lecun", "empirical_fisher"] = "ggn"
    permutation_repeats: int = 10
    removal: bool = True
    removal_methods: tuple[Literal["ocd", "permutation", "mutual_info"], ...] = (
        "ocd",
        "mutual_info",
    )
    remove_per_round: int = 1
    min_inputs: int = 2
    retrain_epochs: int = 100
    retrain_patience: int = 10
    tolerance: float = 0.01
    accuracy_drop: float = 0.01
    bayes_grid: int = 400
    figure_dpi: int = 90

    @classmethod
    def quick(cls) -> Config:
        """Two seeds, smaller data, three inputs removed per step."""
        return cls(
            seeds=(0, 1),
            n_train=600,
            n_val=600,
            n_test=2000,
            removal_methods=("ocd",),
            remove_per_round=3,
            min_inputs=4,
            retrain_epochs=40,
            retrain_patience=5,
            permutation_repeats=5,
            bayes_grid=200,
        )

    def validate(self) -> None:
        need = self.need
        self.need_seeds()
        for key in ("n_train", "n_val", "n_test"):
            need(getattr(self, key) >= 30, key, "must be >= 30")
        need(self.hidden >= 1, "hidden", "must be >= 1")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.epochs >= 1, "epochs", "must be >= 1")
        need(self.patience >= 1, "patience", "must be >= 1")
        need(self.permutation_repeats >= 1, "permutation_repeats", "must be >= 1")
        need(
            len(self.removal_methods) > 0
            and len(set(self.removal_methods)) == len(self.removal_methods),
            "removal_methods",
            "give distinct methods",
        )
        need(self.remove_per_round >= 1, "remove_per_round", "must be >= 1")
        need(1 <= self.min_inputs < 40, "min_inputs", "must be in [1, 40)")
        need(self.retrain_epochs >= 1, "retrain_epochs", "must be >= 1")
        need(self.retrain_patience >= 1, "retrain_patience", "must be >= 1")
        need(0 <= self.tolerance < 1, "tolerance", "must be in [0, 1)")
        need(0 <= self.accuracy_drop < 1, "accuracy_drop", "must be in [0, 1)")
        need(self.bayes_grid >= 10, "bayes_grid", "must be >= 10")
        need(20 <= self.figure_dpi <= 300, "figure_dpi", "must be in [20, 300]")


# =========================================================================== waveform specifics
def auc(scores: Tensor, positive: Sequence[int], negative: Sequence[int]) -> float:
    """Fraction of (positive, negative) pairs with the positive scored higher (ties count ½)."""
    p = scores[list(positive)][:, None]
    n = scores[list(negative)][None, :]
    return float(((p > n).double() + 0.5 * (p == n).double()).mean())


def _data(cfg: Config, seed: int) -> Split:
    from ..data.waveform import load_waveform_split

    d = load_waveform_split(cfg.n_train, cfg.n_val, cfg.n_test, seed=seed)
    return Split(d.x_train, d.y_train, d.x_val, d.y_val, d.x_test, d.y_test)


def bayes_accuracy(x: Tensor, y: Tensor, grid: int = 400) -> float:
    """Accuracy of the Bayes rule (equal priors): p(x | c) = ∫₀¹ Π_i N(x_i; u h_a + (1−u) h_b, 1) du
    over the 21 wave inputs (midpoint rule with ``grid`` points; the noise inputs cancel)."""
    from ..data.waveform import CLASS_WAVES, N_BASE, base_waves

    h = base_waves(torch.float64)
    u = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    xw = x[:, :N_BASE].to(torch.float64)
    logp = []
    for a, b in CLASS_WAVES:
        means = u[:, None] * h[a] + (1 - u[:, None]) * h[b]  # grid × 21
        d2 = torch.cdist(xw, means).square()  # N × grid
        logp.append(torch.logsumexp(-0.5 * d2, dim=1))
    pred = torch.stack(logp, 1).argmax(1)
    return float((pred == y).to(torch.float64).mean())


def _build(cfg: Config, seed: int, n_in: int) -> nn.Module:
    from ..models.digits import digits_mlp

    return digits_mlp(hidden=(cfg.hidden,), activation="tanh", seed=seed, n_in=n_in, n_out=3)


def _one_seed(cfg: Config, seed: int, tick: Callable[[str], None]) -> dict[str, Any]:
    split = _data(cfg, seed)
    model = _build(cfg, seed, split.x_train.shape[1])
    out: dict[str, Any] = {
        **train_net(model, split, cfg, seed),
        "bayes_test_accuracy": bayes_accuracy(split.x_test, split.y_test, cfg.bayes_grid),
    }
    scores = {
        m: input_scores(
            m,
            model,
            split,
            curvature=cfg.curvature,
            seed=seed,
            repeats=cfg.permutation_repeats,
        )
        for m in RANKERS
    }
    out["scores"] = {m: s.tolist() for m, s in scores.items()}
    tick(f"seed {seed}: trained, rankings")
    out["removal"] = {}
    if cfg.removal:
        for method in cfg.removal_methods:
            fixed = scores[method] if method == "mutual_info" else None

            def score(m: nn.Module, r: int, method=method, fixed=fixed) -> Tensor:
                if fixed is not None:
                    return fixed
                return input_scores(
                    method,
                    m,
                    split,
                    curvature=cfg.curvature,
                    seed=seed * 1000 + r,
                    repeats=cfg.permutation_repeats,
                )

            out["removal"][method] = removal_path(model, split, score, cfg, seed)
            tick(f"seed {seed}: iterative removal by {_LABELS[method]}")
    return out


def run(config: Config, out_dir: str | Path, progress: Progress | None = None) -> Result:
    """Run the reproduction into ``out_dir`` (see the module docstring) and return the result."""
    cfg = config
    per_seed = 1 + (len(cfg.removal_methods) if cfg.removal else 0)
    session = Session(cfg, out_dir, len(cfg.seeds) * per_seed + 1, progress, log)
    runs = [_one_seed(cfg, s, session.tick) for s in cfg.seeds]
    result = session.result(NAME, TITLE)
    session.write_json("runs.json", runs)
    _analyse(cfg, runs, result)
    result.notes = _notes(cfg, runs)
    return session.finish(result, _figures(cfg, runs, session.out))


# =========================================================================== analysis
def _groups(n_features: int = 40) -> dict[str, list[int]]:
    from ..data.waveform import INFORMATIVE, N_BASE

    return {
        "wave": list(range(N_BASE)),
        "noise": list(range(N_BASE, n_features)),
        "informative": list(INFORMATIVE),
        "pure_noise": [i for i in range(n_features) if i not in INFORMATIVE],
    }


def ranking_stats(scores: Tensor) -> dict[str, Any]:
    """How one ranking separates the input groups (see :func:`_groups`)."""
    g = _groups(len(scores))
    rk = ranks(scores)
    n = len(scores)
    top21 = {i for i in range(n) if rk[i] >= n - 21}
    top19 = {i for i in range(n) if rk[i] >= n - 19}
    low_pure = max(int(rk[i]) for i in g["pure_noise"])
    return {
        # the paper's claim: the 19 appended noise inputs are the 19 lowest
        "literal": int(max(rk[i] for i in g["noise"])) < int(min(rk[i] for i in g["wave"])),
        "noise_in_top21": len(top21 & set(g["noise"])),
        # informative inputs 2..20 above all 21 pure-noise inputs
        "informative_top": len(top19 & set(g["informative"])) == 19,
        "pure_in_top19": len(top19 & set(g["pure_noise"])),
        "informative_below_a_pure": [i + 1 for i in g["informative"] if int(rk[i]) < low_pure],
        "auc_wave_vs_noise": auc(scores, g["wave"], g["noise"]),
        "auc_informative_vs_pure": auc(scores, g["informative"], g["pure_noise"]),
    }


def _analyse(cfg: Config, runs: list[dict[str, Any]], result: Result) -> None:

    ns = len(runs)
    tag = seeds_tag(ns)
    _ranking_claims(runs, result, ns, tag)
    _agreement_and_accuracy(runs, result, tag)
    if not cfg.removal:
        return
    _removal_claims(cfg, runs, result, ns, tag)


def _ranking_claims(runs, result, ns, tag):
    """Per-seed rankings and the claims on which inputs each ranking puts last."""
    stats = {
        m: [ranking_stats(torch.tensor(r["scores"][m], dtype=torch.float64)) for r in runs]
        for m in RANKERS
    }
    for r in runs:
        for m in RANKERS:
            st = ranking_stats(torch.tensor(r["scores"][m], dtype=torch.float64))
            result.tables.setdefault("rankings_per_seed", []).append(
                {
                    "seed": r["seed"],
                    "ranking": m,
                    "19 noise below all 21 wave inputs": "yes" if st["literal"] else "no",
                    "noise inputs in top 21": st["noise_in_top21"],
                    "19 informative on top": "yes" if st["informative_top"] else "no",
                    "pure-noise inputs in top 19": st["pure_in_top19"],
                    "informative below a pure-noise input": ", ".join(
                        f"x{i}" for i in st["informative_below_a_pure"]
                    ),
                    "AUC wave vs noise": round(st["auc_wave_vs_noise"], 4),
                    "AUC informative vs pure noise": round(st["auc_informative_vs_pure"], 4),
                }
            )
    for m in RANKERS:
        st = stats[m]
        lit = sum(s["literal"] for s in st)
        ov = mean_sd([s["noise_in_top21"] for s in st])
        a1 = mean_sd([s["auc_wave_vs_noise"] for s in st])
        result.claims.append(
            Claim(
                name=f"{_LABELS[m]}: the 19 appended noise inputs rank below all 21 wave inputs "
                f"{tag}",
                held=lit == ns,
                detail=(
                    f"in {lit}/{ns} seeds; otherwise {fmt(ov)} noise inputs among the top 21 (AUC "
                    f"wave vs noise {fmt(a1, 3)}); inputs 1 "
                    "and 21 are pure noise in Breiman's generator, so this needs two noise "
                    "inputs to beat all 19 others"
                ),
                paper=_PAPER["literal"],
            )
        )
        inf = sum(s["informative_top"] for s in st)
        ov2 = mean_sd([s["pure_in_top19"] for s in st])
        a2 = mean_sd([s["auc_informative_vs_pure"] for s in st])
        weak: dict[int, int] = {}
        for s in st:
            for i in s["informative_below_a_pure"]:
                weak[i] = weak.get(i, 0) + 1
        weak_txt = ", ".join(f"x{i} in {c}" for i, c in sorted(weak.items())) or "none"
        result.claims.append(
            Claim(
                name=f"{_LABELS[m]}: the 19 informative inputs 2..20 rank above all 21 pure-noise "
                f"inputs {tag}",
                held=inf == ns,
                detail=(
                    f"in {inf}/{ns} seeds; pure-noise inputs among the top 19: {fmt(ov2)}; AUC "
                    f"informative vs pure noise {fmt(a2, 3)}; "
                    f"informative inputs ranked below some pure-noise input: {weak_txt} seeds"
                ),
                paper=_PAPER["informative"],
            )
        )


def _agreement_and_accuracy(runs, result, tag):
    """Rank agreement between the rankings, and the accuracy table and claim."""
    from scipy.stats import kendalltau, spearmanr

    # rank agreement
    for a, b in (("ocd", "permutation"), ("ocd", "mutual_info"), ("permutation", "mutual_info")):
        rho = [float(spearmanr(r["scores"][a], r["scores"][b])[0]) for r in runs]
        tau = [float(kendalltau(r["scores"][a], r["scores"][b])[0]) for r in runs]
        inf = _groups()["informative"]
        rho_inf = [
            float(spearmanr([r["scores"][a][i] for i in inf], [r["scores"][b][i] for i in inf])[0])
            for r in runs
        ]
        rs, ts, ris = mean_sd(rho), mean_sd(tau), mean_sd(rho_inf)
        result.tables.setdefault("rank_agreement", []).append(
            {
                "rankings": f"{_LABELS[a]} vs {_LABELS[b]}",
                "Spearman (40 inputs)": fmt(rs, 3),
                "Kendall (40 inputs)": fmt(ts, 3),
                "Spearman (19 informative)": fmt(ris, 3),
            }
        )
    # accuracies
    acc = mean_sd([r["test_accuracy"] for r in runs])
    bay = mean_sd([r["bayes_test_accuracy"] for r in runs])
    result.tables["accuracy"] = [
        {
            "seed": r["seed"],
            "epochs (early stopping)": r["epochs"],
            "val accuracy": round(r["val_accuracy"], 4),
            "test accuracy": round(r["test_accuracy"], 4),
            "Bayes rule test accuracy": round(r["bayes_test_accuracy"], 4),
        }
        for r in runs
    ]
    result.claims.append(
        Claim(
            name=f"Context: the full 40-input net is close to the Bayes rate {tag}",
            held=acc[0] >= bay[0] - 0.05,
            detail=(
                f"test accuracy {100 * acc[0]:.1f} ± {100 * acc[1]:.1f} %, Bayes rule on the same "
                f"test sets {100 * bay[0]:.1f} ± {100 * bay[1]:.1f} %; held if within 5 points"
            ),
            paper=_PAPER["bayes"],
        )
    )


def _removal_claims(cfg, runs, result, ns, tag):
    """The removal curves: inputs kept, accuracy, noise inputs removed first."""
    noise = set(_groups()["noise"])
    pure = set(_groups()["pure_noise"])
    for method in cfg.removal_methods:
        chosen, rows_all = [], []
        for r in runs:
            rows = r["removal"][method]
            c = chosen_round(rows, cfg.tolerance)
            chosen.append(c)
            # removal order: are the first removed inputs the pure-noise ones?
            order = [i for row in rows for i in row["removed"]]
            first_info = next((k for k, i in enumerate(order) if i not in pure), len(order))
            first_wave = next((k for k, i in enumerate(order) if i not in noise), len(order))
            rows_all.append(
                {
                    "removal": method,
                    "seed": r["seed"],
                    "full test acc": round(rows[0]["test_accuracy"], 4),
                    "chosen: inputs kept": c["kept"],
                    "chosen: val acc": round(c["val_accuracy"], 4),
                    "chosen: test acc": round(c["test_accuracy"], 4),
                    "appended noise kept": len(set(c["alive"]) & noise),
                    "pure noise kept": len(set(c["alive"]) & pure),
                    "informative dropped": 19 - len(set(c["alive"]) - pure),
                    "removed before the first wave input": first_wave,
                    "removed before the first informative input": first_info,
                    "chosen set": " ".join(str(i + 1) for i in c["alive"]),
                }
            )
        result.tables.setdefault("chosen_variable_sets", []).extend(rows_all)
        kept = mean_sd([c["kept"] for c in chosen])
        noise_kept = mean_sd([len(set(c["alive"]) & noise) for c in chosen])
        clean = sum(len(set(c["alive"]) & noise) == 0 for c in chosen)
        d_acc = mean_sd([c["test_accuracy"] - r["test_accuracy"] for c, r in zip(chosen, runs)])
        first = mean_sd([row["removed before the first informative input"] for row in rows_all])
        all_first = sum(row["removed before the first wave input"] >= 19 for row in rows_all)
        result.claims.append(
            Claim(
                name=f"Iterative {_LABELS[method]} removal with retraining: the chosen variable "
                f"set drops the noise inputs at no loss of test accuracy {tag}",
                held=clean == ns and d_acc[0] >= -cfg.accuracy_drop,
                detail=(
                    f"chosen set (smallest with validation accuracy within "
                    f"{100 * cfg.tolerance:g} points of the best): {fmt(kept)} inputs, no "
                    f"appended noise input in {clean}/{ns} seeds ({fmt(noise_kept)} kept); test "
                    f"accuracy {100 * d_acc[0]:+.1f} ± "
                    f"{100 * d_acc[1]:.1f} points against the full net; the 19 appended noise "
                    f"inputs are the first 19 removed in {all_first}/{ns} seeds; "
                    f"{fmt(first)} pure-noise inputs removed before the first "
                    f"informative one; held if no noise input is kept in any seed and the mean "
                    f"test accuracy drops by at most {100 * cfg.accuracy_drop:g} point"
                ),
                paper=_PAPER["removal"],
            )
        )
        kept_axis, val = removal_curve([r["removal"][method] for r in runs], "val_accuracy", 100)
        _, test = removal_curve([r["removal"][method] for r in runs], "test_accuracy", 100)
        for k, v, t in zip(kept_axis, val, test):
            result.tables.setdefault("accuracy_vs_inputs_kept", []).append(
                {
                    "removal": method,
                    "inputs kept": k,
                    "val acc %": round(v[0], 2),
                    "val sd": round(v[1], 2),
                    "test acc %": round(t[0], 2),
                    "test sd": round(t[1], 2),
                }
            )


def _notes(cfg: Config, runs: list[dict[str, Any]]) -> list[str]:
    return [
        f"Data: Breiman's waveform generator with 19 appended N(0,1) inputs (40 inputs, 3 "
        f"classes); per seed independent draws of {cfg.n_train} train / {cfg.n_val} validation / "
        f"{cfg.n_test} test samples; seeds {list(cfg.seeds)} vary data and initialisation. "
        "Inputs are numbered 1..40; 1 and 21 are zero in every base wave (pure noise), 22..40 "
        "are the appended noise.",
        f"Net: MLP 40-{cfg.hidden}-3 (tanh), Adam lr {cfg.lr}, batch {cfg.batch_size}, "
        f"cross-entropy, early stopping on the validation loss (patience {cfg.patience}, at most "
        f"{cfg.epochs} epochs, best weights restored).",
        f"OCD: S_i = Σ_fan-out ½ h w² with the {cfg.curvature} diagonal on the training data. "
        f"Permutation importance: scikit-learn, same net, validation data, drop of the mean "
        f"log-likelihood, {cfg.permutation_repeats} repeats. Mutual information: scikit-learn "
        "`mutual_info_classif` on the training data (k-NN estimate, model-free).",
        f"Iterative removal: {cfg.remove_per_round} input(s) per round down to {cfg.min_inputs}, "
        f"saliencies recomputed after each retraining (early stopping, patience "
        f"{cfg.retrain_patience}, at most {cfg.retrain_epochs} epochs); the chosen set is the "
        f"smallest whose validation accuracy is within {100 * cfg.tolerance:g} points of the best "
        "seen along the path.",
    ]


def _figures(cfg: Config, runs: list[dict[str, Any]], out: Path) -> list[str]:
    import numpy as np

    figs = FigureFiles(out, cfg.figure_dpi)
    # mean normalised rank per input, for each ranking
    fig = new_figure(9.0, 3.6)
    ax = fig.subplots()
    x = np.arange(1, 41)
    width = 0.27
    for k, m in enumerate(RANKERS):
        rk = np.array(
            [ranks(torch.tensor(r["scores"][m], dtype=torch.float64)).numpy() for r in runs]
        )
        mean = rk.mean(0) + 1
        sd = rk.std(0, ddof=1) if len(runs) > 1 else np.zeros(40)
        ax.bar(x + (k - 1) * width, mean, width, yerr=sd, label=_LABELS[m], capsize=0)
    ax.axvspan(21.5, 40.5, color="grey", alpha=0.12, label="appended noise")
    for i in (1, 21):
        ax.axvspan(i - 0.5, i + 0.5, color="grey", alpha=0.12)
    ax.axhline(19.5, color="k", lw=0.8, ls=":", label="the 19 lowest ranks lie below")
    ax.set_xlabel("input (1..21 waveform, 22..40 appended noise)")
    ax.set_ylabel("rank (1 = least important)")
    ax.set_title(f"Input rankings at the trained net, mean ± sd over {len(runs)} seeds")
    ax.set_xlim(0.3, 40.7)
    ax.legend(fontsize=7, ncol=2)
    figs.save(fig, "rankings.png")

    if cfg.removal:
        fig = new_figure(5.6, 3.8)
        ax = fig.subplots()
        colors = {"ocd": "C0", "permutation": "C1", "mutual_info": "C2"}
        for method in cfg.removal_methods:
            rs = [r["removal"][method] for r in runs]
            kx, val = removal_curve(rs, "val_accuracy", 100)
            _, test = removal_curve(rs, "test_accuracy", 100)
            c = colors[method]
            band(ax, kx, val, color=c, marker="o", ms=2, label=f"{_LABELS[method]}: validation")
            band(ax, kx, test, color=c, ls="--", label=f"{_LABELS[method]}: test")
        bay = mean_sd([r["bayes_test_accuracy"] for r in runs])[0]
        ax.axhline(100 * bay, color="k", lw=0.8, ls=":", label="Bayes rule (test)")
        ax.axvline(21, color="grey", lw=0.8, ls="-.", label="21 inputs (19 noise removed)")
        ax.axvline(19, color="grey", lw=0.8, ls=":", label="19 informative inputs")
        ax.invert_xaxis()
        ax.set_xlabel("inputs kept")
        ax.set_ylabel("accuracy [%]")
        ax.set_title("Iterative removal with retraining")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        figs.save(fig, "accuracy_vs_inputs.png")
    return figs.paths
