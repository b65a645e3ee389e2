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

from ..elimination import eliminate as shared_eliminate
from ..generalization import fpe_fields
from ..history import History, RoundRecord
from ..masking import Mask, current_mask, restore_pruned
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


def _smallest_kept(scores: Mapping[str, Tensor], mask: Mask) -> float:
    vals = [
        scores[k].detach()[mask[k].to(scores[k].device)].reshape(-1)
        for k in mask.names
        if mask[k].any()
    ]
    return float(torch.cat(vals).min()) if vals else math.nan


class _Rounds:
    """The callbacks of :func:`eliminate` on :func:`optbrain.elimination.eliminate`: the target
    of each step, the tracked saliencies, the measurements and one record a step."""

    def __init__(self, model, out: Elimination, make_problem, evaluate, settings: dict):
        self.model, self.out, self.make_problem, self.evaluate = model, out, make_problem, evaluate
        self.s = settings
        self.n_all = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.t0, self.before_e, self.after_e = 0.0, math.nan, math.nan
        self.pruned_metrics: dict[str, float] = {}

    def record(self, i: int, **fields) -> RoundRecord:
        m = current_mask(self.model)
        return RoundRecord(
            round=i,
            target=m.sparsity(),
            sparsity=m.sparsity(),
            remaining=m.kept(),
            total=m.total(),
            remaining_params=self.n_all - m.pruned(),
            generalization=fpe_fields(
                self.make_problem(self.model),
                weight_decay=self.s["weight_decay"],
                form=self.s["fpe_form"],
            ),
            **fields,
        )

    def target(self, r: int, mask: Mask) -> int | None:
        if mask.kept() <= self.s["min_kept"]:
            return None
        self.t0 = time.perf_counter()
        return min(mask.pruned() + self.s["per_step"], mask.total() - self.s["min_kept"])

    def scores(self, step):
        """Saliencies for γOBD's stopping rule (handed on to pruners that take them)."""
        if not self.s["track_saliency"]:
            self.out.min_saliency.append(math.nan)
            return None
        scores = self.s["pruner"].scores(step.problem, step.mask)
        self.out.min_saliency.append(_smallest_kept(scores, step.mask))
        return scores if getattr(self.s["pruner"], "accepts_scores", False) else None

    def before(self, step) -> None:
        self.before_e = step.problem.objective()

    def deleted(self, step) -> None:
        self.after_e = step.problem.objective()
        self.pruned_metrics = self.evaluate(self.model)

    def after(self, step) -> None:
        retrained = self.s["retrain"] is not None
        metrics = self.evaluate(self.model) if retrained else self.pruned_metrics
        self.out.history.append(
            self.record(
                step.round,
                predicted_increase=step.info.predicted_increase,
                actual_increase=self.after_e - self.before_e,
                objective_before=self.before_e,
                objective_pruned=self.after_e,
                metrics_pruned=self.pruned_metrics,
                metrics=metrics,
                seconds=time.perf_counter() - self.t0,
            )
        )
        self.out.states.append(_snapshot(self.model))
        total = self.s["total_steps"]
        if self.s["progress"] is not None:
            self.s["progress"](min(step.round, total), total)


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
    out = Elimination(History(), [_snapshot(model)])
    settings = {
        "pruner": pruner, "min_kept": min_kept, "per_step": per_step, "retrain": retrain,
        "weight_decay": weight_decay, "fpe_form": fpe_form, "track_saliency": track_saliency,
        "progress": progress, "total_steps": math.ceil((mask.kept() - min_kept) / per_step),
    }  # fmt: skip
    rounds = _Rounds(model, out, make_problem, evaluate, settings)
    start = evaluate(model)
    out.history.append(rounds.record(0, metrics_pruned=start, metrics=start))
    shared_eliminate(
        model,
        pruner,
        rounds.target,
        make_problem=make_problem,
        mask=mask,
        scores=rounds.scores,
        before=rounds.before,
        deleted=rounds.deleted,
        retrain=retrain,
        after=rounds.after,
    )
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
