"""What a saliency is.

A saliency maps a :class:`~optbrain.problem.Problem` to a ParamDict of the shapes of the
parameters: for every parameter, the **estimated increase of the objective E if that parameter is
removed** (set to zero and frozen there). Lowest is pruned first. Saliencies of entries that are
already pruned are ignored by the selectors. Every saliency in optbrain follows this convention, so
that predicted objective changes (sums of deleted saliencies) are comparable across methods, with
the exceptions each class documents (``Random`` has no such meaning; ``SNIP`` estimates the size of
the first-order change).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..paramdict import ParamDict
from ..problem import Problem


@runtime_checkable
class Saliency(Protocol):
    def __call__(self, problem: Problem) -> ParamDict: ...


def detached_params(problem: Problem) -> ParamDict:
    """Current values of the problem's parameters (stored values; pruned entries are 0)."""
    return {k: p.detach() for k, p in problem.parameters().items()}
