"""Hutchinson's stochastic estimator of the Hessian diagonal."""

from __future__ import annotations

from ..paramdict import ParamDict
from ..problem import Problem
from . import generic
from .base import DiagonalEstimator, in_dtype, seeded_generator
from .paths import Path


class HutchinsonDiagonal(DiagonalEstimator):
    """(1/S) Σ_s v_s ⊙ (∇²E v_s), v_s Rademacher: unbiased for diag ∇²E, any module.

    Each probe costs one Hessian-vector product over the data (about 2–4 gradient passes); the
    error shrinks like 1/√S and depends on the off-diagonal mass of the Hessian.
    """

    def __init__(self, samples: int = 100, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if samples < 1:
            raise ValueError(f"samples must be >= 1, not {samples}")
        self.samples, self.seed = samples, seed

    def path(self, problem: Problem) -> Path:
        """Always ``generic``: the probes are Hessian-vector products by ``torch.func``."""
        return Path("generic", "Hutchinson's probes are Hessian-vector products (torch.func)")

    def diagonal(self, problem: Problem) -> ParamDict:
        work = in_dtype(problem, self.dtype)
        gen = seeded_generator(self.seed)
        return self._finish(problem, generic.hutchinson(work, self.samples, gen, self.progress))
