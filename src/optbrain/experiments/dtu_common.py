"""What the reproductions of the DTU studies share (PAPERS.md §4–§7, §14.3–14.4): small tanh
networks with a linear output in NNSYSID's initialisation, and the elimination loop of NNSYSID's
``obsprune``/``obdprune``: delete one weight (or a few), retrain, record training, validation and
test errors and the FPE estimate for every network size, then select a size by FPE or by the
validation error.

Retraining: NNSYSID retrains with up to 50 Levenberg–Marquardt iterations after each deletion;
we use full-batch L-BFGS with a strong-Wolfe line search
(:func:`~optbrain.experiments.hassibi_common.fit`, ``max_iter`` iterations) on the same
objective, E + ½λ‖θ‖² with E the per-sample mean squared error. Both are second-order-like
full-batch methods that converge to the nearby minimum in a few dozen iterations on nets of
~100 weights.

The loop writes a :class:`~optbrain.history.History` (one :class:`~optbrain.history.RoundRecord`
per network size; round 0 is the unpruned net) so that :meth:`History.select` ("fpe",
"validation", "smallest_within") chooses the size, and keeps every size's weights and mask in
memory (:attr:`Elimination.states`) so that the chosen network can be restored with
:func:`restore`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..generalization import FPEUndefinedError, fpe
from ..history import History, RoundRecord
from ..masking import Mask, attach, current_mask, restore_pruned
from ..problem import Problem

__all__ = ["Elimination", "eliminate", "on_grid", "restore", "spearman", "tanh_net"]


def tanh_net(
    n_in: int,
    hidden: int,
    seed: int,
    *,
    bias: bool = True,
    out_tanh: bool = False,
    init: float = 0.5,
    dtype: torch.dtype = torch.float64,
) -> nn.Sequential:
    """``Linear(n_in, hidden) · Tanh · Linear(hidden, 1)`` (· ``Tanh`` with ``out_tanh``).

    Every weight and bias is drawn uniformly from ±``init`` (NNSYSID: ``rand − 0.5``) with a
    generator of its own (the global RNG is untouched). ``bias=False`` leaves the first layer
    without bias (for nets whose bias is a weight from a constant input, as in NNSYSID)."""
    if n_in < 1 or hidden < 1:
        raise ValueError(f"layer sizes must be >= 1, got n_in={n_in!r}, hidden={hidden!r}")
    if not init > 0:
        raise ValueError(f"init must be > 0, got {init!r}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global RNG
        layers: list[nn.Module] = [nn.Linear(n_in, hidden, bias=bias), nn.Tanh()]
        layers.append(nn.Linear(hidden, 1))
        if out_tanh:
            layers.append(nn.Tanh())
        model = nn.Sequential(*layers).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.rand(p.shape, generator=gen, dtype=dtype) * 2 - 1) * init)
    return model


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two equally long lists (scipy; NaN if undefined)."""
    from scipy.stats import spearmanr

    if len(a) != len(b):
        raise ValueError(f"lists of different lengths: {len(a)} and {len(b)}")
    if len(a) < 3:
        return math.nan
    rho = spearmanr(a, b).statistic
    return float(rho) if rho is not None and math.isfinite(rho) else math.nan


@dataclass
class Elimination:
    """One elimination run: its :class:`History` (record i = the network after step i),
    ``states[i]`` the weights and mask of that network, ``min_saliency[i]`` the smallest saliency
    of a kept entry before step i + 1 (NaN where not computed), and ``predicted``/``actual`` the
    deleted saliency and the measured change of E of each step (before retraining)."""

    history: History
    states: list[dict[str, Any]] = field(default_factory=list)
    min_saliency: list[float] = field(default_factory=list)

    def select(self, criterion: str, **kwargs) -> int:
        """Index of the record :meth:`History.select` chooses."""
        return self.history.records.index(self.history.select(criterion, **kwargs))

    def column(self, name: str) -> list[Any]:
        return self.history.column(name)


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "mask": current_mask(model).state_dict(),
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


def restore(template: nn.Module, state: Mapping[str, Any]) -> nn.Module:
    """A deep copy of ``template`` (the unpruned architecture, no mask attached) holding the
    weights and mask of ``state`` (an entry of :attr:`Elimination.states`)."""
    model = copy.deepcopy(template)
    restore_pruned(model, state)
    return model


def _fpe_fields(problem: Problem, weight_decay: float, form: str) -> dict[str, float]:
    try:
        est = fpe(problem, weight_decay=weight_decay, form=form)
    except FPEUndefinedError:
        return {"fpe": math.nan, "train_error": problem.objective()}
    return {
        "fpe": est.fpe,
        "n_eff": est.n_eff,
        "train_error": est.train_error,
        "gamma2": est.gamma2,
        "n_params": float(est.n_params),
        "damping": est.damping,
    }


