"""Pedersen, Hansen & Larsen (NIPS 8, 1996), *Pruning with generalization based weight
saliencies: γOBD, γOBS*: the Mackey–Glass experiment (PAPERS.md §5).

The paper predicts the Mackey–Glass series (τ = 17) six steps ahead from x(k) = [z(k−6), z(k−12),
…, z(k−36)] with a 6-10-1 tanh net (81 parameters with the biases), trained on 250 examples with
weight decay and tested on 8500; it prunes by γOBD (the estimated change of the *test* error,
δE_test = δE_train − (2/p)(N_eff − N_eff,−l)E_train) and by γOBS, and plots training error, test
error and the FPE estimate against the number of parameters (Fig. 1). Its claims: the γOBD
estimates of the test error rank the weights consistently with the actual test errors (offset by
a constant), and γOBS brings no significant gain over γOBD. No numbers are given.

Here: the series from :func:`optbrain.data.load_mackey_glass` (jitcdde; each seed starts from
its own constant past, i.e. its own stretch of the attractor), inputs and targets standardised
with the training mean and standard deviation, no added noise (the paper's noise level is not
known). Weight decay λ (our scale, E the per-sample MSE) is ours: ``weight_decay`` = 10⁻⁴ gives
N_eff ≈ 38 of 81, a regime where decay matters. Training by full-batch L-BFGS to the regularised
minimum, then one weight at a time deleted by γOBD (:func:`optbrain.pruners.gamma_obd`) or γOBS
(:class:`GammaOBSSurgeon`: NNSYSID's OBS saliency with decay corrected for generalisation, the
weight deleted *with* the OBS update, as the paper's γOBS does), with ``retrain_iter`` L-BFGS
iterations after each deletion; every weight and bias is a candidate. The network of least FPE
is selected; γOBD's stopping rule (stop once every saliency is positive) is recorded too.

Rank consistency: at the full net and at the FPE-selected net, for every remaining weight, the
estimated change of the test error (the γ saliency) against the measured change of the test
error when that weight alone is deleted (γOBD: zeroed; γOBS: with the OBS weight update), as
Spearman's ρ; the offset (measured − estimated) is reported too.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..pruners.base import PruneInfo, PrunerBase
from . import base
from .base import Claim, Progress, Result, Session
from .dtu_common import Elimination, eliminate, on_grid, restore, spearman, tanh_net
from .figures import FigureFiles, band, new_figure
from .stats import fmt, mean_sd, mean_sd_curve, seeds_tag

log = logging.getLogger(__name__)

NAME = "pedersen1996-mackey-glass"
SUMMARY = (
    "γOBD and γOBS (Pedersen, Hansen & Larsen 1996) on Mackey-Glass: 6-10-1 net, 250 training / "
    "8500 test samples; training, test and FPE against parameters, estimated vs actual test "
    "error per weight"
)
TITLE = "γOBD and γOBS on the Mackey–Glass series (Pedersen, Hansen & Larsen 1996)"

LABELS = {"gamma_obd": "γOBD", "gamma_obs": "γOBS"}
_PAPER = {
    "rank": "γOBD's estimated test errors rank the weights consistently with the actual test "
    "errors, offset by a constant (Fig. 1)",
    "gain": "no significant gain from γOBS over γOBD (Fig. 1)",
}


@dataclass
class Config(base.Config):
    """Setting; defaults = the full run. The ranking is "consistent" when the mean Spearman ρ is
    at least ``rank_rho``; γOBS gains "significantly" when its selected nets' test error is lower
    with a paired t-test p < ``alpha`` (one seed: when lower by more than ``gain_margin``,
    relative)."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    n_train: int = 250
    n_test: int = 8500
    hidden: int = 10
    weight_decay: float = 1e-4
    max_iter: int = 2000
    retrain_iter: int = 50
    methods: tuple[Literal["gamma_obd", "gamma_obs"], ...] = ("gamma_obd", "gamma_obs")
    min_kept: int = 8
    rank_rho: float = 0.7
    alpha: float = 0.05
    gain_margin: float = 0.05
    figure_dpi: int = 90

    @classmethod
    def quick(cls) -> Config:
        """One seed, 2000 test samples, the first 20 deletions, shorter training."""
        return cls(seeds=(0,), n_test=2000, max_iter=500, retrain_iter=15, min_kept=61)

    def validate(self) -> None:
        need = self.need
        self.need_seeds()
        need(self.n_train >= 20, "n_train", "must be >= 20")
        need(self.n_test >= 20, "n_test", "must be >= 20")
        need(self.hidden >= 1, "hidden", "must be >= 1")
        need(self.weight_decay > 0, "weight_decay", "must be > 0 (γOBD needs decay)")
        need(self.max_iter >= 1, "max_iter", "must be >= 1")
        need(self.retrain_iter >= 0, "retrain_iter", "must be >= 0")
        need(len(self.methods) > 0, "methods", "give at least one of gamma_obd, gamma_obs")
        need(len(set(self.methods)) == len(self.methods), "methods", "must be distinct")
        n = 8 * self.hidden + 1
        need(1 <= self.min_kept < n, "min_kept", f"must be in 1..{n - 1}")
        need(-1 <= self.rank_rho <= 1, "rank_rho", "must be in [-1, 1]")
        need(0 < self.alpha < 1, "alpha", "must be in (0, 1)")
        need(0 <= self.gain_margin < 1, "gain_margin", "must be in [0, 1)")
        need(20 <= self.figure_dpi <= 300, "figure_dpi", "must be in [20, 300]")

    @property
    def n_params(self) -> int:
        return 6 * self.hidden + self.hidden + self.hidden + 1


