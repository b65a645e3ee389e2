"""Optimal Cell Damage on the 8×8 digits: which of the 64 pixels OCD keeps.

For each seed an MLP 64-H-10 is trained on scikit-learn's digits with early stopping on a
validation split carved from the training part of the fixed stratified split used by
:mod:`~optbrain.experiments.lecun1990`. Then

* **saliency image**: the OCD saliency of every pixel (the sum of the OBD saliencies ½ h w² of its
  fan-out weights) drawn as an 8×8 image, next to the pixel variance of the training images;
* **constant pixels**: pixels that are zero in every training image get h = 0 on all their
  fan-out weights and so OCD saliency exactly 0: they must rank lowest (whatever their weights);
* **border**: where the lowest-ranked pixels lie (first and last columns, outer ring);
* **accuracy against pixels kept**: pixels are removed ``remove_per_round`` at a time by OCD
  (re-estimated after every retraining), by the magnitude of the fan-out (Σ ½ w², re-estimated) and
  in a random order, with retraining (early stopping) after every step. Claim: the fewest pixels
  with which the mean test accuracy stays within ``accuracy_drop`` of the full net, per method.

The scores and the removal loop are those of :mod:`~optbrain.experiments.input_selection`, shared
with :mod:`~optbrain.experiments.cibas1994_waveform`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from . import base
from .base import Claim, Progress, Result, Session
from .figures import FigureFiles, band, new_figure
from .input_selection import (
    Split,
    input_scores,
    ranks,
    removal_curve,
    removal_path,
    train_net,
)
from .stats import fmt, mean_sd, seeds_tag

log = logging.getLogger(__name__)

NAME = "digits-ocd"
SUMMARY = (
    "Optimal Cell Damage on the 8x8 digits: which pixels OCD keeps (saliency image) and "
    "accuracy against pixels kept, against fan-out magnitude and random orders"
)
TITLE = "Optimal Cell Damage on the 8×8 digits: which pixels matter"

_LABELS = {"ocd": "OCD", "magnitude": "fan-out magnitude", "random": "random order"}
_COLORS = {"ocd": "C0", "magnitude": "C1", "random": "C3"}
_PAPER = {
    "constant": "a pixel that is constant zero carries no information; OCD (Σ ½ h w² over its "
    "fan-out) gives it saliency 0 since h = 0 there",
    "border": "(ours) the border pixels of the digits, nearly constant zero, rank lowest",
    "pixels": "(ours) accuracy within the allowed drop of the full net with few pixels; OCD needs "
    "fewer pixels than fan-out magnitude and random orders",
}


@dataclass
class Config(base.Config):
    """Setting of the reproduction; the defaults are the full run (5 seeds).

    ``val_fraction`` of the training part (stratified) is the validation split for early stopping
    (``patience``, at most ``epochs``; after each removal ``retrain_patience`` /
    ``retrain_epochs``). ``methods`` are the removal orders compared.
    """

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    hidden: int = 32
    test_size: float = 0.3
    val_fraction: float = 0.25
    split_seed: int = 0
    lr: float = 1e-2
    batch_size: int = 128
    epochs: int = 300
    patience: int = 20
    curvature: Literal["ggn", "hessian", "lecun", "empirical_fisher"] = "ggn"
    methods: tuple[Literal["ocd", "magnitude", "random"], ...] = ("ocd", "magnitude", "random")
    remove_per_round: int = 4
    min_inputs: int = 4
    retrain_epochs: int = 100
    retrain_patience: int = 10
    accuracy_drop: float = 0.01
    lowest: int = 8
    figure_dpi: int = 90

    @classmethod
    def quick(cls) -> Config:
        """One seed, OCD against random, 16 pixels removed per step, short retraining."""
        return cls(
            seeds=(0,),
            methods=("ocd", "random"),
            remove_per_round=16,
            min_inputs=16,
            retrain_epochs=20,
            retrain_patience=5,
            patience=10,
        )

    def validate(self) -> None:
        need = self.need
        self.need_seeds()
        need(self.hidden >= 1, "hidden", "must be >= 1")
        need(0.0 < self.test_size < 1.0, "test_size", "must be in (0, 1)")
        need(0.0 < self.val_fraction < 1.0, "val_fraction", "must be in (0, 1)")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.epochs >= 1, "epochs", "must be >= 1")
        need(self.patience >= 1, "patience", "must be >= 1")
        need(
            len(self.methods) > 0 and len(set(self.methods)) == len(self.methods),
            "methods",
            "give distinct methods",
        )
        need(self.remove_per_round >= 1, "remove_per_round", "must be >= 1")
        need(1 <= self.min_inputs < 64, "min_inputs", "must be in [1, 64)")
        need(self.retrain_epochs >= 1, "retrain_epochs", "must be >= 1")
        need(self.retrain_patience >= 1, "retrain_patience", "must be >= 1")
        need(0 <= self.accuracy_drop < 1, "accuracy_drop", "must be in [0, 1)")
        need(1 <= self.lowest <= 32, "lowest", "must be in [1, 32]")
        need(20 <= self.figure_dpi <= 300, "figure_dpi", "must be in [20, 300]")


BORDER = tuple(i for i in range(64) if i // 8 in (0, 7) or i % 8 in (0, 7))
"""The 28 pixels of the outer ring of the 8×8 image (row-major indices)."""
SIDES = tuple(i for i in range(64) if i % 8 in (0, 7))
"""The 16 pixels of the first and last columns."""


def _data(cfg: Config) -> Split:
    from sklearn.model_selection import train_test_split

    from ..data.digits import load_digits_split

    d = load_digits_split(test_size=cfg.test_size, seed=cfg.split_seed, flat=True)
    idx = torch.arange(len(d.y_train)).numpy()
    tr, va = train_test_split(
        idx, test_size=cfg.val_fraction, random_state=cfg.split_seed, stratify=d.y_train.numpy()
    )
    tr, va = torch.as_tensor(tr), torch.as_tensor(va)
    return Split(d.x_train[tr], d.y_train[tr], d.x_train[va], d.y_train[va], d.x_test, d.y_test)


def _one_seed(cfg: Config, split: Split, seed: int, tick: Callable[[str], None]):
    from ..models.digits import digits_mlp

    model = digits_mlp(hidden=(cfg.hidden,), activation="tanh", seed=seed)
    out: dict[str, Any] = {
        **train_net(model, split, cfg, seed),
        "scores": {
            m: input_scores(m, model, split, curvature=cfg.curvature, seed=seed).tolist()
            for m in ("ocd", "magnitude")
        },
        "removal": {},
    }
    tick(f"seed {seed}: trained")
    fixed = input_scores("random", model, split, seed=10_000 + seed)
    for method in cfg.methods:

        def score(m: nn.Module, r: int, method=method, fixed=fixed):
            if method == "random":
                return fixed
            return input_scores(method, m, split, curvature=cfg.curvature)

        out["removal"][method] = removal_path(model, split, score, cfg, seed)
        tick(f"seed {seed}: removal by {_LABELS[method]}")
    return out


def run(config: Config, out_dir: str | Path, progress: Progress | None = None) -> Result:
    """Run the reproduction into ``out_dir`` (see the module docstring) and return the result."""
    cfg = config
    session = Session(cfg, out_dir, len(cfg.seeds) * (1 + len(cfg.methods)) + 1, progress, log)
    split = _data(cfg)
    constant = [i for i in range(64) if float(split.x_train[:, i].abs().max()) == 0.0]
    variance = split.x_train.double().var(0)
    runs = [_one_seed(cfg, split, s, session.tick) for s in cfg.seeds]
    result = session.result(NAME, TITLE)
    session.write_json(
        "runs.json", {"constant_pixels": constant, "variance": variance.tolist(), "runs": runs}
    )
    _analyse(cfg, runs, constant, variance, result)
    n_train, n_val, n_test = len(split.y_train), len(split.y_val), len(split.y_test)
    result.notes = _notes(cfg, (n_train, n_val, n_test), constant)
    return session.finish(result, _figures(cfg, runs, variance, session.out))


def _pixel(i: int) -> str:
    return f"({i // 8},{i % 8})"


def smallest_within(rows_per_seed: list[list[dict[str, Any]]], drop: float) -> tuple[int, int]:
    """From the mean test accuracy over seeds along the removal path: (the fewest inputs kept whose
    mean accuracy is within ``drop`` of the full net, the same but stopping at the first step that
    falls outside)."""
    kept, acc = removal_curve(rows_per_seed, "test_accuracy")
    full = acc[0][0]
    ok = [k for k, a in zip(kept, acc) if a[0] >= full - drop - 1e-12]
    contiguous = kept[0]
    for k, a in zip(kept, acc):
        if a[0] < full - drop - 1e-12:
            break
        contiguous = k
    return min(ok), contiguous


def _analyse(cfg: Config, runs, constant: list[int], variance, result: Result) -> None:
    ns = len(runs)
    tag = seeds_tag(ns)
    _constant_pixels_claim(runs, constant, result, ns, tag)
    _border_claim(cfg, runs, variance, result, tag)
    _accuracy_claims(cfg, runs, result, tag)


def _constant_pixels_claim(runs, constant, result, ns, tag):
    """Constant pixels: saliency exactly 0, ranked lowest."""
    # constant pixels: saliency exactly 0, ranked lowest
    ok_const, worst_mag = 0, []
    for r in runs:
        s = torch.tensor(r["scores"]["ocd"], dtype=torch.float64)
        rk = ranks(s)
        nc = len(constant)
        zero = all(float(s[i]) == 0.0 for i in constant)
        lowest = all(int(rk[i]) < nc for i in constant)
        others_positive = all(float(s[i]) > 0 for i in range(64) if i not in constant)
        ok_const += zero and lowest and others_positive
        mrk = ranks(torch.tensor(r["scores"]["magnitude"], dtype=torch.float64))
        worst_mag.append(max(int(mrk[i]) for i in constant) + 1 if constant else 0)
    wm = mean_sd(worst_mag)
    result.claims.append(
        Claim(
            name=f"The {len(constant)} pixels that are zero in every training image get OCD "
            f"saliency 0 and rank lowest {tag}",
            held=ok_const == ns and len(constant) > 0,
            detail=(
                f"pixels {', '.join(_pixel(i) for i in constant)} (row, column): saliency exactly "
                f"0 and ranked 1..{len(constant)} in {ok_const}/{ns} seeds, every other pixel "
                f"> 0; by fan-out magnitude the worst of them ranks {fmt(wm)} of 64"
            ),
            paper=_PAPER["constant"],
        )
    )


def _border_claim(cfg, runs, variance, result, tag):
    """Where the lowest-ranked pixels lie: the border."""
    # border: where the lowest-ranked pixels lie
    k = cfg.lowest
    per_seed = []
    for r in runs:
        for m in ("ocd", "magnitude"):
            rk = ranks(torch.tensor(r["scores"][m], dtype=torch.float64))
            low = [i for i in range(64) if int(rk[i]) < k]
            per_seed.append(
                {
                    "seed": r["seed"],
                    "ranking": m,
                    f"{k} lowest pixels (row,col)": " ".join(_pixel(i) for i in sorted(low)),
                    "on the outer ring": sum(i in BORDER for i in low),
                    "in the first/last column": sum(i in SIDES for i in low),
                }
            )
    result.tables["lowest_pixels"] = per_seed
    ring = [row["on the outer ring"] for row in per_seed if row["ranking"] == "ocd"]
    sides = [row["in the first/last column"] for row in per_seed if row["ranking"] == "ocd"]
    mag_ring = [row["on the outer ring"] for row in per_seed if row["ranking"] == "magnitude"]
    var_low = ranks(variance)
    var_ring = sum(int(var_low[i]) < k and i in BORDER for i in range(64))
    result.claims.append(
        Claim(
            name=f"The {k} lowest-ranked pixels by OCD are border pixels {tag}",
            held=min(ring) == k,
            detail=(
                f"on the outer ring: {', '.join(map(str, ring))} of {k} per seed (in the first or "
                f"last column: {', '.join(map(str, sides))}); by fan-out magnitude "
                f"{', '.join(map(str, mag_ring))}; the {k} lowest-variance pixels: {var_ring} on "
                "the ring"
            ),
            paper=_PAPER["border"],
        )
    )


def _accuracy_claims(cfg, runs, result, tag):
    """Accuracy against pixels kept."""
    # accuracy against pixels kept
    full = mean_sd([r["test_accuracy"] for r in runs])
    n_min = {}
    for method in cfg.methods:
        rows = [r["removal"][method] for r in runs]
        n_min[method] = smallest_within(rows, cfg.accuracy_drop)
        kx, test = removal_curve(rows, "test_accuracy", 100)
        _, val = removal_curve(rows, "val_accuracy", 100)
        for kk, t, v in zip(kx, test, val):
            result.tables.setdefault("accuracy_vs_pixels_kept", []).append(
                {
                    "removal": method,
                    "pixels kept": kk,
                    "test acc %": round(t[0], 2),
                    "test sd": round(t[1], 2),
                    "val acc %": round(v[0], 2),
                    "val sd": round(v[1], 2),
                }
            )
    if "ocd" in cfg.methods:
        others = {m: n_min[m] for m in cfg.methods if m != "ocd"}
        n_ocd, n_ocd_c = n_min["ocd"]
        rows = [r["removal"]["ocd"] for r in runs]
        kx, test = removal_curve(rows, "test_accuracy", 100)
        at = dict(zip(kx, test))
        result.claims.append(
            Claim(
                name=f"Accuracy within {100 * cfg.accuracy_drop:g} point of the full net with "
                f"{n_ocd} of 64 pixels chosen by OCD, fewer than the other orders need {tag}",
                held=all(n_ocd < v[0] for v in others.values()),
                detail=(
                    f"full net {100 * full[0]:.1f} ± {100 * full[1]:.1f} % test accuracy; mean "
                    f"test accuracy within {100 * cfg.accuracy_drop:g} point down to {n_ocd} "
                    f"pixels by OCD ({fmt(at[n_ocd])} %; without a "
                    f"dip on the way: {n_ocd_c})"
                    + "".join(
                        f"; {_LABELS[m]}: {v[0]} (without a dip: {v[1]})" for m, v in others.items()
                    )
                    + f"; steps of {cfg.remove_per_round} pixels, mean over seeds, read on the "
                    "test set"
                ),
                paper=_PAPER["pixels"],
            )
        )
        for kk in (16, 8):
            if kk not in at:
                continue
            vals = {}
            for m in cfg.methods:
                kx_m, t_m = removal_curve([r["removal"][m] for r in runs], "test_accuracy", 100)
                vals[m] = dict(zip(kx_m, t_m))[kk]
            order = sorted(cfg.methods, key=lambda m: -vals[m][0])
            result.claims.append(
                Claim(
                    name=f"With {kk} pixels kept OCD's pixels give the highest test accuracy {tag}",
                    held=order[0] == "ocd",
                    detail="; ".join(f"{_LABELS[m]} {fmt(vals[m])} %" for m in cfg.methods)
                    + " (retrained, mean ± sd over seeds)",
                    paper=_PAPER["pixels"],
                )
            )
    result.tables["accuracy"] = [
        {
            "seed": r["seed"],
            "epochs (early stopping)": r["epochs"],
            "val accuracy": round(r["val_accuracy"], 4),
            "test accuracy": round(r["test_accuracy"], 4),
        }
        for r in runs
    ]


def _notes(cfg: Config, sizes: tuple[int, int, int], constant: list[int]) -> list[str]:
    return [
        f"Data: scikit-learn `load_digits` (pixels/16), the stratified split of lecun1990 "
        f"(test_size={cfg.test_size}, seed {cfg.split_seed}) with {100 * cfg.val_fraction:g} % of "
        f"its training part as validation split: {sizes[0]} train / {sizes[1]} validation / "
        f"{sizes[2]} test digits. Pixels are (row, column), row-major index = 8·row + column; "
        f"{len(constant)} pixels are zero in every training image.",
        f"Net: MLP 64-{cfg.hidden}-10 (tanh), Adam lr {cfg.lr}, batch {cfg.batch_size}, "
        f"cross-entropy, early stopping on the validation loss (patience {cfg.patience}, at most "
        f"{cfg.epochs} epochs); seeds {list(cfg.seeds)} vary initialisation and batch order.",
        f"OCD: S_i = Σ_fan-out ½ h w² with the {cfg.curvature} diagonal on the training data; "
        "fan-out magnitude: Σ_fan-out ½ w²; random: one fixed random order per seed.",
        f"Removal: {cfg.remove_per_round} pixels per step down to {cfg.min_inputs}, scores "
        f"recomputed after every retraining (early stopping, patience {cfg.retrain_patience}, at "
        f"most {cfg.retrain_epochs} epochs).",
    ]


def _figures(cfg: Config, runs, variance, out: Path) -> list[str]:
    import numpy as np

    figs = FigureFiles(out, cfg.figure_dpi)
    # saliency image: mean over seeds of the saliency normalised by its maximum
    sal = np.array([np.array(r["scores"]["ocd"]) / max(r["scores"]["ocd"]) for r in runs]).mean(0)
    mag = np.array(
        [np.array(r["scores"]["magnitude"]) / max(r["scores"]["magnitude"]) for r in runs]
    ).mean(0)
    rk = np.array([ranks(torch.tensor(r["scores"]["ocd"])).numpy() for r in runs]).mean(0)
    panels = [
        ("OCD saliency (mean, / max)", sal, "magma"),
        ("OCD rank (mean; 0 = lowest)", rk, "viridis"),
        ("fan-out magnitude (mean, / max)", mag, "magma"),
        ("pixel variance (training images)", variance.numpy(), "gray"),
    ]
    if "ocd" in cfg.methods:
        rows = [r["removal"]["ocd"] for r in runs]
        n_keep = min((row["kept"] for row in rows[0]), key=lambda k: abs(k - 16))
        kept = np.zeros(64)
        for seed_rows in rows:
            (row,) = [row for row in seed_rows if row["kept"] == n_keep]
            kept[row["alive"]] += 1.0 / len(rows)
        panels.append((f"kept at {n_keep} by iterative OCD\n(share of seeds)", kept, "Blues"))
    fig = new_figure(3.0 * len(panels), 3.3)
    axes = fig.subplots(1, len(panels))
    for ax, (title, img, cmap) in zip(axes, panels):
        im = ax.imshow(np.asarray(img).reshape(8, 8), cmap=cmap)
        ax.set_title(title, fontsize=8)
        ax.set_xticks(range(8))
        ax.set_yticks(range(8))
        ax.set_xlabel("column", fontsize=7)
        ax.set_ylabel("row", fontsize=7)
        ax.tick_params(labelsize=6)
        fig.colorbar(im, ax=ax, shrink=0.8)
    figs.save(fig, "saliency_image.png")

    fig = new_figure(5.6, 3.8)
    ax = fig.subplots()
    for method in cfg.methods:
        rows = [r["removal"][method] for r in runs]
        kx, test = removal_curve(rows, "test_accuracy", 100)
        band(ax, kx, test, color=_COLORS[method], marker="o", ms=3, label=_LABELS[method])
    a0 = mean_sd([r["test_accuracy"] for r in runs])[0]
    ax.axhline(
        100 * (a0 - cfg.accuracy_drop),
        color="grey",
        lw=0.8,
        ls=":",
        label=f"full net − {100 * cfg.accuracy_drop:g} point",
    )
    ax.invert_xaxis()
    ax.set_xlabel("pixels kept")
    ax.set_ylabel("test accuracy [%] (retrained)")
    ax.set_title("Digits: removing pixels with retraining")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    figs.save(fig, "accuracy_vs_pixels.png")
    return figs.paths