def _smallest_kept(scores: Mapping[str, Tensor], mask: Mask) -> float:
    vals = [
        scores[k].detach()[mask[k].to(scores[k].device)].reshape(-1)
        for k in mask.names
        if mask[k].any()
    ]
    return float(torch.cat(vals).min()) if vals else math.nan


def _delete(pruner: Any, problem: Problem, mask: Mask, target: int, track: bool):
    """One pruner call to ``target`` pruned entries: (new mask, info, smallest kept saliency
    before it, NaN unless ``track``); saliencies computed for tracking are handed to pruners that
    take them (those with a selector)."""
    if not track:
        new, info = pruner(problem, mask, target)
        return new, info, math.nan
    scores = pruner.scores(problem, mask)
    smallest = _smallest_kept(scores, mask)
    if hasattr(pruner, "selector"):
        new, info = pruner(problem, mask, target, scores=scores)
    else:
        new, info = pruner(problem, mask, target)
    return new, info, smallest


def eliminate(
    model: nn.Module,
    pruner: Any,
    make_problem: Callable[[nn.Module], Problem],
    *,
    retrain: Callable[[nn.Module, int], Any] | None,
    evaluate: Callable[[nn.Module], dict[str, float]],
    min_kept: int,
    weight_decay: float = 0.0,
    fpe_form: str = "full",
    per_step: int = 1,
    track_saliency: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Elimination:
    """Delete ``per_step`` entries of the attached mask at a time with ``pruner`` until
    ``min_kept`` are left, retraining (``retrain(model, step)``) after each deletion.

    ``model`` must have its prunable set attached as a mask (e.g.
    :func:`~optbrain.experiments.hassibi_common.all_parameters_mask`); it is pruned in place.
    Every record holds ``evaluate(model)`` right after the deletion (``metrics_pruned``) and after
    retraining (``metrics``), the deleted saliencies and the measured change of E on
    ``make_problem(model)`` (the *training* data), and NNSYSID's FPE with ``weight_decay``
    (``fpe_form`` "full" or "diagonal") of the retrained net. A step may delete more than
    ``per_step`` entries when the pruner deletes groups (OBS's ghost rule). ``track_saliency``
    records the smallest kept saliency before each step (γOBD's stopping rule)."""
    mask = current_mask(model)
    if not len(mask):
        raise ValueError("attach the prunable set as a mask before eliminating")
    if not 0 <= min_kept < mask.kept():
        raise ValueError(f"min_kept must be in 0..{mask.kept() - 1}, not {min_kept!r}")
    if per_step < 1:
        raise ValueError(f"per_step must be >= 1, not {per_step!r}")
    n_all = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def record(i: int, **fields) -> RoundRecord:
        m = current_mask(model)
        return RoundRecord(
            round=i,
            target=m.sparsity(),
            sparsity=m.sparsity(),
            remaining=m.kept(),
            total=m.total(),
            remaining_params=n_all - m.pruned(),
            generalization=_fpe_fields(make_problem(model), weight_decay, fpe_form),
            **fields,
        )

    start = evaluate(model)
    out = Elimination(History(), [_snapshot(model)])
    out.history.append(record(0, metrics_pruned=start, metrics=start))
    total_steps = math.ceil((mask.kept() - min_kept) / per_step)
    step = 0
    while mask.kept() > min_kept:
        step += 1
        t0 = time.perf_counter()
        problem = make_problem(model)
        before = problem.objective()
        target = min(mask.pruned() + per_step, mask.total() - min_kept)
        new, info, smallest = _delete(pruner, problem, mask, target, track_saliency)
        out.min_saliency.append(smallest)
        mask = attach(model, new)
        after = problem.objective()
        pruned_metrics = evaluate(model)
        if retrain is not None:
            retrain(model, step)
        metrics = evaluate(model) if retrain is not None else pruned_metrics
        out.history.append(
            record(
                step,
                predicted_increase=info.predicted_increase,
                actual_increase=after - before,
                objective_before=before,
                objective_pruned=after,
                metrics_pruned=pruned_metrics,
                metrics=metrics,
                seconds=time.perf_counter() - t0,
            )
        )
        out.states.append(_snapshot(model))
        if progress is not None:
            progress(min(step, total_steps), total_steps)
    return out


def on_grid(run: Elimination, value: Callable[[RoundRecord], float], sizes: list[int]) -> list:
    """``value(record)`` at every size of ``sizes`` (remaining entries of the mask): the first
    record with at most that many entries left (the network when the elimination reached the
    size; groups deleted together skip sizes). NaN for sizes the run never reached."""
    recs = run.history.records
    out = []
    for k in sizes:
        hit = next((r for r in recs if r.remaining <= k), None)
        out.append(value(hit) if hit is not None else math.nan)
    return out
