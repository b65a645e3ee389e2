"""Chaber & Ławryńczuk (2018), *Pruning of recurrent neural models: an optimal brain damage
approach*: output-error models of the pH neutralisation reactor pruned by OBD through time.

The paper (PAPERS.md §10, §14.1; only the abstract was reachable): recurrent one-hidden-layer
perceptron models of a neutralisation reactor, pruned by OBD adapted to recurrent models, lose
"as many as 60 %" of their parameters and "some 30 %" of their validation error against the full
models. Orders, hidden sizes, data and training are not known to us.

Here, per seed: training, validation and test sequences of the Henson–Seborg reactor
(:mod:`optbrain.data.ph_reactor`; input q3 by random steps, output the measured pH). For each grid
point (n_A = n_B ∈ ``orders``, K ∈ ``hidden``, delay τ) a full output-error model
(:class:`~optbrain.models.sysid.OutputError`) is trained in simulation mode by full-batch L-BFGS
on segments of the training sequence (:mod:`optbrain.models.sequences`), early-stopped on the
validation segments. It is then pruned by OBD — saliency ½ h w² with h the exact Gauss–Newton
diagonal of the simulation error, derivatives through every fed-back output — and, beside it, by
magnitude, under the same schedule (``per_round`` of the parameters per round, biases included)
with L-BFGS retraining after every round (``optbrain.loop.iterative_prune``); a method stops once
its validation error exceeds ``stop_factor`` × the full model's. From each run two pruned models
are selected by validation error: the best, and the smallest within ``tolerance`` of the best.
Errors are mean squared simulation errors over the whole validation / test sequence (k ≥
``eval_start``, against the measured pH; "test clean" against the noise-free pH). Beside them:
NARX models of the same structure trained one step ahead and run in simulation mode, a GRU and an
LSTM sequence model, and a polynomial NARMAX model fitted by sysidentpy (when installed).
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from . import base
from .base import Claim, Progress, Result, Session
from .figures import FigureFiles, new_figure
from .stats import fmt, mean_sd, seeds_tag

log = logging.getLogger(__name__)

NAME = "chaber2018-ph"
SUMMARY = (
    "OBD through time for output-error models of the pH neutralisation reactor (Chaber & "
    "Ławryńczuk 2018): parameters removed and validation error, full vs pruned, against "
    "magnitude pruning, NARX, GRU/LSTM and a sysidentpy NARMAX model"
)
TITLE = "OBD for recurrent models of the pH reactor (Chaber & Ławryńczuk 2018)"
PAPER_REMOVED = "OBD removes as many as 60 % of the model parameters"
PAPER_ERROR = "the validation error falls by some 30 % against the full model"
LABELS = {
    "obd": "OBD (through time)",
    "obd_one_step": "OBD (one-step, no feedback term)",
    "magnitude": "magnitude",
}
METHOD = Literal["obd", "obd_one_step", "magnitude"]


@dataclass
class Config(base.Config):
    """Setting; the defaults are the full run (the paper's settings are unknown: these are ours).

    Data: ``n_train``/``n_val``/``n_test`` samples every ``sample_period`` s, q3 held at levels
    uniform in [``q3_low``, ``q3_high``] ml/s for ``hold_min``..``hold_max`` samples, pH noise
    ``noise_std``. ``full_early_stopping=False`` trains the full OE models to ``max_iter``
    without early stopping (NARX, GRU, LSTM and the retraining always stop early). Claims hold
    when the mean over all grid points and seeds reaches ``removed_claim`` − ``claim_margin``
    (parameters removed, the smallest-within-tolerance model) and ``error_claim`` −
    ``claim_margin`` (relative fall of the validation error, the best model).
    """

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    n_train: int = 2000
    n_val: int = 1000
    n_test: int = 1000
    sample_period: float = 10.0
    q3_low: float = 12.0
    q3_high: float = 19.0
    hold_min: int = 5
    hold_max: int = 30
    noise_std: float = 0.02
    orders: tuple[int, ...] = (2, 3)
    hidden: tuple[int, ...] = (5, 15)
    delay: int = 1
    segment: int = 100
    max_iter: int = 1500
    patience: int = 10
    full_early_stopping: bool = True
    check_every: int = 10
    methods: tuple[METHOD, ...] = ("obd", "magnitude")
    per_round: float = 0.03
    max_sparsity: float = 0.9
    retrain_max_iter: int = 150
    retrain_patience: int = 3
    stop_factor: float = 1.5
    tolerance: float = 0.1
    prune_biases: bool = True
    eval_start: int = 20
    narx: bool = True
    rnn_cells: tuple[Literal["gru", "lstm"], ...] = ("gru", "lstm")
    rnn_hidden: int = 8
    narmax: bool = True
    narmax_degrees: tuple[int, ...] = (2, 3)
    narmax_lags: tuple[int, ...] = (2, 3)
    removed_claim: float = 0.6
    error_claim: float = 0.3
    claim_margin: float = 0.1
    figure_dpi: int = 90

    @classmethod
    def quick(cls) -> Config:
        """One seed, one small model, short sequences, coarse pruning steps (CI)."""
        return cls(
            seeds=(0,),
            n_train=600,
            n_val=300,
            n_test=300,
            orders=(2,),
            hidden=(4,),
            segment=60,
            max_iter=200,
            per_round=0.1,
            retrain_max_iter=30,
            rnn_cells=(),
            narmax_degrees=(2,),
            narmax_lags=(2,),
        )

    def validate(self) -> None:
        need = self.need
        need(len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds), "seeds", "distinct")
        for key in ("n_train", "n_val", "n_test"):
            need(getattr(self, key) > self.segment, key, f"must exceed segment ({self.segment})")
        need(self.sample_period > 0, "sample_period", "must be > 0")
        need(0 <= self.q3_low <= self.q3_high, "q3_high", "need 0 <= q3_low <= q3_high")
        need(1 <= self.hold_min <= self.hold_max, "hold_max", "need 1 <= hold_min <= hold_max")
        need(self.noise_std >= 0, "noise_std", "must be >= 0")
        need(len(self.orders) > 0 and min(self.orders) >= 1, "orders", "give orders >= 1")
        need(len(self.hidden) > 0 and min(self.hidden) >= 1, "hidden", "give sizes >= 1")
        need(0 <= self.delay <= min(self.orders), "delay", "need 0 <= delay <= min(orders)")
        need(self.segment > max(self.orders), "segment", "must exceed the largest order")
        need(self.max_iter >= 1 and self.retrain_max_iter >= 1, "max_iter", "must be >= 1")
        need(self.patience >= 1 and self.retrain_patience >= 1, "patience", "must be >= 1")
        need(self.check_every >= 1, "check_every", "must be >= 1")
        need(len(set(self.methods)) == len(self.methods), "methods", "must be distinct")
        need(0 < self.per_round < 1, "per_round", "must be in (0, 1)")
        need(self.per_round <= self.max_sparsity < 1, "max_sparsity", "in [per_round, 1)")
        need(self.stop_factor > 1, "stop_factor", "must be > 1")
        need(0 <= self.tolerance < 1, "tolerance", "must be in [0, 1)")
        need(self.eval_start >= max(self.orders), "eval_start", "must be >= the largest order")
        need(self.rnn_hidden >= 1, "rnn_hidden", "must be >= 1")
        need(min(self.narmax_degrees, default=1) >= 1, "narmax_degrees", "must be >= 1")
        need(min(self.narmax_lags, default=1) >= 1, "narmax_lags", "must be >= 1")
        need(20 <= self.figure_dpi <= 300, "figure_dpi", "must be in [20, 300]")

    def cells(self) -> list[tuple[int, int]]:
        """The grid: (order n_A = n_B, hidden units K)."""
        return [(o, k) for o in self.orders for k in self.hidden]

    def spec(self):
        from ..data.ph_reactor import SequenceSpec

        return SequenceSpec(
            n_train=self.n_train,
            n_val=self.n_val,
            n_test=self.n_test,
            sample_period=self.sample_period,
            q3_range=(self.q3_low, self.q3_high),
            hold=(self.hold_min, self.hold_max),
            noise_std=self.noise_std,
        )


def cell_name(order: int, hidden: int) -> str:
    return f"nA=nB={order}, K={hidden}"


# --------------------------------------------------------------------------- fitting
def _metrics(cfg: Config, model: nn.Module, data) -> dict[str, float]:
    """Simulation errors over the whole validation and test sequences (k ≥ eval_start)."""
    from ..models.sequences import simulation_error

    s = cfg.eval_start
    return {
        "val_loss": simulation_error(model, data.val.u, data.val.y, start=s),
        "test_loss": simulation_error(model, data.test.u, data.test.y, start=s),
        "test_clean_loss": simulation_error(model, data.test.u, data.test.y_clean, start=s),
    }


def _segments(cfg: Config, model: nn.Module, seq):
    from ..models.sequences import frame

    return frame(seq.u, seq.y, model.start, cfg.segment)


def _fit(cfg: Config, model: nn.Module, data, *, max_iter: int, patience: int | None) -> dict:
    """L-BFGS on the training segments, early-stopped on the validation segments."""
    from ..lbfgs import train_lbfgs

    t0 = time.perf_counter()
    res = train_lbfgs(
        model,
        _segments(cfg, model, data.train),
        nn.MSELoss(),
        max_iter=max_iter,
        val_data=_segments(cfg, model, data.val),
        patience=patience,
        check_every=cfg.check_every,
    )
    return {"chunks": res.epochs_run, "best_chunk": res.best_epoch, "s": time.perf_counter() - t0}


def _new_model(cfg: Config, kind: str, order: int, hidden: int, data, seed: int) -> nn.Module:
    from ..models.rnn_sysid import RecurrentSequenceModel
    from ..models.sysid import NARX, OutputError

    if kind in ("gru", "lstm"):
        delay = max(cfg.delay, 1)
        model = RecurrentSequenceModel(kind, hidden, delay=delay, warmup=cfg.eval_start, seed=seed)
    else:
        cls = {"oe": OutputError, "narx": NARX}[kind]
        model = cls(order, order, hidden, cfg.delay, seed=seed)
    return model.fit_scaling(data.train.u, data.train.y)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- pruning
def select(history, tolerance: float, metric: str = "val_loss") -> dict[str, dict[str, Any]]:
    """The pruned rounds (round ≥ 1) chosen by validation error: ``"best"`` (lowest ``metric``)
    and ``"smallest"`` (fewest parameters left with ``metric`` ≤ (1 + ``tolerance``) × the best);
    each as ``{"round", "remaining_params", **metrics}``. Empty when no round was pruned."""
    recs = [
        r
        for r in history.records
        if r.round >= 1 and math.isfinite(r.metrics.get(metric, math.nan))
    ]
    if not recs:
        return {}
    best = min(recs, key=lambda r: (r.metrics[metric], r.remaining_params))
    ok = [r for r in recs if r.metrics[metric] <= (1 + tolerance) * best.metrics[metric]]
    smallest = min(ok, key=lambda r: (r.remaining_params, r.metrics[metric]))
    as_row = lambda r: {"round": r.round, "remaining_params": r.remaining_params, **r.metrics}  # noqa: E731
    return {"best": as_row(best), "smallest": as_row(smallest)}


def _schedule(cfg: Config):
    from ..schedule import linear

    rounds = int(cfg.max_sparsity / cfg.per_round + 1e-9)
    return linear(cfg.per_round * rounds, rounds), rounds


class _OneStepView(nn.Module):
    """An OE model's parameters run one step ahead (from the measured past outputs): its GGN
    diagonal is OBD's without the dependence through the fed-back outputs (the control for
    "through time"). It shares the model's layers, so the pruner's zeroing reaches the model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.hidden, self.output = model.hidden, model.output
        self.start = model.start
        self._one_step = model.one_step  # a bound method: the model is not a submodule

    def forward(self, x):
        return self._one_step(x)