@dataclass
class _Data:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    variance: float  # of the standardised test targets: the NMSE divisor


def _load(cfg: Config, seed: int) -> _Data:
    from ..data import load_mackey_glass

    d = load_mackey_glass(cfg.n_train, cfg.n_test, seed=seed)
    mu, sd = float(d.y_train.mean()), float(d.y_train.std())

    def f(t: Tensor) -> Tensor:
        return (t - mu) / sd

    y_test = f(d.y_test)
    return _Data(f(d.x_train), f(d.y_train), f(d.x_test), y_test, float(y_test.var(unbiased=False)))


def _problem(model: nn.Module, data: _Data):
    from ..problem import Problem

    return Problem(model, nn.MSELoss(), (data.x_train, data.y_train))


@torch.no_grad()
def _test_mse(model: nn.Module, data: _Data) -> float:
    from ..problem import eval_mode

    with eval_mode(model):
        return float(nn.functional.mse_loss(model(data.x_test), data.y_test))


def _metrics(model: nn.Module, data: _Data) -> dict[str, float]:
    from ..problem import eval_mode

    with torch.no_grad(), eval_mode(model):
        train = float(nn.functional.mse_loss(model(data.x_train), data.y_train))
    return {
        "train_nmse": train / data.variance,
        "test_nmse": _test_mse(model, data) / data.variance,
    }


def _pruner(method: str, lam: float):
    from ..pruners import gamma_obd

    return gamma_obd(lam, min_kept=0) if method == "gamma_obd" else GammaOBSSurgeon(lam)


# --------------------------------------------------------------------------- γOBS with its update
def _write(params: dict[str, Tensor], inv, vec: Tensor) -> None:
    """Store the alive coordinates of ``vec`` (row order of ``inv``) in ``params`` in place."""
    values = inv.scatter(vec)
    with torch.no_grad():
        for name in inv.names:
            p = params[name]
            pos = inv.coords.positions[name]
            flat = p.detach().reshape(-1).clone()
            flat[pos] = values[name].reshape(-1)[pos].to(p.dtype)
            p.copy_(flat.reshape(p.shape))


def obs_deleted(inv, theta: Tensor, q: int, lam: float) -> Tensor:
    """θ after deleting row q with NNSYSID's OBS update θ ← θ − (θ_q/[H⁻¹]_qq) H⁻¹e_q
    (:func:`optbrain.saliency.obs.group_step`); entry q exactly 0."""
    from ..saliency.obs import group_step

    _, delta = group_step(inv, theta, [q], lam)
    new = theta + delta
    new[q] = 0.0
    return new


