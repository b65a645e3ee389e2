"""Analysis of the extreme-sparsity study: tables (mean ± sd over seeds), the claims that check the
course project's two conclusions (PAPERS.md §14.2), the curvature-diagonal check and the figures.

The course project's conclusions, as its README and its own curves state them:

1. *"SNIP is good at extreme levels"*: SNIP (pruned at initialisation, then trained) should match
   or beat the methods that prune the trained network and retrain, at 97 % and beyond.
2. *Its retrained curves order "OBD" > magnitude > SNIP > random* (90–99 %), "OBD" being the
   squared accumulated-gradient score (``course_obd``).

Both are checked on every task of the run, with the retrained scores averaged over seeds and over
the levels named (a claim holds when the mean order holds; ties within 0.005 count as holding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .base import Claim, Result
from .extreme_sparsity_methods import LABELS, METHODS
from .figures import FigureFiles, band, new_figure
from .stats import mean_sd

__all__ = ["COURSE", "analyse", "curvature_check", "figures"]

#: The course project's BLEU (0–1), PAPERS.md §14.2: level → (before, after) retraining; SNIP and
#: magnitude after (re)training only. Dense ≈ 0.283.
COURSE = {
    "dense": 0.283,
    "course_obd": {0.5: (0.2745, 0.2778), 0.8: (0.2182, 0.2678), 0.9: (0.1560, 0.2537),
                   0.95: (0.0561, 0.2217), 0.97: (0.0051, 0.1874), 0.99: (0.0036, 0.1109),
                   0.995: (0.0575, 0.0733)},
    "snip": {0.5: (None, 0.2210), 0.8: (None, 0.2270), 0.9: (None, 0.2191), 0.95: (None, 0.1846),
             0.97: (None, 0.1480), 0.99: (None, 0.0524), 0.995: (None, 0.0375)},
    "magnitude_blind": {0.5: (0.2454, None), 0.8: (0.0200, None), 0.9: (0.0001, None),
                        0.91: (None, 0.2513), 0.95: (None, 0.2074), 0.97: (None, 0.1306),
                        0.99: (None, 0.0240), 0.995: (None, 0.0039)},
    "random": {0.91: (None, 0.1716), 0.95: (None, 0.0843), 0.99: (None, 0.0220)},
}  # fmt: skip
TIE = 0.005
EXTREME = (0.97, 0.99, 0.995)
RETRAINED = (0.9, 0.95, 0.97, 0.99)


# --------------------------------------------------------------------------- summaries
def _scores(sweep: dict, method: str, level: float, when: str) -> list[float]:
    out = []
    for r in sweep["runs"]:
        if r["method"] == method and math.isclose(r["level"], level) and r[when] is not None:
            out.append(r[when]["score"])
    return out


def _mean(sweep: dict, method: str, levels: Sequence[float], when: str) -> float:
    """Mean over seeds and over ``levels`` (those run) of the ``when`` score; NaN if none."""
    vals = [s for lv in levels for s in _scores(sweep, method, lv, when)]
    return sum(vals) / len(vals) if vals else math.nan


def summary_rows(cfg, sweep: dict) -> list[dict[str, Any]]:
    """One row per (method, level): score before and after retraining (mean ± sd), the measured
    objective increase of the pruning call and OBD's curvature re-estimates."""
    rows = []
    for method in cfg.methods:
        for lv in cfg.levels:
            runs = [r for r in sweep["runs"] if r["method"] == method and r["level"] == lv]
            if not runs:
                continue
            b = mean_sd([r["before"]["score"] for r in runs])
            a = mean_sd([r["after"]["score"] for r in runs if r["after"] is not None])
            rows.append({
                "method": LABELS[method], "sparsity %": round(100 * lv, 1),
                "before": _pm(b), "after": _pm(a),
                "measured ΔE": mean_sd([r["measured"] for r in runs])[0],
                "re-estimates": mean_sd([r["re_estimates"] for r in runs])[0],
            })  # fmt: skip
    return rows


def _pm(stats: tuple[float, float]) -> str:
    return "–" if math.isnan(stats[0]) else f"{stats[0]:.3f} ± {stats[1]:.3f}"


def where_rows(cfg, sweep: dict, level: float) -> list[dict[str, Any]]:
    """Per method at ``level``: the fraction of every weight class pruned (mean over seeds)."""
    rows = []
    for method in cfg.methods:
        runs = [r for r in sweep["runs"] if r["method"] == method and r["level"] == level]
        if not runs:
            continue
        row: dict[str, Any] = {"method": LABELS[method]}
        for c in runs[0]["where"]:
            row[c] = round(100 * mean_sd([r["where"][c]["pruned"] for r in runs])[0], 1)
        rows.append(row)
    return rows