def _prune(cfg: Config, full: nn.Module, full_val: float, method: str, data, keep: bool) -> dict:
    """Prune a copy of ``full`` by ``method`` with retraining; the history, the selected rounds,
    and (``keep``) a copy of the model after every round."""
    from ..loop import iterative_prune
    from ..masking import Mask, attach
    from ..models.sequences import sequence_problem
    from ..paramdict import named_parameters
    from ..pruners import presets

    model = copy.deepcopy(full)
    names = list(named_parameters(model)) if cfg.prune_biases else None
    attach(model, Mask.ones(model, names=names))
    snapshots = {0: copy.deepcopy(model)} if keep else {}
    schedule, rounds = _schedule(cfg)

    def retrain(m: nn.Module, r: int) -> None:
        _fit(cfg, m, data, max_iter=cfg.retrain_max_iter, patience=cfg.retrain_patience)
        if keep:
            snapshots[r] = copy.deepcopy(m)

    def make_problem(m: nn.Module):
        view = _OneStepView(m) if method == "obd_one_step" else m
        return sequence_problem(view, data.train.u, data.train.y, cfg.segment)

    t0 = time.perf_counter()
    history = iterative_prune(
        model,
        # the paper's rounds: one deletion per round, no guard (min_kept=0)
        presets.magnitude(min_kept=0)
        if method == "magnitude"
        else presets.obd(steps=None, min_kept=0),
        schedule,
        rounds=rounds,
        make_problem=make_problem,
        retrain=retrain,
        evaluate=lambda m: _metrics(cfg, m, data),
        stop_val_loss=cfg.stop_factor * full_val,
    )
    return {
        "history": history,
        "selected": select(history, cfg.tolerance),
        "snapshots": snapshots,
        "seconds": time.perf_counter() - t0,
    }


