"""Fisher-type diagonals: the empirical Fisher and the Monte-Carlo (true) Fisher."""

from __future__ import annotations

from ..paramdict import ParamDict
from ..problem import Problem
from . import generic, losses
from .base import seeded_generator
from .structured import StructuredEstimator


class EmpiricalFisherDiagonal(StructuredEstimator):
    """(1/N) Σ_n (∇ℓ_n)²: squared per-sample gradients at the observed targets.

    This is *not* a Hessian: it equals the GGN only in expectation over targets drawn from the
    model and at a perfect fit; far from that it can rank weights very differently. Often sold as
    "Hessian" pruning elsewhere; optbrain names it for what it is.
    """

    mode = "ef"

    def _generic(self, work: Problem) -> ParamDict:
        return generic.per_sample_squares(
            work, lambda o, y: (losses.output_grads(work, o, y)[None], None), self.progress
        )


class MCFisherDiagonal(StructuredEstimator):
    """Unbiased Monte-Carlo estimate of the GGN (= Fisher) diagonal.

    For each sample, ``samples`` targets are drawn from the model's own predictive distribution
    (cross-entropy: labels from softmax(f); other losses: Gaussian directions of the loss Hessian's
    square root) and their squared per-sample gradients averaged. Cost: ``samples`` backward
    columns instead of C for :class:`GGNDiagonal`. Seeded by ``seed`` without touching the global
    RNG (each call with the same seed draws the same samples). On a distributed problem rank r
    draws from its own stream derived from ``seed`` (rank 0: ``seed``'s): the estimate stays
    unbiased and equal on all ranks, but is not one process's draw on the union.
    """

    mode = "mc"

    def __init__(self, samples: int = 1, seed: int | None = None, method: str = "auto", **kwargs):
        super().__init__(method, **kwargs)
        if samples < 1:
            raise ValueError(f"samples must be >= 1, not {samples}")
        self.samples, self.seed = samples, seed
        self._gen = None

    def diagonal(self, problem: Problem) -> ParamDict:
        # distributed: each rank draws its own stream (seed's for rank 0), so the ranks' draws
        # are independent; the sum is unbiased but depends on how the data are split
        self._gen = seeded_generator(self.seed, problem.shards.rank)
        return super().diagonal(problem)

    def _backprop_options(self) -> dict:
        return {"samples": self.samples, "generator": self._gen}

    def _generic(self, work: Problem) -> ParamDict:
        return generic.per_sample_squares(
            work,
            lambda o, y: (losses.mc_factor(work, o, y, self.samples, self._gen), None),
            self.progress,
        )
