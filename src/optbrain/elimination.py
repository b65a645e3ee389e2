"""The one elimination loop: delete, (retrain), record, repeat — with callbacks.

``iterative_prune`` (OBD's prune–retrain recipe), the scikit-learn selector
(:class:`optbrain.sklearn.OCDSelector`, RFE-shaped) and the experiments' removal loops
(input selection, one-deletion-at-a-time OBS) are this loop with different callbacks. A round r
(from ``first_round`` on) is:

1. ``mask``: the given start mask in round ``first_round`` and the previous round's new mask after
   it — or, with ``mask=None``, the pruner's :meth:`default_mask` of the model in every round
   (the attached mask, so a resumed run starts where it stopped);
2. ``goal = target(r, mask)``: the total target of the round (``None`` ends the loop);
3. ``problem = make_problem(model)``; ``scores(step)``: precomputed saliencies (injected scores:
   the pruner ranks by them; ``None``: the pruner computes its own);
4. ``before(step)``: a reason to stop before deleting (a string), or ``None``;
5. ``new, info = pruner(problem, mask, **{by: goal}, scores=...)``; ``apply(model, new)``
   (default :func:`~optbrain.masking.attach`); a pruner error of a type in ``stop_on`` ends the
   loop with its message as the reason;
6. ``deleted(step)``: called right after the deletion (measure the objective, evaluate);
7. ``retrain(model, r)``;
8. ``after(step)``: record the round; a string stops the loop after it.

:func:`eliminate` returns the reason it stopped (``None`` when ``target`` ended it). Callbacks
receive one :class:`Step`, filled in as the round proceeds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from . import distributed
from .masking import Mask, attach
from .problem import Problem
from .pruners.base import default_mask

__all__ = ["Step", "eliminate"]


@dataclass
class Step:
    """One round as the callbacks see it (fields after ``target`` are filled in as it goes)."""

    round: int
    mask: Mask
    target: float | int
    problem: Problem
    scores: Any = None
    new: Mask | None = None
    info: Any = None


Hook = Callable[[Step], Any]


def eliminate(
    model: nn.Module,
    pruner: Any,
    target: Callable[[int, Mask], float | int | None],
    *,
    make_problem: Callable[[nn.Module], Problem],
    mask: Mask | None = None,
    first_round: int = 1,
    by: str = "sparsity",
    scores: Hook | None = None,
    before: Hook | None = None,
    deleted: Hook | None = None,
    retrain: Callable[[nn.Module, int], Any] | None = None,
    after: Hook | None = None,
    apply: Callable[[nn.Module, Mask], Any] = attach,
    stop_on: tuple[type[BaseException], ...] = (),
) -> str | None:
    """Run rounds until ``target`` returns None or a callback gives a reason to stop (see the
    module docstring); return that reason (None when ``target`` ended the loop).

    ``by`` is the keyword the target is passed as: ``"sparsity"`` or ``"units"`` (cells, for the
    pruners that remove cells)."""
    if by not in ("sparsity", "units"):
        raise ValueError(f"by must be 'sparsity' or 'units', not {by!r}")
    r = first_round
    current = mask
    while True:
        start = current if current is not None else _default_mask(pruner, model)
        goal = target(r, start)
        if goal is None:
            return None
        step = Step(r, start, goal, make_problem(model))
        if scores is not None:
            step.scores = scores(step)
        reason = before(step) if before is not None else None
        if reason:
            return reason
        try:
            step.new, step.info = pruner(step.problem, start, scores=step.scores, **{by: goal})
        except stop_on as exc:
            return str(exc)
        apply(model, step.new)
        if deleted is not None:
            deleted(step)
        if retrain is not None:
            retrain(model, r)
            _one_model(model, step.problem)
        reason = after(step) if after is not None else None
        if reason:
            return reason
        if mask is not None:
            current = step.new
        r += 1


def _one_model(model: nn.Module, problem: Problem) -> None:
    """After each rank retrained on its own shard: the weights averaged over the ranks, weighted
    by their samples, so that every rank holds one model again (nothing on one process)."""
    if not problem.distributed:
        return
    local = problem.local_samples
    if local is None:  # not counted yet: this rank's batches, no collective call
        local = sum(int(x.shape[0]) for x, _ in problem.batches())
    distributed.average_models_(model, local, problem.shards)


def _default_mask(pruner: Any, model: nn.Module) -> Mask:
    """The pruner's own default mask (one decision per pruner), else the shared default."""
    own = getattr(pruner, "default_mask", None)
    return own(model) if own is not None else default_mask(model)