class GammaOBSSurgeon(PrunerBase):
    """γOBS as Pedersen et al. apply it: delete the entry of least γOBS saliency
    (:class:`~optbrain.saliency.GammaOBS`) *with* the OBS weight update, one entry per call
    (:func:`optbrain.pruners.gamma_obs` ranks the same way but leaves the update to
    retraining). Candidates: the entries of the mask attached to the model."""

    def __init__(self, weight_decay: float):
        from ..saliency.generalization import GammaOBS

        self.saliency = GammaOBS(weight_decay)
        self.weight_decay = weight_decay

    def scores(self, problem, mask=None):
        return self.saliency(problem)

    def __call__(self, problem, mask=None, sparsity=None, *, scores=None):
        from ..masking import Mask, current_mask
        from ..paramdict import named_parameters
        from ..selection import target_count

        mask = mask if mask is not None else self.default_mask(problem.model)
        if target_count(sparsity, mask.total()) != mask.pruned() + 1:
            raise ValueError("GammaOBSSurgeon deletes one entry per call (per_step = 1)")
        params = named_parameters(problem.model)
        attached = current_mask(problem.model)
        inv = self.saliency.inverse.inverse(
            problem, Mask({n: attached[n] for n in attached.names if n in params})
        )
        s = inv.gather(self.saliency(problem))
        candidates = torch.zeros_like(inv.alive)
        for n in mask.names:
            rows = inv.coords.rows[n][inv.coords.positions[n]].to(s.device)
            keep = mask[n].reshape(-1)[inv.coords.positions[n]].to(s.device)
            candidates[rows[keep]] = True
        s = torch.where(candidates & inv.alive, s, torch.inf)
        q = int(torch.argmin(s))
        theta = inv.gather(params)
        _write(params, inv, obs_deleted(inv, theta, q, self.weight_decay))
        name, flat = _coordinate(inv, q)
        new = mask.with_pruned({name: [flat]})
        return new, PruneInfo.step(problem.model, mask, new, float(s[q]), float(s[q]))


def _coordinate(inv, q: int) -> tuple[str, int]:
    """(parameter name, flat index) of row q of ``inv``."""
    for name in inv.names:
        rows = inv.coords.rows[name]
        hit = torch.nonzero(rows == q).reshape(-1)
        if hit.numel():
            return name, int(hit[0])
    raise IndexError(f"row {q} is not an alive coordinate")


# --------------------------------------------------------------------------- rank consistency
def _alive(mask_of: dict[str, Tensor], name: str, shape) -> Tensor:
    m = mask_of.get(name)
    return m.reshape(-1) if m is not None else torch.ones(math.prod(shape), dtype=torch.bool)


def per_weight_changes(
    model: nn.Module, method: str, lam: float, data: _Data
) -> tuple[list[float], list[float]]:
    """(estimated, measured) change of the test MSE for deleting each remaining weight alone.

    Estimated: the γ saliency (δE_test of the paper). Measured on the test set: γOBD zeroes the
    weight; γOBS applies NNSYSID's OBS update θ ← θ − (θ_q/[H⁻¹]_qq) H⁻¹e_q with H = G + λI.
    ``model`` is left unchanged."""
    from ..masking import current_mask
    from ..paramdict import named_parameters
    from ..saliency.generalization import GammaOBD, GammaOBS

    problem = _problem(model, data)
    params = named_parameters(model)
    masks = {k: v for k, v in current_mask(model).items()}
    base_mse = _test_mse(model, data)
    est: list[float] = []
    act: list[float] = []
    saved = {k: p.detach().clone() for k, p in params.items()}
    try:
        if method == "gamma_obd":
            scores = GammaOBD(lam)(problem)
            for name, p in params.items():
                alive = _alive(masks, name, p.shape)
                for i in torch.nonzero(alive).reshape(-1).tolist():
                    with torch.no_grad():
                        p.view(-1)[i] = 0.0
                    act.append(_test_mse(model, data) - base_mse)
                    est.append(float(scores[name].reshape(-1)[i]))
                    with torch.no_grad():
                        p.copy_(saved[name])
            return est, act
        from ..masking import Mask

        saliency = GammaOBS(lam)
        scores = saliency(problem)
        inv = saliency.inverse.inverse(problem, Mask(masks))
        theta = inv.gather(params)
        flat_scores = inv.gather(scores)
        for q in torch.nonzero(inv.alive).reshape(-1).tolist():
            _write(params, inv, obs_deleted(inv, theta, q, lam))
            act.append(_test_mse(model, data) - base_mse)
            est.append(float(flat_scores[q]))
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(saved[name])
        return est, act
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])


