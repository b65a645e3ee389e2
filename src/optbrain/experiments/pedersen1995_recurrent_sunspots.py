"""Pedersen & Hansen (NIPS 7, 1995), *Recurrent networks: second order properties and pruning*:
the pruned (4-4-1) recurrent sunspot predictor (PAPERS.md §6, "Recurrent networks").

The paper trains a layered, fully recurrent network — 4 lag inputs, 4 tanh hidden units
connected to each other, one linear output — on the yearly sunspots by a damped Gauss–Newton
method with weight decay, prunes it by OBS with weight decay (its full recursive Hessian; the
second-derivative term is often negligible, so Gauss–Newton is used) and selects the network by
FPE, Ê_test = ((T + N)/(T − N))·(2E/T). Qualitative claims (no table): test error and FPE pass
through shallow minima; the FPE-optimal net has discarded 3 of its 4 lag inputs and predicts from
internal memory, with an impulse response of about 12 steps (≈ the sunspot period).

Here:

* **Model** (:class:`RecurrentSunspotNet`): h(t) = tanh(W x(t) + U h(t−1) + b), ŷ(t) = vᵀh(t) + c,
  x(t) = [y(t−1), y(t−2), y(t−3), y(t−4)]: 16 + 16 + 4 + 4 + 1 = 41 parameters. Its forward runs
  the recursion over a fixed window of ``window`` years (a loop over a number stored on the
  module) from h = 0 and returns the last output, so one training *sample* is one target year
  with the ``window`` lag vectors before it; with the window much longer than the net's memory
  this is the recurrent net run along the series. optbrain's estimators then see an ordinary
  per-sample objective: the OBS inverse and FPE take the exact ``torch.func`` path
  (per-sample Jacobians through the whole window; :func:`optbrain.curvature.explain` is recorded
  in the notes).
* **Data** scaled as NNSYSID's ``solplet.asc`` (activity / 191.2); training targets 1700 +
  4 + ``window`` − 1 … 1920 (full windows only), tests 1921–1955 and 1956–1979 (their windows reach
  back into earlier years); NMSE over the population variance of 1700–1979.
* **Training**: full-batch L-BFGS on E + ½λ‖θ‖² (the paper: damped Gauss–Newton with R = αI;
  α is not given — ours is λ = 2D/N with NNSYSID's D = ``decay``); after each deletion
  ``retrain_iter`` iterations.
* **Pruning**: OBS with weight decay (:func:`optbrain.pruners.obs`), one parameter at a time,
  every weight and bias a candidate; FPE with decay (NNSYSID's full form, which reduces to the
  paper's (T + N)/(T − N) without decay); selection by least FPE.
* **Measured**: the lag inputs the selected net still uses (a lag is used when one of its input
  weights into a live hidden unit survives), and its impulse response: the mean over the
  training windows of |∂ŷ(t)/∂y(t − k)| for k = 1 … window + 3, whose *length* is the largest k
  at which it is at least ``impulse_threshold`` of its peak. A tapped-delay net on 4 lags has
  length ≤ 4 by construction; longer responses come from the recurrent memory.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import base
from .base import Claim, Progress, Result, Session
from .dtu_common import Elimination, eliminate, on_grid, restore
from .figures import FigureFiles, band, new_figure
from .stats import fmt, mean_sd, mean_sd_curve, seeds_tag

log = logging.getLogger(__name__)

NAME = "pedersen1995-recurrent-sunspots"
SUMMARY = (
    "The pruned 4-4-1 recurrent sunspot net (Pedersen & Hansen 1995): OBS with weight decay, FPE "
    "selection; lag inputs kept and the impulse response of the selected net"
)
TITLE = "Pruning a 4-4-1 recurrent network on the sunspots (Pedersen & Hansen 1995)"

LAGS = 4
_PAPER = {
    "lags": "the FPE-optimal net has discarded 3 of its 4 lag inputs",
    "memory": "it predicts from internal memory with an impulse response of about 12 steps "
    "(≈ the sunspot period)",
}


class RecurrentSunspotNet(nn.Module):
    """The layered fully recurrent net over a fixed window (module doc).

    Input: ``B × window × lags`` lag vectors (newest lag first in each); output: ``B × 1``, the
    prediction at the window's last step. Parameters drawn from U(−``init``, ``init``) with a
    generator of its own."""

    def __init__(self, window: int, hidden: int = 4, lags: int = LAGS, *, seed: int = 0,
                 init: float = 0.5, dtype: torch.dtype = torch.float64):  # fmt: skip
        super().__init__()
        if window < 1 or hidden < 1 or lags < 1:
            raise ValueError(
                f"window, hidden and lags must be >= 1, got {window}, {hidden}, {lags}"
            )
        self.window = int(window)
        with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global RNG
            self.inp = nn.Linear(lags, hidden).to(dtype)
            self.rec = nn.Linear(hidden, hidden, bias=False).to(dtype)
            self.out = nn.Linear(hidden, 1).to(dtype)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_((torch.rand(p.shape, generator=gen, dtype=dtype) * 2 - 1) * init)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x[:, 0]))  # h(−1) = 0: no recurrent term at the first step
        for t in range(1, self.window):
            h = torch.tanh(self.inp(x[:, t]) + self.rec(h))
        return self.out(h)


@dataclass
class Config(base.Config):
    """Setting; defaults = the full run. ``decay``: NNSYSID's D (λ = 2D/N on our scale). The
    claims: "most lag inputs discarded" = at most one of four kept, in a majority of seeds; the
    impulse response is "about 12 steps" when its length is within ``memory_range``."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    hidden: int = 4
    window: int = 30
    decay: float = 0.01
    max_iter: int = 1000
    retrain_iter: int = 50
    min_kept: int = 4
    per_step: int = 1
    impulse_threshold: float = 0.1
    memory_range: tuple[int, int] = (8, 16)
    figure_dpi: int = 90

    @classmethod
    def quick(cls) -> Config:
        """One seed, a shorter window, three parameters per step, shorter training."""
        return cls(seeds=(0,), window=20, max_iter=300, retrain_iter=20, per_step=3)

    def validate(self) -> None:
        need = self.need
        self.need_seeds()
        need(self.hidden >= 1, "hidden", "must be >= 1")
        need(5 <= self.window <= 100, "window", "must be in 5..100")
        need(self.decay > 0, "decay", "must be > 0")
        need(self.max_iter >= 1, "max_iter", "must be >= 1")
        need(self.retrain_iter >= 0, "retrain_iter", "must be >= 0")
        n = self.n_params
        need(1 <= self.min_kept < n, "min_kept", f"must be in 1..{n - 1}")
        need(self.per_step >= 1, "per_step", "must be >= 1")
        need(0 < self.impulse_threshold < 1, "impulse_threshold", "must be in (0, 1)")
        lo, hi = self.memory_range
        need(1 <= lo <= hi, "memory_range", "must be two increasing lengths >= 1")
        need(20 <= self.figure_dpi <= 300, "figure_dpi", "must be in [20, 300]")

    @property
    def n_params(self) -> int:
        return LAGS * self.hidden + self.hidden + self.hidden**2 + self.hidden + 1


