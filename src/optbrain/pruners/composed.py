"""Pruner = saliency + selector + update: the composition behind OBD, magnitude, random, SNIP."""

from __future__ import annotations

import torch

from ..masking import Mask
from ..paramdict import ParamDict
from ..problem import Problem
from ..saliency.base import Saliency
from ..selection import GlobalSelector, ThresholdSelector, target_count
from ..update import ZeroUpdate
from . import adaptive
from .adaptive import AdaptiveSteps, StepResult, as_steps
from .base import PruneInfo, PrunerBase


def restricted(problem: Problem, mask: Mask) -> Problem:
    """The problem restricted to the masked parameters (curvature is not computed for the others);
    a problem already restricted must include them."""
    if problem.params is not None:
        missing = [n for n in mask.names if n not in problem.params]
        if missing:
            raise KeyError(f"the problem's params exclude masked parameter(s) {missing}")
        return problem
    return problem.restrict(list(mask.names))


class Pruner(PrunerBase):
    """One pruning step: compute saliencies, select the next entries to delete, update weights.

    ``pruner(problem, mask=None, sparsity=0.5)`` returns ``(new_mask, info)``; ``sparsity`` is the
    total target (required by the global and per-layer selectors, an optional cap for the threshold
    selector). ``mask=None`` starts
    from :meth:`default_mask` (the attached mask, or every default-prunable weight kept).
    The update is applied to the stored weights in place (zeroing for OBD); the mask is returned,
    not attached: ``optbrain.masking.attach(model, mask)`` does that (``iterative_prune`` does it
    for you).

    ``steps``: ``None`` (default) deletes in one step; an :class:`~optbrain.pruners.AdaptiveSteps`
    splits a deletion into sub-steps with re-estimated saliencies where the measured objective
    departs from the prediction (:mod:`optbrain.pruners.adaptive`; a threshold selector always
    takes one step); an int k > 1 splits it into k even geometric sub-steps. ``measure=True``
    measures the objective before and after (two forward passes; required by adaptive steps) and
    records it in the :class:`PruneInfo`.
    """

    accepts_scores = True

    def __init__(
        self,
        saliency: Saliency,
        selector=None,
        update=None,
        *,
        steps: AdaptiveSteps | int | None = None,
        measure: bool = True,
    ):
        self.saliency = saliency
        self.selector = selector if selector is not None else GlobalSelector()
        self.update = update if update is not None else ZeroUpdate()
        self.steps = as_steps(steps)
        self.measure = bool(measure) or self.steps is not None

    def __call__(
        self,
        problem: Problem,
        mask: Mask | None = None,
        sparsity: float | int | None = None,
        *,
        scores: ParamDict | None = None,
        units: float | int | None = None,
    ) -> tuple[Mask, PruneInfo]:
        """``scores`` may pass saliencies already computed by :meth:`scores` for this state;
        ``units`` is refused (this pruner removes weights, not cells)."""
        self._check_arguments(scores, units)
        mask = mask if mask is not None else self.default_mask(problem.model)
        sub = restricted(problem, mask)
        stepper = _Ranked(self, sub)
        if self.steps is None or sparsity is None or isinstance(self.selector, ThresholdSelector):
            out = adaptive.one_step(stepper, sub, mask, sparsity, scores, measure=self.measure)
        else:
            total = target_count(sparsity, mask.total())
            out = adaptive.run(self.steps, stepper, sub, mask, total, mask.total(), scores)
        info = PruneInfo.step(
            problem.model, mask, out.mask, out.predicted, out.biggest, **out.info_fields()
        )
        return out.mask, info

    def scores(self, problem: Problem, mask: Mask | None = None) -> ParamDict:
        """The saliencies the pruner would use, without pruning."""
        mask = mask if mask is not None else self.default_mask(problem.model)
        return self.saliency(restricted(problem, mask))

    def state_dict(self) -> dict:
        """State of stateful parts (e.g. a random saliency's generator), for checkpoints."""
        return {
            name: part.state_dict()
            for name, part in (
                ("saliency", self.saliency),
                ("selector", self.selector),
                ("update", self.update),
            )
            if hasattr(part, "state_dict")
        }

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            getattr(self, name).load_state_dict(value)

    def __repr__(self) -> str:
        extra = f", steps={self.steps!r}" if self.steps is not None else ""
        return f"Pruner({self.saliency!r}, {self.selector!r}, {self.update!r}{extra})"


class _Ranked:
    """The adaptive rule's view of a :class:`Pruner`: estimate = saliencies, step = select to a
    total and update; the saliencies are not changed by a step (a retry reuses them)."""

    noun = "pruned entries"

    def __init__(self, pruner: Pruner, sub: Problem):
        self.pruner, self.sub = pruner, sub

    def estimate(self, problem: Problem, mask: Mask) -> ParamDict:
        return self.pruner.saliency(self.sub)

    def step(self, problem: Problem, mask: Mask, total, scores: ParamDict) -> StepResult:
        new = self.pruner.selector({k: scores[k] for k in mask.names}, mask, total)
        predicted, biggest = deleted_sum(scores, mask, new)
        self.pruner.update(self.sub, mask, new, scores)
        return StepResult(new, predicted, biggest)

    @staticmethod
    def done(mask: Mask) -> int:
        return mask.pruned()

    @staticmethod
    def veto(scores: ParamDict, mask: Mask, trial: Mask) -> ParamDict:
        """The scores with the entries ``trial`` deleted beyond ``mask`` set to +inf."""
        out = dict(scores)
        for k in mask.names:
            gone = (mask[k] & ~trial[k]).to(scores[k].device)
            if gone.any():
                out[k] = torch.where(gone, torch.inf, scores[k])
        return out


def deleted_sum(scores: ParamDict, old: Mask, new: Mask) -> tuple[float, float]:
    """(sum, max) of the saliencies of the entries ``old`` keeps and ``new`` deletes (max 0.0
    when none is deleted)."""
    predicted, biggest = 0.0, float("-inf")
    for k in old.names:
        d = old[k] & ~new[k]
        if d.any():
            vals = scores[k].detach().to(torch.float64)[d.to(scores[k].device)]
            predicted += float(vals.sum())
            biggest = max(biggest, float(vals.max()))
    return predicted, biggest if biggest > float("-inf") else 0.0