def _run_cell(cfg: Config, order: int, hidden: int, data, seed: int, tick, keep: bool) -> dict:
    """Full OE model, its pruned versions, and the NARX model of the same structure."""
    name = cell_name(order, hidden)
    full = _new_model(cfg, "oe", order, hidden, data, seed)
    patience = cfg.patience if cfg.full_early_stopping else None
    fit = _fit(cfg, full, data, max_iter=cfg.max_iter, patience=patience)
    metrics = _metrics(cfg, full, data)
    tick(f"seed {seed}, {name}: full OE model trained")
    entry: dict[str, Any] = {"params": _count(full), "full": {**metrics, **fit}, "methods": {}}
    for method in cfg.methods:
        out = _prune(cfg, full, metrics["val_loss"], method, data, keep)
        entry["methods"][method] = out
        tick(f"seed {seed}, {name}: {LABELS[method]} pruning")
    if keep:
        entry["full_model"] = full
    if cfg.narx:
        narx = _new_model(cfg, "narx", order, hidden, data, seed)
        fit = _fit(cfg, narx, data, max_iter=cfg.max_iter, patience=cfg.patience)
        entry["narx"] = {**_metrics(cfg, narx, data), **fit, "params": _count(narx)}
        tick(f"seed {seed}, {name}: NARX model trained")
    return entry


