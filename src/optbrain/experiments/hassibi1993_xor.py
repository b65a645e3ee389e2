"""Hassibi & Stork (1993), *Optimal Brain Surgeon*, §5: deleting one weight of a trained XOR net.

The paper trains a 2-2-1 sigmoid net with biases (9 weights: u11..u23 into the hidden units, the
third of each being the bias; v1, v2, v3 into the output, v3 the bias) on the four XOR patterns to
zero error and deletes one weight: magnitude pruning deletes v3 and OBD u22, and neither net can
relearn XOR even with retraining; OBS deletes u23 and, through its update, still solves XOR
*without retraining*. Over different initial conditions "only OBS deleted the correct weight in
every case", and the Hessian is far from diagonal (Fig. 4).

Here, for each of ``n_seeds`` initialisations (uniform ±``init_scale``), the net is trained by
full-batch L-BFGS on targets 0.1/0.9 (reachable at finite weights, so "zero error" is a true
minimum where the Gauss–Newton matrix equals the Hessian; :mod:`optbrain.data.xor`). The nets that
reach zero error (MSE ≤ ``zero_error``) are kept; each has one of its 9 parameters deleted by
magnitude, OBD (``obd_curvature`` diagonal) and OBS (with its update, α = ``alpha``). "Solved"
means all four outputs on the right side of 0.5 (zero classification error). Optionally each
damaged net is retrained (L-BFGS, the deleted weight held at 0) to see whether XOR can be relearnt.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import base
from .base import Claim, Progress, Result, Session
from .figures import FigureFiles, new_figure
from .hassibi_common import (
    LABELS,
    all_parameters_mask,
    fit,
    make_pruner,
    mse_problem,
    outputs,
    sigmoid_net,
)
from .stats import fmt, mean_sd

log = logging.getLogger(__name__)

NAME = "hassibi1993-xor"
SUMMARY = (
    "Optimal Brain Surgeon (Hassibi & Stork 1993) on XOR: one weight of a trained 2-2-1 net "
    "deleted by magnitude, OBD and OBS over many initialisations; Hessian off-diagonal mass"
)
TITLE = "Optimal Brain Surgeon (Hassibi & Stork 1993): XOR, one weight deleted"
METHODS = ("obs", "obd", "magnitude")

_PAPER = {
    "only_obs": "only OBS deleted the correct weight in every case (XOR still solved without "
    "retraining); magnitude (v3) and OBD (u22) did not",
    "ranking": "(implied by 'only OBS ... in every case') OBS keeps XOR solved more often",
    "relearn": "after the magnitude (v3) and OBD (u22) deletions XOR cannot be relearnt, even "
    "with retraining",
    "offdiag": "Fig. 4: the Hessian of the trained XOR net is far from diagonal",
}


@dataclass
class Config(base.Config):
    """Setting; the defaults are the full run. Initialisations ``seed .. seed+n_seeds-1`` are
    tried; those that train to MSE ≤ ``zero_error`` are used (at least ``min_trained``)."""

    seed: int = 0
    n_seeds: int = 150
    min_trained: int = 50
    init_scale: float = 2.0
    low: float = 0.1
    high: float = 0.9
    max_iter: int = 300
    zero_error: float = 1e-10
    alpha: float = 1e-6
    alpha_sweep: tuple[float, ...] = (1e-4, 1e-2)
    obd_curvature: Literal["ggn", "hessian"] = "ggn"
    retrain: bool = True
    offdiag_bar: float = 0.5
    figure_dpi: int = 90

    @classmethod
    def quick(cls) -> Config:
        """24 initialisations (about 10 train to zero error)."""
        return cls(n_seeds=16, min_trained=4, alpha_sweep=(1e-3,))

    def validate(self) -> None:
        need = self.need
        need(self.seed >= 0, "seed", "must be >= 0")
        need(self.n_seeds >= 1, "n_seeds", "must be >= 1")
        need(self.min_trained >= 1, "min_trained", "must be >= 1")
        need(self.init_scale > 0, "init_scale", "must be > 0")
        need(self.low < self.high, "high", "must be above low")
        need(self.max_iter >= 1, "max_iter", "must be >= 1")
        need(self.zero_error > 0, "zero_error", "must be > 0")
        need(self.alpha > 0, "alpha", "must be > 0")
        need(all(a > 0 for a in self.alpha_sweep), "alpha_sweep", "every α must be > 0")
        need(0 < self.offdiag_bar < 1, "offdiag_bar", "must be in (0, 1)")
        need(20 <= self.figure_dpi <= 300, "figure_dpi", "must be in [20, 300]")


# --------------------------------------------------------------------------- helpers
def weight_label(name: str, index: tuple[int, ...]) -> str:
    """The paper's name of a parameter entry: ``u{i}{j}`` into hidden unit i from input j (j = 3:
    the bias), ``v{j}`` into the output from hidden unit j (v3: the bias)."""
    if name == "0.weight":
        return f"u{index[0] + 1}{index[1] + 1}"
    if name == "0.bias":
        return f"u{index[0] + 1}3"
    if name == "2.weight":
        return f"v{index[1] + 1}"
    if name == "2.bias":
        return "v3"
    raise KeyError(f"not a parameter of the 2-2-1 net: {name!r}")


def _deleted(old, new) -> list[str]:
    out = []
    for k in old.names:
        for idx in (old[k] & ~new[k]).nonzero().tolist():
            out.append(weight_label(k, tuple(idx)))
    return out


def offdiag_mass(mat: Tensor) -> float:
    """‖H − diag H‖_F / ‖H‖_F (0: diagonal; 1: no diagonal at all)."""
    total = float(torch.linalg.matrix_norm(mat))
    if total == 0:
        return float("nan")
    off = mat - torch.diag(torch.diagonal(mat))
    return float(torch.linalg.matrix_norm(off)) / total


def _curvatures(problem) -> tuple[Tensor, Tensor, list[str]]:
    """Dense exact Hessian and Gauss–Newton matrix over the 9 parameters, with labels."""
    from ..curvature.inverse import DirectInverse

    hess, coords = DirectInverse(curvature="hessian").matrix(problem)
    ggn, _ = DirectInverse(curvature="ggn").matrix(problem)
    labels: list[str] = []
    for n in coords.names:
        shape = coords.shapes[n]
        for flat in coords.positions[n].tolist():
            idx = tuple(torch.unravel_index(torch.tensor(flat), shape))
            labels.append(weight_label(n, tuple(int(i) for i in idx)))
    return hess, ggn, labels


def _one_seed(cfg: Config, seed: int, x: Tensor, y: Tensor) -> dict[str, Any]:
    from ..data.xor import xor_solved
    from ..masking import apply_, attach

    model = sigmoid_net(2, 2, seed, init_scale=cfg.init_scale)
    res = fit(model, x, y, max_iter=cfg.max_iter)
    if not res.mse <= cfg.zero_error:
        return {"seed": seed, "trained": False, "mse": res.mse}
    mask = all_parameters_mask(model)
    hess, ggn, labels = _curvatures(mse_problem(model, x, y))
    row: dict[str, Any] = {
        "seed": seed,
        "trained": True,
        "mse": res.mse,
        "iterations": res.iterations,
        "offdiag_hessian": offdiag_mass(hess),
        "offdiag_ggn": offdiag_mass(ggn),
        "ggn_rank": int(torch.linalg.matrix_rank(ggn, hermitian=True, rtol=1e-10)),
        "hessian_minus_ggn": float(torch.linalg.matrix_norm(hess - ggn))
        / float(torch.linalg.matrix_norm(hess)),
        "labels": labels,
        "hessian": hess.tolist(),
    }
    for alpha in cfg.alpha_sweep:  # OBS's sensitivity to α (the paper: insensitive)
        work = copy.deepcopy(model)
        new, info = make_pruner("obs", alpha=alpha)(mse_problem(work, x, y), mask, 1)
        apply_(work, new)
        row[f"obs_alpha_{alpha:g}"] = {
            "deleted": _deleted(mask, new)[0],
            "solved": xor_solved(outputs(work, x), y),
        }
    for method in METHODS:
        work = copy.deepcopy(model)
        problem = mse_problem(work, x, y)
        pruner = make_pruner(method, alpha=cfg.alpha, obd_curvature=cfg.obd_curvature)
        new, info = pruner(problem, mask, 1)
        apply_(work, new)
        out = outputs(work, x)
        mse = float(nn.functional.mse_loss(out, y))
        row[method] = {
            "deleted": _deleted(mask, new)[0],
            "solved": xor_solved(out, y),
            "max_abs_error": float((out - y).abs().max()),
            "mse": mse,
            "predicted": info.predicted_increase,
            "max_abs_change": max(
                float((a - b).abs().max())
                for a, b in zip(work.state_dict().values(), model.state_dict().values())
            ),
        }
        if cfg.retrain:
            attach(work, new)
            fit(work, x, y, max_iter=cfg.max_iter)
            row[method]["solved_retrained"] = xor_solved(outputs(work, x), y)
    return row


# --------------------------------------------------------------------------- the experiment
def run(config: Config, out_dir: str | Path, progress: Progress | None = None) -> Result:
    """Run the reproduction into ``out_dir`` (see the module docstring) and return the result."""
    from ..data.xor import xor_data

    cfg = config
    session = Session(cfg, out_dir, cfg.n_seeds + 1, progress, log)
    x, y = xor_data(cfg.low, cfg.high, dtype=torch.float64)
    rows: list[dict[str, Any]] = []
    for seed in range(cfg.seed, cfg.seed + cfg.n_seeds):
        rows.append(_one_seed(cfg, seed, x, y))
        session.tick(
            f"seed {seed}: {'trained' if rows[-1]['trained'] else 'did not reach zero error'}"
        )
    trained = [r for r in rows if r["trained"]]
    session.write_json("seeds.json", rows)
    result = session.result(NAME, TITLE)
    _analyse(cfg, rows, trained, result)
    return session.finish(result, _figures(cfg, trained, session.out) if trained else [])


def _analyse(cfg: Config, rows, trained, result: Result) -> None:
    n = len(trained)
    result.notes = [
        f"Net: 2-2-1, sigmoid hidden and output units, 9 parameters (all prunable, biases "
        f"included). Targets {cfg.low:g}/{cfg.high:g}; inputs 0/1; objective mean squared error.",
        f"Training: full-batch L-BFGS (≤ {cfg.max_iter} iterations, float64) from {cfg.n_seeds} "
        f"initialisations uniform ±{cfg.init_scale:g} (seeds {cfg.seed}.."
        f"{cfg.seed + cfg.n_seeds - 1}); **{n} of {cfg.n_seeds} reached zero error** "
        f"(MSE ≤ {cfg.zero_error:g}), the others "
        "stopped in local minima or plateaus and are not used.",
        f"Deletion: one parameter by magnitude (w²), OBD (½ h w², {cfg.obd_curvature.upper()} "
        f"diagonal) and OBS (L_q = w_q²/(2[H⁻¹]_qq) with the update δw, H⁻¹ = (G + αI)⁻¹, "
        f"α = {cfg.alpha:g}); no retraining. Solved = all four outputs on the target side of 0.5.",
    ]
    if not trained:
        result.claims.append(
            Claim(
                f"at least {cfg.min_trained} nets trained to zero error",
                False,
                f"none of {cfg.n_seeds} initialisations reached zero error",
                "trained to zero error",
            )
        )
        return
    solved = _claims_deletion(cfg, trained, result, n)
    off_h, off_g, lo = _claim_offdiagonal(cfg, trained, result, n)

    _tables_deletion(cfg, trained, result, n, solved)
    _tables_seeds(cfg, trained, result, off_h, off_g, lo)


def _claims_deletion(cfg, trained, result, n):
    """The one-deletion claims: OBS solves XOR more often than OBD and magnitude."""
    solved = {m: sum(r[m]["solved"] for r in trained) for m in METHODS}
    frac = {m: solved[m] / n for m in METHODS}
    result.claims.append(
        Claim(
            name=f"at least {cfg.min_trained} nets trained to zero error",
            held=n >= cfg.min_trained,
            detail=f"{n} of {cfg.n_seeds} initialisations (the others are not used)",
            paper="the 2-2-1 net is trained to zero error, over different initial conditions",
        )
    )
    result.claims.append(
        Claim(
            name="only OBS keeps XOR solved after deleting one weight, in every case "
            "(no retraining)",
            held=solved["obs"] == n and solved["obd"] < n and solved["magnitude"] < n,
            detail=f"solved after the deletion: OBS {solved['obs']}/{n}, OBD {solved['obd']}/{n}, "
            f"magnitude {solved['magnitude']}/{n}",
            paper=_PAPER["only_obs"],
        )
    )
    for other in ("obd", "magnitude"):
        result.claims.append(
            Claim(
                name=f"OBS keeps XOR solved more often than {LABELS[other]} (no retraining)",
                held=frac["obs"] > frac[other],
                detail=f"OBS {100 * frac['obs']:.0f} %, {LABELS[other]} {100 * frac[other]:.0f} %"
                f" of {n} nets",
                paper=_PAPER["ranking"],
            )
        )
    if cfg.retrain:
        relearn = {m: sum(r[m]["solved_retrained"] for r in trained) for m in METHODS}
        result.claims.append(
            Claim(
                name="magnitude and OBD sometimes delete a weight after which XOR cannot be "
                "relearnt",
                held=relearn["obd"] < n and relearn["magnitude"] < n,
                detail="solved after retraining (L-BFGS, deleted weight held at 0): "
                + ", ".join(f"{LABELS[m]} {relearn[m]}/{n}" for m in METHODS),
                paper=_PAPER["relearn"],
            )
        )

    return solved


def _claim_offdiagonal(cfg, trained, result, n):
    """The Hessian's off-diagonal mass claim."""
    off_h = mean_sd([r["offdiag_hessian"] for r in trained])
    off_g = mean_sd([r["offdiag_ggn"] for r in trained])
    lo = min(r["offdiag_hessian"] for r in trained)
    result.claims.append(
        Claim(
            name=f"the Hessian is far from diagonal (‖offdiag‖_F/‖H‖_F > {cfg.offdiag_bar:g})",
            held=off_h[0] > cfg.offdiag_bar,
            detail=f"exact Hessian {fmt(off_h, 2)} (smallest {lo:.2f}); Gauss–Newton "
            f"{fmt(off_g, 2)}; mean ± sd over the {n} nets",
            paper=_PAPER["offdiag"],
        )
    )

    return off_h, off_g, lo


