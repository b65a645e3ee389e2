"""Protocols and the shared base class of curvature estimators.

Every diagonal estimator computes, for the objective E(θ) = (1/N) Σ_n ℓ_n(θ) of a
:class:`~optbrain.problem.Problem`, a ParamDict of the same shapes as the parameters:

==========================  =========================================================
``ExactHessianDiagonal``    diag ∇²E
``GGNDiagonal``             diag (1/N) Σ_n J_nᵀ H_n J_n   (J_n = ∂f(x_n)/∂θ, H_n = ∂²ℓ_n/∂f²)
``EmpiricalFisherDiagonal`` (1/N) Σ_n (∇ℓ_n)²
``MCFisherDiagonal``        unbiased Monte-Carlo estimate of the GGN diagonal
``HutchinsonDiagonal``      unbiased estimate of diag ∇²E from Hessian-vector products
``LeCunDiagonal``           LeCun, Denker & Solla's (1989) recursion, exact only where its docs say
==========================  =========================================================

Curvature is evaluated with the model in eval mode (dropout off, batch-norm running statistics) and
the previous modes are restored afterwards. With a mask attached, derivatives are taken with respect
to the stored (original) weights, so pruned entries get curvature 0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from ..errors import NonFiniteLossError
from ..paramdict import ParamDict
from ..problem import Problem
from ._checks import all_finite

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each unit of work (a batch, a probe vector...)."""


@runtime_checkable
class DiagonalCurvature(Protocol):
    def diagonal(self, problem: Problem) -> ParamDict: ...


class DiagonalEstimator:
    """Base class: holds ``dtype`` (accumulation precision) and an optional progress callback.

    ``dtype=None`` accumulates in the parameters' dtype; ``torch.float64`` computes the whole
    estimate in double precision (on a float64 copy of the model's parameters).
    """

    #: estimators that accept any differentiable module (not only registry layers)
    generic: bool = True

    def __init__(self, *, dtype: torch.dtype | None = None, progress: Progress | None = None):
        self.dtype = dtype
        self.progress = progress

    def diagonal(self, problem: Problem) -> ParamDict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _finish(
        self, problem: Problem, out: ParamDict, params: dict[str, torch.Tensor] | None = None
    ) -> ParamDict:
        """Results in ``dtype`` (or each parameter's dtype), on the parameters' devices; refuses
        non-finite values (a NaN or inf loss anywhere in the data). ``params``: the problem's
        ``parameters()`` when the caller has them."""
        if out and not all_finite(list(out.values())):
            for k, v in out.items():
                if not torch.isfinite(v).all():
                    raise NonFiniteLossError(
                        f"{type(self).__name__}: the curvature of {k} is NaN or infinite (NaN or "
                        "inf loss, inputs or weights in the data)"
                    )
        params = problem.parameters() if params is None else params
        return {
            k: v.to(dtype=self.dtype or params[k].dtype, device=params[k].device)
            for k, v in out.items()
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "progress")
        return f"{type(self).__name__}({args})"


def seeded_generator(seed: int | None, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (fresh entropy when None); global RNG untouched.
    ``stream`` > 0 (a rank) gives an independent stream derived from ``seed``; 0 is ``seed``
    itself."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    elif stream:
        gen.manual_seed((int(seed) * 1_000_003 + 7919 * int(stream)) % 2**63)
    else:
        gen.manual_seed(seed)
    return gen


def in_dtype(problem: Problem, dtype: torch.dtype | None) -> Problem:
    """The problem itself, or one on a copy of the model cast to ``dtype`` (results keep keys)."""
    return problem if dtype is None else problem.cast(dtype)