def _run_extras(cfg: Config, data, seed: int, tick) -> dict:
    """GRU / LSTM sequence models and the NARMAX baseline of one seed."""
    out: dict[str, Any] = {}
    for cell in cfg.rnn_cells:
        model = _new_model(cfg, cell, 0, cfg.rnn_hidden, data, seed)
        fit = _fit(cfg, model, data, max_iter=cfg.max_iter, patience=cfg.patience)
        out[cell] = {**_metrics(cfg, model, data), **fit, "params": _count(model)}
        tick(f"seed {seed}: {cell.upper()} model trained")
    if cfg.narmax:
        from .narmax_baseline import available, fit_narmax

        if available():
            out["narmax"] = fit_narmax(
                data, cfg.narmax_degrees, cfg.narmax_lags, start=cfg.eval_start
            )
        tick(f"seed {seed}: NARMAX (sysidentpy) fitted")
    return out


# --------------------------------------------------------------------------- the experiment
def run(config: Config, out_dir: str | Path, progress: Progress | None = None) -> Result:
    """Run the reproduction into ``out_dir`` (see the module docstring) and return the result."""
    from ..data.ph_reactor import make_sequences

    cfg = config
    cells = cfg.cells()
    per_seed = len(cells) * (1 + len(cfg.methods) + int(cfg.narx))
    per_seed += len(cfg.rnn_cells) + int(cfg.narmax)
    session = Session(cfg, out_dir, len(cfg.seeds) * per_seed + 1, progress, log)
    runs: dict[tuple[int, int], dict[int, dict]] = {c: {} for c in cells}
    extras: dict[int, dict] = {}
    shown = None
    for i, seed in enumerate(cfg.seeds):
        data = make_sequences(cfg.spec(), seed)
        for j, (order, hidden) in enumerate(cells):
            keep = i == 0 and j == len(cells) - 1  # the trajectories figure: first seed, last cell
            runs[order, hidden][seed] = _run_cell(
                cfg, order, hidden, data, seed, session.tick, keep
            )
            if keep:
                shown = (data, runs[order, hidden][seed], (order, hidden))
        extras[seed] = _run_extras(cfg, data, seed, session.tick)
    session.write_json("runs.json", _jsonable(runs, extras))
    result = session.result(NAME, TITLE)
    result.notes = _notes(cfg, extras)
    _analyse(cfg, runs, extras, result)
    return session.finish(result, _figures(cfg, runs, extras, shown, session.out))