# --------------------------------------------------------------------------- the experiment
def _eliminate(cfg: Config, method: str, net: nn.Module, seed: int, data: _Data) -> Elimination:
    from ..masking import attach
    from .hassibi_common import all_parameters_mask, fit

    work = tanh_net(6, cfg.hidden, seed)
    work.load_state_dict(net.state_dict())
    attach(work, all_parameters_mask(work))
    lam = cfg.weight_decay

    def retrain(m: nn.Module, step: int) -> None:
        if cfg.retrain_iter:
            fit(m, data.x_train, data.y_train, weight_decay=lam, max_iter=cfg.retrain_iter)

    return eliminate(
        work,
        _pruner(method, lam),
        lambda m: _problem(m, data),
        retrain=retrain,
        evaluate=lambda m: _metrics(m, data),
        min_kept=cfg.min_kept,
        weight_decay=lam,
        track_saliency=True,
    )


def _ranks(cfg: Config, method: str, net: nn.Module, el: Elimination, data: _Data) -> dict:
    """Rank consistency at the full net and at the FPE-selected net. The paper's estimate of
    the test error after deleting l is Ê = FPE + δE_test,l and the actual one E_test + measured_l;
    ``offset`` = E_test − FPE is their constant difference, ``scatter`` the median of
    |measured − estimated| over the median |measured|."""
    from ..generalization import fpe

    out = {}
    chosen = restore(net, el.states[el.select("fpe")])
    for stage, model in (("full", net), ("selected", chosen)):
        est, act = per_weight_changes(model, method, cfg.weight_decay, data)
        est_fpe = fpe(_problem(model, data), weight_decay=cfg.weight_decay, form="full").fpe
        out[stage] = {
            "rho": spearman(est, act),
            "offset": (_test_mse(model, data) - est_fpe) / data.variance,
            "scatter": _median([abs(a - e) for a, e in zip(act, est)])
            / max(_median([abs(a) for a in act]), 1e-300),
            "estimated": est,
            "measured": act,
        }
    return out


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return math.nan if not n else (xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2]))


def run(config: Config, out_dir: str | Path, progress: Progress | None = None) -> Result:
    """Run the reproduction into ``out_dir`` (see the module docstring) and return the result."""
    from .hassibi_common import fit

    cfg = config
    total = len(cfg.seeds) * (1 + 2 * len(cfg.methods)) + 1
    session = Session(cfg, out_dir, total, progress, log)
    runs: dict[str, dict[int, Elimination]] = {m: {} for m in cfg.methods}
    ranks: dict[str, dict[int, dict]] = {m: {} for m in cfg.methods}
    for seed in cfg.seeds:
        data = _load(cfg, seed)
        net = tanh_net(6, cfg.hidden, seed)
        fit(net, data.x_train, data.y_train, weight_decay=cfg.weight_decay, max_iter=cfg.max_iter)
        session.tick(f"seed {seed}: full net trained")
        for method in cfg.methods:
            el = _eliminate(cfg, method, net, seed, data)
            runs[method][seed] = el
            el.history.save(session.path(f"histories/{method}_seed{seed}.json"))
            session.tick(f"seed {seed}: {LABELS[method]} elimination")
            ranks[method][seed] = _ranks(cfg, method, net, el, data)
            session.tick(f"seed {seed}: {LABELS[method]} estimated vs measured per weight")
    session.write_json(
        "per_weight.json",
        {m: {str(s): v for s, v in r.items()} for m, r in ranks.items()},
    )
    result = session.result(NAME, TITLE)
    result.notes = _notes(cfg)
    _analyse(cfg, runs, ranks, result)
    return session.finish(result, _figures(cfg, runs, ranks, session.out))


# --------------------------------------------------------------------------- analysis
def _stop_size(el: Elimination) -> int:
    """Weights left when γOBD's stopping rule (every kept saliency > 0) first fires."""
    for i, s in enumerate(el.min_saliency):
        if s > 0:
            return el.history.records[i].remaining
    return el.history.records[-1].remaining