# --------------------------------------------------------------------------- data
@dataclass
class _Data:
    seg: dict[str, Tensor]  # per split: B × (window + lags) series values before each target
    y: dict[str, Tensor]
    index: Tensor  # window × lags positions into a segment
    nmse_of: Any

    def x(self, split: str, seg: Tensor | None = None) -> Tensor:
        s = self.seg[split] if seg is None else seg
        return s[:, self.index]


def load(window: int, dtype: torch.dtype = torch.float64) -> _Data:
    """Windows of lag vectors for every target year with a full window (module doc)."""
    import numpy as np

    from ..data.sunspots import NMSE_VARIANCE, NNSYSID_SCALE, SPLITS, sunspot_series

    years, act = sunspot_series()
    series = torch.tensor(act / NNSYSID_SCALE, dtype=dtype)
    span = window + LAGS - 1  # segment: the span values before the target year T
    # segment position i holds y(T − span + i); the lag vector at window step t (0 … window−1)
    # is x(τ) = [y(τ − 1) … y(τ − LAGS)] with τ = T − window + 1 + t: positions LAGS + t − j
    t = torch.arange(window)[:, None]
    j = torch.arange(1, LAGS + 1)[None, :]
    index = LAGS + t - j
    segs, ys = {}, {}
    for name, (lo, hi) in SPLITS.items():
        first = max(lo, int(years[0]) + span) if name == "train" else lo
        pos = np.nonzero((years >= first) & (years <= hi))[0]
        segs[name] = torch.stack([series[p - span : p] for p in pos])
        ys[name] = series[pos][:, None]
    segs["test"] = torch.cat([segs["test1"], segs["test2"]])
    ys["test"] = torch.cat([ys["test1"], ys["test2"]])
    scale2 = NNSYSID_SCALE**2

    def nmse_of(mse: float) -> float:
        return mse * scale2 / NMSE_VARIANCE

    return _Data(segs, ys, index, nmse_of)