def course_rows(cfg, sweep: dict) -> list[dict[str, Any]]:
    """The course project's BLEU beside ours for its methods and levels (NMT only)."""
    rows = []
    for method in ("course_obd", "obd", "snip", "magnitude_blind", "random"):
        ref = COURSE.get(method if method != "obd" else "course_obd", {})
        for lv in cfg.levels:
            b, a = ref.get(lv, (None, None)) if method != "obd" else (None, None)
            ours_b = mean_sd(_scores(sweep, method, lv, "before"))
            ours_a = mean_sd(_scores(sweep, method, lv, "after"))
            if method not in cfg.methods:
                continue
            rows.append({
                "method": LABELS[method], "sparsity %": round(100 * lv, 1),
                "course before": b, "ours before": _pm(ours_b) if method != "snip" else "–",
                "course after": a, "ours after": _pm(ours_a),
            })  # fmt: skip
    return rows


# --------------------------------------------------------------------------- claims
def _order_claim(cfg, task: str, sweep: dict, order: Sequence[str], paper: str) -> Claim | None:
    levels = [lv for lv in RETRAINED if any(math.isclose(lv, x) for x in cfg.levels)]
    if not levels or any(m not in cfg.methods for m in order):
        return None
    means = [_mean(sweep, m, levels, "after") for m in order]
    if any(math.isnan(v) for v in means):
        return None
    held = all(a >= b - TIE for a, b in zip(means, means[1:]))
    detail = " ≥ ".join(f"{m} {v:.3f}" for m, v in zip(order, means))
    return Claim(
        f"{task}: retrained order {' > '.join(order)} "
        f"(mean over {', '.join(f'{100 * x:g}' for x in levels)} %, {len(cfg.seeds)} seeds)",
        held, detail, paper,
    )  # fmt: skip


def _snip_claim(cfg, task: str, sweep: dict) -> Claim | None:
    levels = [lv for lv in EXTREME if any(math.isclose(lv, x) for x in cfg.levels)]
    if not levels or "snip" not in cfg.methods:
        return None
    snip = _mean(sweep, "snip", levels, "after")
    rivals = {m: _mean(sweep, m, levels, "after") for m in cfg.methods if m not in ("snip",)}
    rivals = {m: v for m, v in rivals.items() if not math.isnan(v)}
    if not rivals or math.isnan(snip):
        return None
    best = max(rivals, key=rivals.get)
    held = snip >= rivals[best] - TIE
    return Claim(
        f"{task}: SNIP is good at extreme levels, trained SNIP ≥ every retrained method "
        f"(mean over {', '.join(f'{100 * x:g}' for x in levels)} %, {len(cfg.seeds)} seeds)",
        held, f"SNIP {snip:.3f}; best retrained: {best} {rivals[best]:.3f}",
        'course README: "SNIP is good at extreme levels"',
    )  # fmt: skip


def _low_sparsity_claim(cfg, task: str, sweep: dict) -> Claim | None:
    lv = min(cfg.levels)
    dense = mean_sd([d["score"] for d in sweep["dense"]])[0]
    vals = {m: _mean(sweep, m, [lv], "before") for m in ("obd", "magnitude_blind")}
    vals = {m: v for m, v in vals.items() if m in cfg.methods and not math.isnan(v)}
    if not vals:
        return None
    best = max(vals.values())
    held = best >= dense - 0.05 * max(dense, 1e-12)
    detail = f"dense {dense:.3f}; " + ", ".join(f"{m} {v:.3f}" for m, v in vals.items())
    return Claim(
        f"{task}: at {100 * lv:g} % the best of OBD and magnitude, without retraining, keeps "
        f"≥ 95 % of the dense score", held, detail, "See et al. 2016: 40-50 % prunable for free",
    )  # fmt: skip


def _random_claim(cfg, task: str, sweep: dict) -> Claim | None:
    lv = max(cfg.levels)
    if "random" not in cfg.methods or lv < 0.95:
        return None
    dense = mean_sd([d["score"] for d in sweep["dense"]])[0]
    rnd = _mean(sweep, "random", [lv], "before")
    return Claim(
        f"{task}: random deletion of {100 * lv:g} % collapses the model (< half the dense score)",
        rnd < 0.5 * dense, f"dense {dense:.3f}, random {rnd:.3f}", "a control",
    )  # fmt: skip


def claims(cfg, task: str, sweep: dict) -> list[Claim]:
    """The task's claims (module doc), those that the run's methods and levels allow."""
    out = [_low_sparsity_claim(cfg, task, sweep), _random_claim(cfg, task, sweep)]
    if any(r["after"] is not None for r in sweep["runs"] if r["method"] != "snip"):
        course = "course curves: OBD > magnitude > SNIP > random"
        for first, paper in (("course_obd", course), ("obd", course + " (true OBD)")):
            order = (first, "magnitude_blind", "snip", "random")
            out.append(_order_claim(cfg, task, sweep, order, paper))
        out.append(_snip_claim(cfg, task, sweep))
    return [c for c in out if c is not None]