def _jsonable(runs, extras) -> dict:
    out: dict[str, Any] = {"cells": {}, "extras": {str(s): e for s, e in extras.items()}}
    for (order, hidden), by_seed in runs.items():
        cell = out["cells"][cell_name(order, hidden)] = {}
        for seed, entry in by_seed.items():
            methods = {
                m: {
                    "selected": v["selected"],
                    "seconds": v["seconds"],
                    "history": v["history"].to_dict(),
                }
                for m, v in entry["methods"].items()
            }
            keys = ("params", "full", "narx")
            cell[str(seed)] = {**{k: entry[k] for k in keys if k in entry}, "methods": methods}
    return out


# --------------------------------------------------------------------------- analysis
def _rel_fall(new: float, old: float) -> float:
    return 1.0 - new / old if old > 0 else math.nan


def _selection_stats(cfg: Config, by_seed: dict, method: str, which: str) -> dict[str, list]:
    """Per seed: fraction removed, pruned errors and their relative falls against the full model."""
    out: dict[str, list] = {
        k: [] for k in ("removed", "val", "test", "clean", "dval", "dtest", "dclean")
    }
    for entry in by_seed.values():
        sel = entry["methods"][method]["selected"].get(which)
        if sel is None:
            continue
        full = entry["full"]
        out["removed"].append(1.0 - sel["remaining_params"] / entry["params"])
        for key, metric in (
            ("val", "val_loss"),
            ("test", "test_loss"),
            ("clean", "test_clean_loss"),
        ):
            out[key].append(sel[metric])
            out["d" + key].append(_rel_fall(sel[metric], full[metric]))
    return out


def _pct(xs: list[float]) -> str:
    return fmt(mean_sd([100 * x for x in xs]), 0) + " %"


def _milli(xs: list[float]) -> str:
    return fmt(mean_sd([1e3 * x for x in xs]), 2)


def _analyse(cfg: Config, runs, extras, result: Result) -> None:
    pooled: dict[str, dict[str, list]] = {}
    for (order, hidden), by_seed in runs.items():
        full = {
            k: [e["full"][k] for e in by_seed.values()]
            for k in ("val_loss", "test_loss", "test_clean_loss")
        }
        params = next(iter(by_seed.values()))["params"]
        for method in cfg.methods:
            for which in ("best", "smallest"):
                st = _selection_stats(cfg, by_seed, method, which)
                for k, v in st.items():
                    pooled.setdefault(f"{method}/{which}", {}).setdefault(k, []).extend(v)
                result.tables.setdefault("full_vs_pruned", []).append(
                    {
                        "model": cell_name(order, hidden),
                        "params": params,
                        "method": LABELS[method],
                        "selected": which,
                        "removed": _pct(st["removed"]),
                        "val full (1e-3)": _milli(full["val_loss"]),
                        "val pruned (1e-3)": _milli(st["val"]),
                        "val fall": _pct(st["dval"]),
                        "test full (1e-3)": _milli(full["test_loss"]),
                        "test pruned (1e-3)": _milli(st["test"]),
                        "test fall": _pct(st["dtest"]),
                        "test-clean fall": _pct(st["dclean"]),
                    }
                )
        _baseline_rows(cfg, order, hidden, by_seed, full, result)
    _extra_rows(cfg, extras, result)
    _claims(cfg, pooled, len(cfg.seeds), len(runs), result)