def _problem(model: nn.Module, data: _Data):
    from ..problem import Problem

    return Problem(model, nn.MSELoss(), (data.x("train"), data.y["train"]))


@torch.no_grad()
def _metrics(model: nn.Module, data: _Data) -> dict[str, float]:
    from ..problem import eval_mode

    with eval_mode(model):
        return {
            f"{k}_nmse": data.nmse_of(float(nn.functional.mse_loss(model(data.x(k)), data.y[k])))
            for k in ("train", "test1", "test2", "test")
        }


def impulse_response(model: nn.Module, data: _Data, split: str = "train") -> list[float]:
    """Mean over the windows of |∂ŷ/∂y(T − k)|, k = 1 … window + lags − 1 (k = 1: last year)."""
    seg = data.seg[split].clone().requires_grad_(True)
    out = model(data.x(split, seg))
    (grad,) = torch.autograd.grad(out.sum(), seg)
    sens = grad.abs().mean(0).flip(0)  # position span − k → index k − 1
    return [float(v) for v in sens]


def memory_length(response: list[float], threshold: float) -> int:
    """The largest lag k whose response is at least ``threshold`` × the peak (0 if none)."""
    peak = max(response) if response else 0.0
    if peak <= 0:
        return 0
    return max(k + 1 for k, v in enumerate(response) if v >= threshold * peak)


def lags_used(model: nn.Module) -> list[int]:
    """Lag inputs (1 = y(t−1)) with a nonzero input weight into a hidden unit that reaches the
    output (directly or through the recurrent weights)."""
    w = model.inp.weight.detach()
    u = model.rec.weight.detach()
    v = model.out.weight.detach()[0]
    live = v != 0
    for _ in range(u.shape[0]):  # units feeding a live unit through U are live too
        live = live | ((u != 0) & live[:, None]).any(0)
    used = ((w != 0) & live[:, None]).any(0)
    return [j + 1 for j in range(w.shape[1]) if bool(used[j])]


# --------------------------------------------------------------------------- the experiment
def weight_decay(cfg: Config, n_train: int) -> float:
    """λ = 2D/N (NNSYSID's D on our scale; see :mod:`optbrain.experiments.nnsysid_sunspots`)."""
    return 2.0 * cfg.decay / n_train


def _eliminate(cfg: Config, net: nn.Module, data: _Data, lam: float, seed: int) -> Elimination:
    from ..masking import attach
    from ..pruners import obs
    from .hassibi_common import all_parameters_mask, fit

    work = RecurrentSunspotNet(cfg.window, cfg.hidden, seed=seed)
    work.load_state_dict(net.state_dict())
    attach(work, all_parameters_mask(work))
    x, y = data.x("train"), data.y["train"]

    def retrain(m: nn.Module, step: int) -> None:
        if cfg.retrain_iter:
            fit(m, x, y, weight_decay=lam, max_iter=cfg.retrain_iter)

    return eliminate(
        work,
        obs(weight_decay=lam, steps=None, safeguard=False, min_kept=0),
        lambda m: _problem(m, data),
        retrain=retrain,
        evaluate=lambda m: _metrics(m, data),
        min_kept=cfg.min_kept,
        weight_decay=lam,
        per_step=cfg.per_step,
    )