def analyse(cfg, sweeps: dict, checks: list[dict], result: Result) -> None:
    """Fill ``result`` with the tables and claims of every task of the run."""
    for task, sweep in sweeps.items():
        dense = [d["score"] for d in sweep["dense"]]
        result.tables[f"{task}_dense"] = [{
            "task": task, "score": _pm(mean_sd(dense)),
            "objective": mean_sd([d["objective"] for d in sweep["dense"]])[0],
            "weights": sweep["dense"][0]["weights"],
        }]  # fmt: skip
        result.tables[f"{task}_summary"] = summary_rows(cfg, sweep)
        mid = min(cfg.levels, key=lambda x: abs(x - 0.9))
        result.tables[f"{task}_where_{round(1000 * mid)}"] = where_rows(cfg, sweep, mid)
        if task == "nmt":
            result.tables["nmt_course"] = course_rows(cfg, sweep)
        result.claims += claims(cfg, task, sweep)
        if all(r["after"] is None for r in sweep["runs"] if r["method"] != "snip"):
            result.notes.append(
                f"{task}: retraining budget 0, only scores without retraining; the claims on "
                "retrained curves are not evaluated"
            )
    if checks:
        result.tables["curvature_check"] = checks
    result.notes.append(
        "BLEU: sacrebleu corpus BLEU on a 0-1 scale (score/100), tokenize='none', greedy decoding"
    )


# --------------------------------------------------------------------------- curvature check
def curvature_check(cfg, task, model) -> list[dict[str, Any]]:
    """LeCun's diagonal (the one OBD uses), the MC-free exact Gauss–Newton diagonal and the course
    score on ``cfg.curvature_check_samples`` training sentences of the trained ``model``: the
    relative error of each diagonal against the exact GGN and how much of the 90 % set that
    ½ h w² deletes with the exact GGN each one deletes too."""
    import torch

    from ..curvature import GGNDiagonal, LeCunDiagonal
    from ..masking import Mask
    from ..problem import Problem
    from ..saliency import AccumulatedGradient

    x, y = task.prune_data[0]
    n = cfg.curvature_check_samples
    problem = Problem(model, task.loss_fn, [(x[:n], y[:n])])
    names = Mask.ones(model).names
    params = problem.parameters()
    w2 = torch.cat([params[k].detach().flatten().square() for k in names])

    def flat(d):
        return torch.cat([d[k].flatten() for k in names])

    exact = flat(GGNDiagonal().diagonal(problem))
    lecun = flat(LeCunDiagonal().diagonal(problem))
    course = flat(AccumulatedGradient()(problem))
    ref_set = _lowest(0.5 * exact * w2, 0.9)
    rows = []
    for name, score, diag in (("LeCun (OBD)", 0.5 * lecun * w2, lecun),
                              ("course ½ g_acc² w²", course, None)):  # fmt: skip
        rel = float((diag - exact).norm() / exact.norm()) if diag is not None else math.nan
        overlap = len(ref_set & _lowest(score, 0.9)) / max(len(ref_set), 1)
        rows.append({"score": name, "rel. error vs exact GGN": rel, "overlap of 90 % set": overlap,
                     "samples": n})  # fmt: skip
    return rows


def _lowest(score, fraction: float) -> set[int]:
    k = int(fraction * score.numel())
    return set(score.argsort()[:k].tolist())


# --------------------------------------------------------------------------- figures
def figures(cfg, sweeps: dict, out) -> list[str]:
    """Per task: score against sparsity without and with retraining, mean ± sd over seeds."""
    files = FigureFiles(out, cfg.figure_dpi)
    for task, sweep in sweeps.items():
        fig = new_figure(10, 3.8)
        axes = fig.subplots(1, 2, sharey=True)
        dense = mean_sd([d["score"] for d in sweep["dense"]])[0]
        x = [100 * lv for lv in cfg.levels]
        for ax, when, title in ((axes[0], "before", "without retraining"),
                                (axes[1], "after", "with retraining (SNIP: trained)")):  # fmt: skip
            for method in cfg.methods:
                if when == "before" and method == "snip":
                    continue
                stats = [mean_sd(_scores(sweep, method, lv, when)) for lv in cfg.levels]
                if all(math.isnan(s[0]) for s in stats):
                    continue
                color = f"C{METHODS.index(method) % 10}"
                band(ax, x, stats, marker="o", ms=3, color=color, label=LABELS[method])
            ax.axhline(dense, color="k", ls=":", lw=1, label="dense")
            ax.set_xscale("function", functions=(_stretch, _unstretch))
            ax.set_xlim(x[0] - 1, x[-1] + 0.1 * (100 - x[-1]))
            ax.set_xticks(x)
            ax.set_xticklabels([f"{v:g}" for v in x], fontsize=7)
            ax.set_xlabel("sparsity %")
            ax.set_title(title, fontsize=9)
        axes[0].set_ylabel(sweep.get("metric", "score"))
        axes[1].legend(fontsize=6, loc="upper right")
        fig.suptitle(f"{task}: {len(cfg.seeds)} seeds, mean ± sd", fontsize=9)
        files.save(fig, f"{task}_sweep.png")
    return files.paths


def _stretch(p):
    """Sparsity % on the axis as −log10(1 − p/100): 50, 90, 99 and 99.5 % evenly readable."""
    import numpy as np

    return -np.log10(np.clip(1 - np.asarray(p) / 100, 1e-4, None))


def _unstretch(v):
    import numpy as np

    return 100 * (1 - np.power(10.0, -np.asarray(v)))