def _model_row(model: str, structure: str, params: Any, rows: list[dict]) -> dict[str, Any]:
    def col(key: str) -> str:
        vals = [r[key] for r in rows]
        bad = sum(not math.isfinite(v) for v in vals)
        return _milli(vals) + (f" ({bad} diverged)" if bad else "")

    return {
        "model": model,
        "structure": structure,
        "params": params,
        "val (1e-3)": col("val_loss"),
        "test (1e-3)": col("test_loss"),
        "test clean (1e-3)": col("test_clean_loss"),
    }


def _baseline_rows(cfg: Config, order: int, hidden: int, by_seed: dict, full, result) -> None:
    name = cell_name(order, hidden)
    params = next(iter(by_seed.values()))["params"]
    table = result.tables.setdefault("models", [])
    table.append(_model_row("OE, full", name, params, [e["full"] for e in by_seed.values()]))
    for method in cfg.methods:
        sel = [
            e["methods"][method]["selected"]["best"]
            for e in by_seed.values()
            if "best" in e["methods"][method]["selected"]
        ]
        left = fmt(mean_sd([s["remaining_params"] for s in sel]), 0)
        table.append(_model_row(f"OE + {LABELS[method]}, best", name, left, sel))
    if cfg.narx:
        narx = [e["narx"] for e in by_seed.values()]
        table.append(_model_row("NARX (one-step trained)", name, narx[0]["params"], narx))


def _extra_rows(cfg: Config, extras: dict, result) -> None:
    table = result.tables.setdefault("models", [])
    for cell in cfg.rnn_cells:
        rows = [e[cell] for e in extras.values()]
        structure = f"{cfg.rnn_hidden} units, warm-up {cfg.eval_start}"
        table.append(_model_row(cell.upper(), structure, rows[0]["params"], rows))
    rows = [e["narmax"] for e in extras.values() if "narmax" in e]
    if rows:
        chosen = ", ".join(f"d{r['degree']}/l{r['lag']}" for r in rows)
        terms = fmt(mean_sd([r["terms"] for r in rows]), 0)
        table.append(_model_row("NARMAX (sysidentpy FROLS)", f"degree/lag {chosen}", terms, rows))


def _claims(cfg: Config, pooled: dict, n_seeds: int, n_cells: int, result: Result) -> None:
    tag = seeds_tag(n_seeds, f"{n_cells} model structure{'s' if n_cells > 1 else ''}")
    obd_s, obd_b = pooled.get("obd/smallest"), pooled.get("obd/best")
    if not obd_s or not obd_b:
        return
    mag_s, mag_b = pooled.get("magnitude/smallest"), pooled.get("magnitude/best")
    removed = mean_sd(obd_s["removed"])
    crit = cfg.removed_claim - cfg.claim_margin
    other = f"; magnitude {_pct(mag_s['removed'])}" if mag_s else ""
    result.claims.append(
        Claim(
            name=f"about {100 * cfg.removed_claim:.0f} % of the parameters removed {tag}",
            held=removed[0] >= crit,
            detail=f"OBD removes {_pct(obd_s['removed'])} (smallest model within "
            f"{100 * cfg.tolerance:g} % of the best validation error; the best model itself "
            f"{_pct(obd_b['removed'])}){other}; max over runs "
            f"{100 * max(obd_s['removed']):.0f} %; criterion: mean ≥ {100 * crit:.0f} %",
            paper=PAPER_REMOVED,
        )
    )
    fall = mean_sd(obd_b["dval"])
    crit = cfg.error_claim - cfg.claim_margin
    other = f"; magnitude {_pct(mag_b['dval'])} (test {_pct(mag_b['dtest'])})" if mag_b else ""
    result.claims.append(
        Claim(
            name=f"about {100 * cfg.error_claim:.0f} % lower validation error than the full "
            f"model {tag}",
            held=fall[0] >= crit,
            detail=f"OBD's best model: validation error {_pct(obd_b['dval'])} lower (median "
            f"{100 * statistics.median(obd_b['dval']):.0f} %; test "
            f"{_pct(obd_b['dtest'])}, test against the noise-free pH {_pct(obd_b['dclean'])})"
            f"{other}; criterion: mean validation fall ≥ {100 * crit:.0f} %",
            paper=PAPER_ERROR,
        )
    )