def _analyse(cfg: Config, runs, ranks, result: Result) -> None:
    sel: dict[str, dict[int, Any]] = {}
    for method in cfg.methods:
        sel[method] = {}
        for s, el in runs[method].items():
            rec = el.history.records[el.select("fpe")]
            full = el.history.records[0]
            sel[method][s] = rec
            r = ranks[method][s]
            result.tables.setdefault("per_seed", []).append(
                {
                    "method": LABELS[method],
                    "seed": s,
                    "full_test_nmse": full.metrics["test_nmse"],
                    "full_fpe_nmse": full.generalization["fpe"] / _var(el),
                    "N_eff_full": round(full.generalization["n_eff"], 1),
                    "selected_weights": rec.remaining,
                    "selected_train_nmse": rec.metrics["train_nmse"],
                    "selected_test_nmse": rec.metrics["test_nmse"],
                    "selected_fpe_nmse": rec.generalization["fpe"] / _var(el),
                    "stop_rule_weights": _stop_size(el),
                    "rho_full": round(r["full"]["rho"], 3),
                    "rho_selected": round(r["selected"]["rho"], 3),
                }
            )
    for method in cfg.methods:
        seeds = list(runs[method])
        tag = seeds_tag(len(seeds), LABELS[method])
        rho_full = mean_sd([ranks[method][s]["full"]["rho"] for s in seeds])
        rho_sel = mean_sd([ranks[method][s]["selected"]["rho"] for s in seeds])
        off = mean_sd([ranks[method][s]["full"]["offset"] for s in seeds])
        scatter = mean_sd([ranks[method][s]["full"]["scatter"] for s in seeds])
        result.claims.append(
            Claim(
                name=f"estimated and measured test-error changes rank the weights consistently "
                f"{tag}",
                held=rho_full[0] >= cfg.rank_rho and rho_sel[0] >= cfg.rank_rho,
                detail=f"Spearman ρ(estimated, measured) over the weights: full net "
                f"{fmt(rho_full, 2)}, FPE-selected net {fmt(rho_sel, 2)}; at the full net the "
                f"constant offset E_test − FPE is {off[0]:.2g} ± {off[1]:.1g} (NMSE) and the "
                f"median |measured − estimated| is {fmt(scatter, 2)} × the median |measured|; "
                f"held if both ρ ≥ {cfg.rank_rho}",
                paper=_PAPER["rank"] + ("" if method == "gamma_obd" else " [γOBD in the paper]"),
            )
        )
    if set(cfg.methods) == {"gamma_obd", "gamma_obs"}:
        result.claims.append(_gain_claim(cfg, sel))
    for method in cfg.methods:
        els = list(runs[method].values())
        row = {"method": LABELS[method]}
        for key, fn in (
            ("selected_weights", lambda r: r.remaining),
            ("train_nmse", lambda r: r.metrics["train_nmse"]),
            ("test_nmse", lambda r: r.metrics["test_nmse"]),
        ):
            st = mean_sd([fn(el.history.records[el.select("fpe")]) for el in els])
            row[key] = f"{st[0]:.3g} ± {st[1]:.2g}"
        full = mean_sd([el.history.records[0].metrics["test_nmse"] for el in els])
        row["full_net_test_nmse"] = f"{full[0]:.3g} ± {full[1]:.2g}"
        row["stop_rule_weights"] = fmt(mean_sd([_stop_size(el) for el in els]), 1)
        result.tables.setdefault("summary", []).append(row)


def _var(el: Elimination) -> float:
    """The NMSE divisor of a run: test MSE / test NMSE of its first record."""
    r = el.history.records[0]
    return r.generalization["train_error"] / r.metrics["train_nmse"]