def run(config: Config, out_dir: str | Path, progress: Progress | None = None) -> Result:
    """Run the reproduction into ``out_dir`` (see the module docstring) and return the result."""
    from ..curvature import explain
    from .hassibi_common import fit

    cfg = config
    session = Session(cfg, out_dir, 2 * len(cfg.seeds) + 1, progress, log)
    data = load(cfg.window)
    n_train = int(data.y["train"].shape[0])
    lam = weight_decay(cfg, n_train)
    runs: dict[int, dict[str, Any]] = {}
    engines: dict[str, str] = {}
    for seed in cfg.seeds:
        net = RecurrentSunspotNet(cfg.window, cfg.hidden, seed=seed)
        fit(net, data.x("train"), data.y["train"], weight_decay=lam, max_iter=cfg.max_iter)
        if not engines:
            engines = {k: str(v) for k, v in explain(_problem(net, data)).items()}
        session.tick(f"seed {seed}: full net trained")
        el = _eliminate(cfg, net, data, lam, seed)
        el.history.save(session.path(f"histories/obs_seed{seed}.json"))
        i = el.select("fpe")
        chosen = restore(net, el.states[i])
        full_resp = impulse_response(net, data)
        resp = impulse_response(chosen, data)
        runs[seed] = {
            "elimination": el,
            "selected": i,
            "lags": lags_used(chosen),
            "response": resp,
            "length": memory_length(resp, cfg.impulse_threshold),
            "full_response": full_resp,
            "full_length": memory_length(full_resp, cfg.impulse_threshold),
            "full": el.history.records[0].metrics,
        }
        session.tick(f"seed {seed}: OBS elimination")
    session.write_json(
        "selected.json",
        {str(s): {k: v for k, v in r.items() if k != "elimination"} for s, r in runs.items()},
    )
    result = session.result(NAME, TITLE)
    result.notes = _notes(cfg, n_train, lam, engines)
    _analyse(cfg, runs, result)
    return session.finish(result, _figures(cfg, runs, session.out))


# --------------------------------------------------------------------------- analysis
def _analyse(cfg: Config, runs: dict[int, dict[str, Any]], result: Result) -> None:
    seeds = list(runs)
    tag = seeds_tag(len(seeds), "FPE-selected net")
    for s in seeds:
        r = runs[s]
        rec = r["elimination"].history.records[r["selected"]]
        result.tables.setdefault("selected_by_fpe", []).append(
            {
                "seed": s,
                "parameters": rec.remaining,
                "lags_used": " ".join(map(str, r["lags"])) or "-",
                "impulse_length": r["length"],
                "full_net_impulse_length": r["full_length"],
                "N_eff": round(rec.generalization.get("n_eff", math.nan), 1),
                "train": round(rec.metrics["train_nmse"], 4),
                "test_1921_55": round(rec.metrics["test1_nmse"], 4),
                "test_1956_79": round(rec.metrics["test2_nmse"], 4),
                "full_test_1921_55": round(r["full"]["test1_nmse"], 4),
                "full_test_1956_79": round(r["full"]["test2_nmse"], 4),
            }
        )
    kept = [len(runs[s]["lags"]) for s in seeds]
    few = sum(k <= 1 for k in kept)
    result.claims.append(
        Claim(
            name=f"the FPE-selected net discards most lag inputs {tag}",
            held=few > len(seeds) / 2,
            detail=f"lag inputs kept (of {LAGS}) per seed {kept} ({fmt(mean_sd(kept), 1)}); at "
            f"most one kept in {few}/{len(seeds)} seeds (held if in a majority)",
            paper=_PAPER["lags"],
        )
    )
    lengths = [runs[s]["length"] for s in seeds]
    lo, hi = cfg.memory_range
    inside = sum(lo <= v <= hi for v in lengths)
    m = mean_sd(lengths)
    result.claims.append(
        Claim(
            name=f"it predicts from internal memory with an impulse response of about 12 steps "
            f"{tag}",
            held=lo <= m[0] <= hi,
            detail=f"impulse-response length (last lag at ≥ {cfg.impulse_threshold:.0%} of the "
            f"peak) per seed {lengths} ({fmt(m, 1)}); within {lo}–{hi} in {inside}/{len(seeds)} "
            f"seeds; held if the mean is within {lo}–{hi} (a 4-lag tapped-delay net: ≤ 4)",
            paper=_PAPER["memory"],
        )
    )
    sizes = mean_sd([runs[s]["elimination"].history.records[runs[s]["selected"]].remaining
                     for s in seeds])  # fmt: skip
    stats = {
        k: mean_sd(
            [runs[s]["elimination"].history.records[runs[s]["selected"]].metrics[k] for s in seeds]
        )  # fmt: skip
        for k in ("train_nmse", "test1_nmse", "test2_nmse")
    }
    full = {k: mean_sd([runs[s]["full"][k] for s in seeds]) for k in stats}
    result.tables["summary"] = [
        {"net": f"full 4-{cfg.hidden}-1 recurrent ({cfg.n_params} parameters)",
         "parameters": str(cfg.n_params),
         **{k: fmt(v, 3) for k, v in full.items()}},
        {"net": "OBS + FPE selection", "parameters": fmt(sizes, 1),
         **{k: fmt(v, 3) for k, v in stats.items()}},
    ]  # fmt: skip


