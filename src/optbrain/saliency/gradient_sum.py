"""The summed gradient ∇ Σ_n ℓ_n over the first batches of a problem's data (of every rank):
what SNIP and the accumulated-gradient score both rank weights by."""

from __future__ import annotations

import torch
from torch import Tensor

from ..problem import Problem, eval_mode


def summed_gradient(
    problem: Problem, batches: int | None, what: str, dtype: torch.dtype | None = None
) -> tuple[dict[str, Tensor], list[Tensor], int]:
    """(parameters, Σ_n ∇ℓ_n per parameter, samples used) over the first ``batches`` batches
    (``None``: all), in eval mode, summed in ``dtype`` (default: the parameters'); on a
    distributed problem the sums and the count are over every rank's first ``batches``
    (``what`` names the consumer in a collective error)."""
    params = problem.parameters()
    grads = [torch.zeros_like(p, dtype=dtype) for p in params.values()]
    used = 0
    problem.prepare()
    with problem.together(what), eval_mode(problem.model), torch.enable_grad():
        for i, (x, y) in enumerate(problem.batches()):
            if batches is not None and i >= batches:
                break
            loss = problem.batch_sum(problem.model(x), y)
            gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for acc, g in zip(grads, gs):
                if g is not None:
                    acc += g.detach().to(acc.dtype)
            used += x.shape[0]
    problem.all_reduce_(grads)
    return params, grads, problem.shards.count(used)