def _tables_deletion(cfg, trained, result, n, solved):
    """Per-method deletion summary and the α sweep."""
    # tables: per method, which weight is deleted and what happens
    summary = []
    for m in METHODS:
        counts: dict[str, int] = {}
        for r in trained:
            counts[r[m]["deleted"]] = counts.get(r[m]["deleted"], 0) + 1
        top = ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        row = {
            "method": LABELS[m],
            "solved_no_retraining": f"{solved[m]}/{n}",
            "solved_retrained": f"{sum(r[m]['solved_retrained'] for r in trained)}/{n}"
            if cfg.retrain
            else "",
            "mse_after_mean": mean_sd([r[m]["mse"] for r in trained])[0],
            "mse_after_median": sorted(r[m]["mse"] for r in trained)[n // 2],
            "largest_weight_change_median": sorted(r[m]["max_abs_change"] for r in trained)[n // 2],
            "deleted_weights": top,
        }
        summary.append(row)
    result.tables["deletion_summary"] = summary
    if cfg.alpha_sweep:
        same = {
            a: sum(r[f"obs_alpha_{a:g}"]["deleted"] == r["obs"]["deleted"] for r in trained)
            for a in cfg.alpha_sweep
        }
        result.tables["obs_alpha_sensitivity"] = [
            {
                "alpha": cfg.alpha,
                "solved": f"{solved['obs']}/{n}",
                "same_weight_as_default": f"{n}/{n}",
            }
        ] + [
            {
                "alpha": a,
                "solved": f"{sum(r[f'obs_alpha_{a:g}']['solved'] for r in trained)}/{n}",
                "same_weight_as_default": f"{same[a]}/{n}",
            }
            for a in cfg.alpha_sweep
        ]


def _tables_seeds(cfg, trained, result, off_h, off_g, lo):
    """Per-seed and curvature tables, rank notes."""
    result.tables["per_seed"] = [
        {
            "seed": r["seed"],
            "offdiag_H": round(r["offdiag_hessian"], 3),
            "ggn_rank": r["ggn_rank"],
            **{
                f"{m}_deleted": r[m]["deleted"]
                + ("" if r[m]["solved"] else " ✗")
                + (" (relearnt)" if cfg.retrain and r[m]["solved_retrained"] else "")
                for m in METHODS
            },
            "obs_predicted_dE": r["obs"]["predicted"],
            "obs_actual_dE": r["obs"]["mse"] - r["mse"],
        }
        for r in trained
    ]
    result.tables["curvature"] = [
        {
            "matrix": "exact Hessian",
            "offdiag_mass_mean": off_h[0],
            "offdiag_mass_sd": off_h[1],
            "min": lo,
            "max": max(r["offdiag_hessian"] for r in trained),
        },
        {
            "matrix": "Gauss–Newton (OBS's)",
            "offdiag_mass_mean": off_g[0],
            "offdiag_mass_sd": off_g[1],
            "min": min(r["offdiag_ggn"] for r in trained),
            "max": max(r["offdiag_ggn"] for r in trained),
        },
    ]
    ranks = sorted({r["ggn_rank"] for r in trained})
    gap = max(r["hessian_minus_ggn"] for r in trained)
    result.notes.append(
        f"At zero error the exact Hessian equals the Gauss–Newton matrix (largest relative "
        f"difference {gap:.1e}); its rank is {', '.join(map(str, ranks))} (4 patterns, 9 "
        "weights), so OBS's inverse exists only through α."
    )


def _figures(cfg: Config, trained, out: Path) -> list[str]:
    figs = FigureFiles(out, cfg.figure_dpi)

    # Fig. 4: one Hessian
    first = trained[0]
    hess = torch.tensor(first["hessian"])
    labels = first["labels"]
    fig = new_figure(4.6, 4.0)
    ax = fig.subplots()
    lim = float(hess.abs().max())
    im = ax.imshow(hess.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_title(
        f"Fig. 4 — Hessian of a trained XOR net (seed {first['seed']})\n"
        f"‖offdiag‖/‖H‖ = {first['offdiag_hessian']:.2f}",
        fontsize=9,
    )
    fig.colorbar(im, ax=ax, shrink=0.8)
    figs.save(fig, "fig4_hessian.png")

    # how often XOR is still solved, per method
    n = len(trained)
    fig = new_figure(5.6, 3.4)
    ax = fig.subplots()
    xs = range(len(METHODS))
    no = [100 * sum(r[m]["solved"] for r in trained) / n for m in METHODS]
    ax.bar([i - 0.2 for i in xs], no, width=0.4, label="no retraining", color="C0")
    if cfg.retrain:
        re = [100 * sum(r[m]["solved_retrained"] for r in trained) / n for m in METHODS]
        ax.bar([i + 0.2 for i in xs], re, width=0.4, label="retrained", color="C1")
    ax.set_xticks(list(xs), [LABELS[m] for m in METHODS])
    ax.set_ylabel(f"XOR still solved [% of {n} nets]")
    ax.set_ylim(0, 105)
    ax.set_title("one weight deleted from a trained 2-2-1 XOR net", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    figs.save(fig, "solved_after_deletion.png")

    # off-diagonal mass over seeds
    fig = new_figure(4.6, 3.2)
    ax = fig.subplots()
    ax.hist([r["offdiag_hessian"] for r in trained], bins=15, range=(0, 1), color="C2")
    ax.axvline(cfg.offdiag_bar, color="grey", ls=":", lw=1)
    ax.set_xlabel("‖H − diag H‖_F / ‖H‖_F (exact Hessian)")
    ax.set_ylabel("nets")
    ax.set_title(f"off-diagonal mass over {n} trained nets", fontsize=9)
    figs.save(fig, "offdiag_mass.png")
    return figs.paths
