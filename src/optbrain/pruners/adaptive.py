"""Measured pruning steps: the objective before and after every deletion, and adaptive sub-steps.

Every pruner can measure what it predicted: E = :meth:`Problem.objective` (one forward pass over
the problem's data) before and after a step gives the measured increase beside the predicted one
(:class:`~optbrain.pruners.base.PruneInfo`). A pruner that re-estimates its curvature (OBD, OCD,
OBS) can also use that measurement to split a large deletion into sub-steps, each with saliencies
re-estimated at the weights the previous sub-step left — the papers' own remedy (OBD §1.3: delete
*some* low-saliency parameters, go back; OBS §2.1: "go back to step 2"; re-estimating the OBS
inverse within one step, SparseML PR #1051, PAPERS.md §14.6), applied where the measurement says
it is needed.

**The rule** (:class:`AdaptiveSteps`). Let n be the entries still to delete, a the entries
alive, b the re-estimates left (``max_re_estimates`` in all, the first estimate included), and
E₀ the measured objective. Each sub-step

1. estimates the saliencies at the current weights (one estimate);
2. tries to delete the k lowest-saliency entries, k = min(n, ⌈``max_fraction``·a⌉, twice the
   last sub-step if it held, the last sub-step's size if it did not), but never fewer than
   k_min = a·(1 − (a_goal/a)^(1/b)) (rounded): the size of an even geometric split of what is
   left into the b estimates left, so the target is always reached within the cap;
3. measures E₁ and accepts the trial when the measured increase is within the tolerance of the
   prediction P (the sum of the deleted saliencies)::

       E₁ − E₀ ≤ P + rtol·|P| + atol + 64·eps·(|E₀| + |E₁|)

   (the last term: the rounding of the forward pass in the model's dtype). Otherwise the weights
   are restored and the trial is retried with half as many entries, from the *same* saliencies
   (a rejected trial costs a forward pass, not an estimate); a trial of k_min entries is accepted
   whatever it measures, and flagged as outside the tolerance — except a failing trial of a
   single entry (k_min = 1): that entry is *vetoed* for this estimate and the next one in the
   ranking tried instead, up to ``max_vetoes`` times; when none holds, the tried entry of least
   measured increase is taken (flagged). A weight whose curvature is exactly zero (a deeply
   saturated unit) is free by every diagonal model and can be a cliff in fact: the veto lets the
   measurement skip it while cheaper deletions remain.

A deletion of at most ``max_fraction`` of the alive entries whose prediction holds is therefore
taken in one step, exactly as the paper's OBD (on a quadratic objective with a diagonal Hessian
the prediction is exact, and sub-steps could not change the result); one whose prediction fails
is split where it fails, and never into more than ``max_re_estimates`` sub-steps.
``AdaptiveSteps.fixed(k)`` instead splits every deletion into k even geometric sub-steps without
testing them (a fixed schedule, for studies).

The measured objective is the training objective on the problem's data — the quantity the
saliencies predict. With fewer than ``min_samples`` samples the rule refuses to steer by it
(:class:`~optbrain.errors.TooFewSamplesError`): pass more data, ``steps=None`` (one step, the
paper's OBD, measured but not steered) or ``AdaptiveSteps(min_samples=...)`` when those samples
are the whole objective.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from ..errors import NonFiniteLossError, TooFewSamplesError
from ..masking import Mask
from ..paramdict import named_parameters, restored_on_error
from ..problem import Problem
from ..selection import TargetExceededError

log = logging.getLogger(__name__)

#: multiples of the dtype's machine epsilon (times |E₀| + |E₁|) below which a difference between
#: measured and predicted increase is rounding, not a failed prediction
ROUNDING = 64.0


@dataclass(frozen=True)
class AdaptiveSteps:
    """The sub-step rule of the module docstring, with its tolerances and its cap.

    ``rtol`` and ``atol``: a sub-step is accepted when its measured increase exceeds the
    predicted one by at most ``rtol·|predicted| + atol`` (plus the rounding of the forward pass);
    ``max_re_estimates``: the most saliency estimates one call may make (>= 1; 1 means a single
    step); ``max_fraction``: the largest fraction of the alive entries one sub-step may delete
    (the curvature describes the weights it was computed at, not a net with most of them gone);
    ``min_samples``: the fewest samples the measured objective may steer by; ``max_vetoes``: the
    single entries that may be skipped per estimate when their measured increase departs from
    the prediction; ``adapt=False``: exactly ``max_re_estimates`` even geometric sub-steps,
    untested (see :meth:`fixed`).
    """

    rtol: float = 0.5
    atol: float = 0.0
    max_re_estimates: int = 32
    max_fraction: float = 0.5
    min_samples: int = 8
    max_vetoes: int = 8
    adapt: bool = True

    def __post_init__(self) -> None:
        for name in ("rtol", "atol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{name} must be a number >= 0, not {v!r}")
        v = self.max_vetoes
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"max_vetoes must be an int >= 0, not {v!r}")
        for name in ("max_re_estimates", "min_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, not {v!r}")
        f = self.max_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ValueError(f"max_fraction must be in (0, 1], not {f!r}")

    @classmethod
    def fixed(cls, steps: int) -> AdaptiveSteps:
        """Exactly ``steps`` sub-steps, each deleting the same fraction of the alive entries
        (a geometric split), measured but not tested."""
        return cls(max_re_estimates=steps, adapt=False)


def as_steps(steps: AdaptiveSteps | int | None) -> AdaptiveSteps | None:
    """``None`` or 1: one step; an int k > 1: :meth:`AdaptiveSteps.fixed` (k); a rule: itself."""
    if steps is None or isinstance(steps, AdaptiveSteps):
        return steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be None, an int >= 1 or an AdaptiveSteps, not {steps!r}")
    return None if steps == 1 else AdaptiveSteps.fixed(steps)


@dataclass
class SubStep:
    """One accepted sub-step: entries (or cells) deleted, predicted and measured increase,
    whether the measurement was within the tolerance, and what the pruner adds (OBS: the
    update's length and the damping)."""

    count: int
    predicted: float
    measured: float
    within: bool
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    """What a stepper's :meth:`Stepper.step` did: the new mask, the predicted increase, the
    largest deleted saliency, the objective when the step measured it already, and extras."""

    mask: Mask
    predicted: float
    biggest: float
    objective: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Stepper(Protocol):
    """What the rule needs from a pruner: estimate, delete up to a total, count."""

    def estimate(self, problem: Problem, mask: Mask) -> Any:
        """The saliencies (or inverse) at the current weights: one estimate."""

    def step(self, problem: Problem, mask: Mask, total: int, state: Any) -> StepResult:
        """Delete up to ``total`` deleted units (entries or cells) in all, from ``state``, changing
        the weights in place; ``state`` must stay usable for a retry after a restore."""

    def done(self, mask: Mask) -> int:
        """Units deleted in ``mask``."""

    def veto(self, state: Any, mask: Mask, trial: Mask) -> Any:
        """``state`` with the units ``trial`` deletes beyond ``mask`` excluded (optional)."""

    noun: str  # what done() counts, for messages: "pruned entries", "removed cells"


@dataclass
class Outcome:
    """The record of a (possibly split) step, as :class:`PruneInfo` fields."""

    mask: Mask
    predicted: float = 0.0
    biggest: float = 0.0
    before: float | None = None
    after: float | None = None
    re_estimates: int = 0
    rejected: int = 0
    sub_steps: list[SubStep] = field(default_factory=list)

    def info_fields(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`PruneInfo.step` (after predicted and biggest)."""
        measured = None
        if self.before is not None and self.after is not None:
            measured = self.after - self.before
        return {
            "objective_before": self.before,
            "objective_after": self.after,
            "measured_increase": measured,
            "re_estimates": self.re_estimates,
            "rejected": self.rejected,
            "sub_steps": [asdict(s) for s in self.sub_steps],
        }


def measured_objective(problem: Problem) -> float:
    """E after a deletion; +inf when the loss is no longer finite (the deletion broke the net)."""
    try:
        return problem.objective()
    except NonFiniteLossError:
        return math.inf


def rounding(problem: Problem, before: float, after: float) -> float:
    """The rounding allowance 64·eps·(|E₀| + |E₁|) in the model's floating dtype."""
    dtype = next((p.dtype for p in problem.model.parameters() if p.is_floating_point()), None)
    eps = torch.finfo(dtype).eps if dtype is not None else torch.finfo(torch.float32).eps
    if not math.isfinite(after):
        return 0.0
    return ROUNDING * eps * (abs(before) + abs(after))


class _Snapshot:
    """The values of the tensors a step may change, to undo a rejected trial."""

    def __init__(self, tensors: Mapping[str, Tensor]):
        self.tensors = dict(tensors)
        self.saved = {k: t.detach().clone() for k, t in self.tensors.items()}

    def restore(self) -> None:
        with torch.no_grad():
            for k, t in self.tensors.items():
                t.copy_(self.saved[k])


def touched(problem: Problem, mask: Mask) -> dict[str, Tensor]:
    """The parameters a step may change: the problem's and the mask's."""
    out = dict(problem.parameters())
    out.update(named_parameters(problem.model, mask.names, trainable_only=False))
    return out


def one_step(
    stepper: Stepper,
    problem: Problem,
    mask: Mask,
    total: int,
    state: Any = None,
    *,
    measure: bool = True,
) -> Outcome:
    """A single step to ``total`` (``state`` estimated here when None), measured if asked."""
    before = problem.objective() if measure else None
    if state is None:
        state = stepper.estimate(problem, mask)
    res = stepper.step(problem, mask, total, state)
    after = None
    if measure:
        after = res.objective if res.objective is not None else measured_objective(problem)
    out = Outcome(res.mask, res.predicted, res.biggest, before, after, re_estimates=0)
    if measure and stepper.done(res.mask) > stepper.done(mask):
        out.sub_steps.append(
            SubStep(
                stepper.done(res.mask) - stepper.done(mask),
                res.predicted,
                after - before,
                True,
                res.extra,
            )
        )
    return out


def _k_min(alive: int, goal_alive: int, left: int) -> int:
    """Entries of an even geometric split of alive → goal_alive into ``left`` sub-steps (rounded,
    at least 1, and leaving at least one entry for each later sub-step when there are enough)."""
    remaining = alive - goal_alive
    if left <= 1 or remaining <= 1:
        return remaining
    if goal_alive <= 0:
        k = round(remaining / left)
    else:
        k = round(alive * (1.0 - (goal_alive / alive) ** (1.0 / left)))
    return max(1, min(k, remaining - (left - 1) if remaining >= left else 1))


def run(
    rule: AdaptiveSteps,
    stepper: Stepper,
    problem: Problem,
    mask: Mask,
    total: int,
    units: int,
    state: Any = None,
) -> Outcome:
    """Delete up to ``total`` units (of ``units`` in all) by the rule; ``state``: a first
    estimate already made (e.g. scores passed by the caller)."""
    done = stepper.done(mask)
    remaining = total - done
    if remaining < 0:
        noun = getattr(stepper, "noun", "pruned entries")
        raise TargetExceededError(
            f"target of {total} {noun} is below the {done} already {noun.split()[0]}"
        )
    if rule.adapt and remaining > 1 and problem.n_samples < rule.min_samples:
        raise TooFewSamplesError(
            f"the objective is measured on {problem.n_samples} sample(s), fewer than "
            f"min_samples={rule.min_samples}: too few to steer sub-steps by. Pass more data, "
            "steps=None (one step, as the paper; measured, not steered), or "
            f"AdaptiveSteps(min_samples={problem.n_samples}) if these samples are the whole "
            "objective"
        )
    params = touched(problem, mask)
    with restored_on_error(params):  # an error in a later sub-step undoes the earlier ones
        return _run(rule, stepper, problem, mask, total, units, state, params)


def _attempt(rule, stepper, problem, mask, done, k, state, before):
    """Delete k more from ``state``; (result, E after, measured increase, within tolerance)."""
    res = stepper.step(problem, mask, done + k, state)
    after = res.objective if res.objective is not None else measured_objective(problem)
    increase = after - before
    slack = rule.rtol * abs(res.predicted) + rule.atol + rounding(problem, before, after)
    return res, after, increase, increase <= res.predicted + slack


def _sizes(k: int, k_min: int) -> list[int]:
    """Trial sizes from one estimate: k, halved down to k_min."""
    out = [k]
    while out[-1] > k_min:
        out.append(max(k_min, out[-1] // 2))
    return out


def _trials(rule, stepper, problem, mask, done, k, k_min, state, params, before):
    """Steps 2–3 of the rule from one estimate: the first trial (k halved down to k_min) whose
    measured increase holds is taken; a failing single entry is vetoed (:func:`_vetoes`); else
    the k_min trial is taken whatever it measures (flagged). Returns (result, E after, increase,
    within, rejected trials)."""
    sizes = _sizes(k, k_min) if rule.adapt else [k]
    vetoing = rule.adapt and rule.max_vetoes > 0 and k_min == 1 and hasattr(stepper, "veto")
    last = len(sizes) - 1
    for i, size in enumerate(sizes):
        snap = _Snapshot(params) if i < last or vetoing else None
        res, after, increase, within = _attempt(
            rule, stepper, problem, mask, done, size, state, before
        )
        if within or snap is None:
            return res, after, increase, within, i
        snap.restore()
        log.debug(
            "trial of %d rejected: measured %.3g, predicted %.3g", size, increase, res.predicted
        )
    rejected = len(sizes)
    return _vetoes(
        rule, stepper, problem, mask, done, state, params, before, res, increase, rejected
    )


def _vetoes(rule, stepper, problem, mask, done, state, params, before, res, increase, rejected):
    """A single entry failed: skip it and try the next, up to ``max_vetoes`` times; take the
    first that holds, else the tried one of least measured increase."""
    tried = [(increase, state)]
    for _ in range(rule.max_vetoes):
        state = stepper.veto(state, mask, res.mask)
        snap = _Snapshot(params)
        res, after, increase, within = _attempt(
            rule, stepper, problem, mask, done, 1, state, before
        )
        if stepper.done(res.mask) == done:  # nothing left to try
            snap.restore()
            break
        if within:
            return res, after, increase, within, rejected
        rejected += 1
        tried.append((increase, state))
        snap.restore()
    best = min(range(len(tried)), key=lambda i: (tried[i][0], i))
    res, after, increase, within = _attempt(
        rule, stepper, problem, mask, done, 1, tried[best][1], before
    )
    return res, after, increase, within, rejected - 1


def _run(rule, stepper, problem, mask, total, units, state, params) -> Outcome:
    done = stepper.done(mask)
    out = Outcome(mask, before=problem.objective())
    out.after = out.before
    trial = None
    estimates = 0
    biggest = -math.inf
    while done < total:
        if state is None:
            state = stepper.estimate(problem, mask)
        estimates += 1
        alive, goal_alive = units - done, units - total
        k_min = _k_min(alive, goal_alive, rule.max_re_estimates - estimates + 1)
        if not rule.adapt:
            trial = k_min
        largest = max(1, math.ceil(rule.max_fraction * alive))
        k = max(k_min, min(trial or largest, largest, total - done))
        res, after, increase, within, rejected = _trials(
            rule, stepper, problem, mask, done, k, k_min, state, params, out.after
        )
        out.rejected += rejected
        count = stepper.done(res.mask) - done
        out.sub_steps.append(SubStep(count, res.predicted, increase, within, res.extra))
        out.predicted += res.predicted
        biggest = max(biggest, res.biggest)
        mask, out.mask, out.after = res.mask, res.mask, after
        done = stepper.done(mask)
        trial = 2 * count if within else count
        state = None
        if count == 0:  # the stepper could delete nothing more (its own guards): stop
            break
    out.re_estimates = max(0, estimates - 1)
    out.biggest = biggest if biggest > -math.inf else 0.0
    if any(not s.within for s in out.sub_steps) and rule.adapt:
        log.info(
            "%d of %d sub-steps exceeded the predicted increase beyond the tolerance "
            "(the cap of %d estimates was reached)",
            sum(not s.within for s in out.sub_steps),
            len(out.sub_steps),
            rule.max_re_estimates,
        )
    return out