def _notes(cfg: Config, extras: dict) -> list[str]:
    from .narmax_baseline import available

    rounds = _schedule(cfg)[1]
    narmax = (
        f"NARMAX: sysidentpy FROLS, polynomial degrees {list(cfg.narmax_degrees)} × lags "
        f"{list(cfg.narmax_lags)}, AIC term selection, least squares; the grid point with the "
        "lowest validation simulation error is kept."
        if cfg.narmax and available()
        else "NARMAX baseline skipped (sysidentpy not installed: `pip install 'optbrain[sysid]'`)."
        if cfg.narmax
        else "NARMAX baseline off."
    )
    return [
        f"Data per seed (seeds {list(cfg.seeds)}): Henson–Seborg reactor, q1 = 16.6 and q2 = "
        f"0.55 ml/s constant, q3 random steps in [{cfg.q3_low:g}, {cfg.q3_high:g}] ml/s held "
        f"{cfg.hold_min}–{cfg.hold_max} samples, sampled every {cfg.sample_period:g} s, pH "
        f"noise σ = {cfg.noise_std:g}; {cfg.n_train} training, {cfg.n_val} validation, "
        f"{cfg.n_test} test samples (independent excitations).",
        f"Models: output-error y(k) = f(u(k−{cfg.delay})…u(k−n_B), ŷ(k−1)…ŷ(k−n_A)), tanh "
        f"hidden layer, n_A = n_B ∈ {list(cfg.orders)}, K ∈ {list(cfg.hidden)}; trained in "
        f"simulation mode on segments of {cfg.segment} samples by full-batch L-BFGS (≤ "
        f"{cfg.max_iter} iterations, "
        + (
            f"early stopping on the validation segments, patience {cfg.patience} × "
            f"{cfg.check_every} iterations)."
            if cfg.full_early_stopping
            else "no early stopping: the full models are trained to the iteration limit)."
        ),
        f"Pruning: {rounds} rounds of {100 * cfg.per_round:g} % of the "
        f"{'parameters (biases included)' if cfg.prune_biases else 'weights'} each (to "
        f"{100 * cfg.per_round * rounds:g} %), L-BFGS retraining (≤ {cfg.retrain_max_iter} "
        f"iterations, patience {cfg.retrain_patience}) after each; a run stops once its "
        f"validation error exceeds {cfg.stop_factor:g} × the full model's. OBD: ½ h w² with the "
        "exact Gauss–Newton diagonal of the segment simulation error (derivatives through every "
        "fed-back output); magnitude: |w|.",
        f"Errors: mean squared simulation error in pH² over the whole sequence from k = "
        f"{cfg.eval_start} on (all models on the same samples); 'test clean' against the "
        f"noise-free pH (noise floor of the measured errors: σ² = {cfg.noise_std**2:.1e}). "
        "Falls are relative to the same seed's full model.",
        narmax,
    ]


# --------------------------------------------------------------------------- figures
def _figures(cfg: Config, runs, extras, shown, out: Path) -> list[str]:
    figs = FigureFiles(out, cfg.figure_dpi)
    if shown is not None and "obd" in cfg.methods:
        _trajectory_figure(cfg, shown, figs)
    _error_figure(cfg, runs, extras, figs)
    return figs.paths


@torch.no_grad()
def _simulated(model: nn.Module, seq) -> torch.Tensor:
    from ..problem import eval_mode

    x = torch.cat([seq.u, seq.y], 1)[None]
    with eval_mode(model):
        return model(x)[0, :, 0]