def _gain_claim(cfg: Config, sel) -> Claim:
    seeds = [s for s in sel["gamma_obd"] if s in sel["gamma_obs"]]
    a = [sel["gamma_obd"][s].metrics["test_nmse"] for s in seeds]
    b = [sel["gamma_obs"][s].metrics["test_nmse"] for s in seeds]
    ma, mb = mean_sd(a), mean_sd(b)
    if len(seeds) >= 2:
        from scipy.stats import ttest_rel

        p = float(ttest_rel(b, a, alternative="less").pvalue)
        gain = p < cfg.alpha
        how = f"paired one-sided t-test p = {p:.3g} (significant if < {cfg.alpha})"
    else:
        gain = mb[0] < (1 - cfg.gain_margin) * ma[0]
        how = f"one seed: significant if lower by more than {cfg.gain_margin:.0%}"
    return Claim(
        name=f"γOBS brings no significant gain over γOBD {seeds_tag(len(seeds), 'FPE-selected')}",
        held=not gain,
        detail=f"test NMSE of the FPE-selected nets: γOBD {ma[0]:.3g} ± {ma[1]:.2g}, γOBS "
        f"{mb[0]:.3g} ± {mb[1]:.2g}; {how}",
        paper=_PAPER["gain"],
    )


def _notes(cfg: Config) -> list[str]:
    return [
        f"Data: Mackey–Glass (a = 0.2, b = 0.1, τ = 17) by jitcdde, Δt = 1, 6 lags at spacing 6, "
        f"target 6 steps ahead; {cfg.n_train} training and {cfg.n_test} test samples per seed "
        "(each seed: its own constant past z0); standardised with the training statistics; "
        "NMSE = MSE / variance of the test targets.",
        f"Net: 6-{cfg.hidden}-1 tanh, linear output, {cfg.n_params} parameters (all prunable), "
        f"initial weights U(−0.5, 0.5); weight decay λ = {cfg.weight_decay:g} on E + ½λ‖θ‖² "
        "(E the per-sample MSE).",
        f"Training: full-batch L-BFGS, {cfg.max_iter} iterations; one weight deleted at a time "
        f"(γOBS with its OBS update), then {cfg.retrain_iter} iterations; down to "
        f"{cfg.min_kept} weights. FPE in NNSYSID's full form with decay; selection by least FPE.",
    ]


# --------------------------------------------------------------------------- figures
def _figures(cfg: Config, runs, ranks, out: Path) -> list[str]:
    figs = FigureFiles(out, cfg.figure_dpi)
    sizes = list(range(cfg.n_params, cfg.min_kept - 1, -1))
    fig = new_figure(4.2 * len(cfg.methods), 3.6)
    axes = fig.subplots(1, len(cfg.methods), squeeze=False)[0]
    for ax, method in zip(axes, cfg.methods):
        els = list(runs[method].values())
        curves = {
            "training": lambda r: r.metrics["train_nmse"],
            "FPE": lambda r: (
                r.generalization["fpe"] / r.generalization["train_error"] * r.metrics["train_nmse"]
            ),
            "test": lambda r: r.metrics["test_nmse"],
        }
        for j, (label, fn) in enumerate(curves.items()):
            band(
                ax,
                sizes,
                mean_sd_curve([on_grid(el, fn, sizes) for el in els]),
                color=f"C{j}",
                label=label,
            )
        chosen = mean_sd([el.history.records[el.select("fpe")].remaining for el in els])[0]
        ax.axvline(chosen, color="k", ls="--", lw=0.8, label="FPE minimum (mean)")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("NMSE")
        ax.set_title(f"{LABELS[method]} with retraining", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figs.save(fig, "errors_vs_parameters.png")

    seed = next(iter(runs[cfg.methods[0]]))
    fig = new_figure(4.2 * len(cfg.methods), 3.6)
    axes = fig.subplots(1, len(cfg.methods), squeeze=False)[0]
    for ax, method in zip(axes, cfg.methods):
        r = ranks[method][seed]["full"]
        ax.scatter(r["estimated"], r["measured"], s=8)
        lo = min(min(r["estimated"]), min(r["measured"]))
        hi = max(max(r["estimated"]), max(r["measured"]))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls=":", label="measured = estimated")
        ax.set_xscale("symlog", linthresh=1e-6)
        ax.set_yscale("symlog", linthresh=1e-6)
        ax.set_xlabel("estimated δE_test (γ saliency)")
        ax.set_ylabel("measured δE_test (test set)")
        ax.set_title(f"{LABELS[method]}, full net, seed {seed}: ρ = {r['rho']:.2f}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figs.save(fig, "estimated_vs_measured.png")
    return figs.paths
