"""Pruner = saliency + selector + update: the composition behind OBD, magnitude, random, SNIP."""

from __future__ import annotations

import torch

from ..masking import Mask
from ..paramdict import ParamDict
from ..problem import Problem
from ..saliency.base import Saliency
from ..selection import GlobalSelector
from ..update import ZeroUpdate
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
    """

    accepts_scores = True

    def __init__(self, saliency: Saliency, selector=None, update=None):
        self.saliency = saliency
        self.selector = selector if selector is not None else GlobalSelector()
        self.update = update if update is not None else ZeroUpdate()

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
        if scores is None:
            scores = self.saliency(sub)
        new = self.selector({k: scores[k] for k in mask.names}, mask, sparsity)
        deleted = {k: mask[k] & ~new[k] for k in mask.names}
        predicted, biggest = 0.0, float("-inf")
        for k, d in deleted.items():
            if d.any():
                vals = scores[k].detach().to(torch.float64)[d.to(scores[k].device)]
                predicted += float(vals.sum())
                biggest = max(biggest, float(vals.max()))
        self.update(sub, mask, new, scores)
        info = PruneInfo.step(
            problem.model, mask, new, predicted, biggest if biggest > float("-inf") else 0.0
        )
        return new, info

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
        return f"Pruner({self.saliency!r}, {self.selector!r}, {self.update!r})"