def _notes(cfg: Config, n_train: int, lam: float, engines: dict[str, str]) -> list[str]:
    return [
        f"Data: statsmodels' sunspots / 191.2; windows of {cfg.window} years of {LAGS}-lag "
        f"vectors; {n_train} training targets (full windows within 1700–1920), 35 + 24 test "
        "targets; NMSE over the population variance of 1700–1979.",
        f"Net: 4-{cfg.hidden}-1 fully recurrent (tanh hidden, linear output), {cfg.n_params} "
        f"parameters, all prunable; initial weights U(−0.5, 0.5); weight decay λ = 2D/N = "
        f"{lam:.3g} (D = {cfg.decay:g}).",
        f"Training: full-batch L-BFGS, {cfg.max_iter} iterations; OBS with weight decay, "
        f"{cfg.per_step} parameter(s) per step and {cfg.retrain_iter} iterations of retraining, "
        f"down to {cfg.min_kept}; FPE (full form with decay) selects.",
        "Curvature engines on this model (optbrain.curvature.explain): "
        + "; ".join(f"{k}: {v}" for k, v in engines.items())
        + ". The OBS inverse and FPE use the exact torch.func per-sample Jacobians.",
    ]


def _figures(cfg: Config, runs, out: Path) -> list[str]:
    figs = FigureFiles(out, cfg.figure_dpi)
    fig = new_figure(9.0, 3.5)
    ax1, ax2 = fig.subplots(1, 2)
    sizes = list(range(cfg.n_params, cfg.min_kept - 1, -1))
    els = [r["elimination"] for r in runs.values()]
    nm = load_nmse_scale()
    curves = {
        "training": lambda r: r.metrics["train_nmse"],
        "FPE": lambda r: r.generalization["fpe"] * nm,
        "test 1921–55": lambda r: r.metrics["test1_nmse"],
        "test 1956–79": lambda r: r.metrics["test2_nmse"],
    }
    for j, (label, fn) in enumerate(curves.items()):
        band(ax1, sizes, mean_sd_curve([on_grid(el, fn, sizes) for el in els]), color=f"C{j}",
             label=label)  # fmt: skip
    ax1.set_yscale("log")
    ax1.set_xlabel("parameters")
    ax1.set_ylabel("NMSE")
    ax1.set_title("OBS with retraining (mean ± sd over seeds)", fontsize=9)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    for j, (s, r) in enumerate(runs.items()):
        ks = list(range(1, len(r["response"]) + 1))
        peak = max(r["response"]) or 1.0
        ax2.plot(ks, [v / peak for v in r["response"]], color=f"C{j}", lw=1,
                 label=f"seed {s}: lags {r['lags']}")  # fmt: skip
    ax2.axhline(cfg.impulse_threshold, color="grey", ls=":", lw=0.8)
    ax2.axvline(12, color="k", ls="--", lw=0.8, label="12 (paper)")
    ax2.set_xlabel("k (years back)")
    ax2.set_ylabel("mean |∂ŷ(t)/∂y(t − k)| / peak")
    ax2.set_title("impulse response of the FPE-selected nets", fontsize=9)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=6)
    figs.save(fig, "pruning_and_impulse_response.png")
    return figs.paths


def load_nmse_scale() -> float:
    """NMSE per unit of MSE on the scaled series."""
    from ..data.sunspots import NMSE_VARIANCE, NNSYSID_SCALE

    return NNSYSID_SCALE**2 / NMSE_VARIANCE