def _trajectory_figure(cfg: Config, shown, figs: FigureFiles, span: int = 400) -> None:
    data, entry, (order, hidden) = shown
    obd = entry["methods"]["obd"]
    sel = obd["selected"].get("best")
    if sel is None:
        return
    full, pruned = entry["full_model"], obd["snapshots"][sel["round"]]
    seq = data.test
    n = min(span, len(seq))
    k = torch.arange(len(seq))
    fig = new_figure(8.0, 4.6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1, 3])
    top.step(k[:n], seq.u[:n, 0], where="post", color="k", lw=0.8)
    top.set_ylabel("q3 (ml/s)")
    bottom.plot(k[:n], seq.y[:n, 0], ".", ms=2, color="0.6", label="process (measured)")
    bottom.plot(k[:n], seq.y_clean[:n, 0], color="k", lw=0.8, label="process (noise-free)")
    for model, label, style in (
        (full, f"full OE model ({entry['params']} parameters)", "-"),
        (pruned, f"OBD-pruned ({sel['remaining_params']} parameters)", "--"),
    ):
        ks = k[model.start : n]
        bottom.plot(ks, _simulated(model, seq)[: n - model.start], style, lw=1.0, label=label)
    bottom.set_xlabel("sample k (test sequence)")
    bottom.set_ylabel("pH")
    bottom.legend(fontsize=7, loc="best")
    fig.suptitle(
        f"Test sequence, simulation mode: {cell_name(order, hidden)}, seed {data.seed}", fontsize=9
    )
    figs.save(fig, "ph_test_trajectories.png")


def _relative_curves(by_seed: dict, method: str) -> list[tuple[list[float], list[float]]]:
    """Per seed: (% of the parameters removed, validation error / the full model's) by round."""
    out = []
    for e in by_seed.values():
        h = e["methods"][method]["history"]
        full = e["full"]["val_loss"]
        removed = [100 * (1 - n / e["params"]) for n in h.column("remaining_params")]
        out.append((removed, [v / full for v in h.column("metrics.val_loss")]))
    return out


def _median_curve(curves: list[tuple[list[float], list[float]]]) -> tuple[list, list]:
    """Median over seeds per round, over the rounds that at least half of the seeds reached."""
    n = sorted(len(c[0]) for c in curves)[(len(curves) - 1) // 2]
    runs = [c for c in curves if len(c[0]) >= n]
    xs = [statistics.median(c[0][i] for c in runs) for i in range(n)]
    ys = [statistics.median(c[1][i] for c in runs) for i in range(n)]
    return xs, ys


def _baseline_ratios(cfg: Config, by_seed: dict, extras: dict) -> dict[str, float]:
    out = {}
    if cfg.narx:
        out["NARX (simulated)"] = [
            e["narx"]["val_loss"] / e["full"]["val_loss"] for e in by_seed.values()
        ]
    narmax = [
        extras[s]["narmax"]["val_loss"] / e["full"]["val_loss"]
        for s, e in by_seed.items()
        if "narmax" in extras.get(s, {})
    ]
    if narmax:
        out["NARMAX"] = narmax
    return {k: statistics.median(v) for k, v in out.items()}


def _error_figure(cfg: Config, runs, extras, figs: FigureFiles) -> None:
    cells = list(runs)
    fig = new_figure(1.0 + 3.6 * len(cells), 3.6)
    axes = fig.subplots(1, len(cells), squeeze=False, sharey=True)[0]
    top = 2 * cfg.stop_factor
    for ax, cell in zip(axes, cells):
        for j, method in enumerate(cfg.methods):
            curves = _relative_curves(runs[cell], method)
            for x, y in curves:
                ax.plot(x, y, color=f"C{j}", lw=0.6, alpha=0.3)
            ax.plot(*_median_curve(curves), color=f"C{j}", marker=".", ms=3, label=LABELS[method])
        for k, (label, ratio) in enumerate(_baseline_ratios(cfg, runs[cell], extras).items()):
            text = f"{label} ×{ratio:.2g}" + (" (above)" if ratio > top else "")
            style = {"color": f"C{4 + k}", "ls": ":" if k == 0 else "--", "lw": 1}
            if ratio > top:
                ax.plot([], [], label=text, **style)  # in the legend only
            else:
                ax.axhline(ratio, label=text, **style)
        ax.axhline(1.0, color="k", lw=0.8, label="full model")
        ax.axhline(1 - cfg.error_claim, color="0.5", ls="-.", lw=0.8, label="paper: −30 %")
        ax.set_yscale("log")
        ax.set_ylim(None, top)
        ax.set_xlabel("parameters removed (%)")
        ax.set_title(cell_name(*cell), fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("validation error / full model's (simulation)")
    axes[0].legend(fontsize=6)
    fig.suptitle("Thin: one seed each; thick: median over seeds", fontsize=8)
    figs.save(fig, "error_vs_parameters.png")
