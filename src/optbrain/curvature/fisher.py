"""Fisher-type diagonals: the empirical Fisher and the Monte-Carlo (true) Fisher."""

from __future__ import annotations

import torch

from ..paramdict import ParamDict
from ..problem import Problem
from . import backprop, generic, losses
from .base import DiagonalEstimator, in_dtype, structured_applies
from .ggn import check_method

_METHODS = ("auto", "backprop", "func")


class EmpiricalFisherDiagonal(DiagonalEstimator):
    """(1/N) Σ_n (∇ℓ_n)²: squared per-sample gradients at the observed targets.

    This is *not* a Hessian: it equals the GGN only in expectation over targets drawn from the
    model and at a perfect fit; far from that it can rank weights very differently. Often sold as
    "Hessian" pruning elsewhere; optbrain names it for what it is.
    """

    def __init__(self, method: str = "auto", **kwargs):
        super().__init__(**kwargs)
        self.method = check_method(method, _METHODS)

    def diagonal(self, problem: Problem) -> ParamDict:
        work = in_dtype(problem, self.dtype)
        name = type(self).__name__
        if self.method == "backprop" or (self.method == "auto" and structured_applies(work, name)):
            out = backprop.run(work, "ef", estimator=name, tick=self.progress)
        else:
            out = generic.per_sample_squares(
                work, lambda o, y: (losses.output_grads(work, o, y)[None], None), self.progress
            )
        return self._finish(problem, out)


class MCFisherDiagonal(DiagonalEstimator):
    """Unbiased Monte-Carlo estimate of the GGN (= Fisher) diagonal.

    For each sample, ``samples`` targets are drawn from the model's own predictive distribution
    (cross-entropy: labels from softmax(f); other losses: Gaussian directions of the loss Hessian's
    square root) and their squared per-sample gradients averaged. Cost: ``samples`` backward
    columns instead of C for :class:`GGNDiagonal`. Seeded by ``seed`` without touching the global
    RNG.
    """

    def __init__(self, samples: int = 1, seed: int | None = None, method: str = "auto", **kwargs):
        super().__init__(**kwargs)
        if samples < 1:
            raise ValueError(f"samples must be >= 1, not {samples}")
        self.samples, self.seed = samples, seed
        self.method = check_method(method, _METHODS)

    def diagonal(self, problem: Problem) -> ParamDict:
        work = in_dtype(problem, self.dtype)
        gen = torch.Generator()
        if self.seed is not None:
            gen.manual_seed(self.seed)
        else:
            gen.seed()
        name = type(self).__name__
        if self.method == "backprop" or (self.method == "auto" and structured_applies(work, name)):
            out = backprop.run(
                work,
                "mc",
                estimator=name,
                samples=self.samples,
                generator=gen,
                tick=self.progress,
            )
        else:
            out = generic.per_sample_squares(
                work,
                lambda o, y: (losses.mc_factor(work, o, y, self.samples, gen), None),
                self.progress,
            )
        return self._finish(problem, out)
