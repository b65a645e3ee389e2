"""Curvature diagonals from a growing subsample, with a standard error per entry and a stopping
rule on the selected set (issue 16, item 3; the setting of Tolstrup 1995, PAPERS.md §9: OBD
and OBS on a large network trained on voluminous data, where "subsampling the patterns used for
H" is the first approximation).

The base estimator is run batch by batch on the problem's data, in the order given; every
estimator of :mod:`optbrain.curvature` returns a per-sample mean, so batch b gives
D_b = (1/n_b) Σ_{n∈b} d_n and the running estimate after m batches is

    D̂ = Σ_b n_b D_b / Σ_b n_b       (= the base estimator on the union of the m batches).

Its standard error treats the batch means as independent draws (the batch is the sampling unit,
so the data must come in random order: a shuffled ``DataLoader``, an i.i.d. generator; batch
size 1 gives per-sample draws; ``draw`` joins consecutive batches into larger units). With
West's (1979) weighted form of Welford's update, for the weights w_b = n_b, W = Σ_b w_b,

    δ = D_b − D̂;  D̂ += (w_b/W) δ;  M2 += w_b δ (D_b − D̂);
    SE(D̂)² = M2 / (W (m − 1)),

which for equal batches is the textbook s²/m of the m batch means (s² with m − 1 in the
denominator). All of it is kept per entry in float64: memory 3 copies of the parameters.

**Stopping rule.** The selection is OBD's (LeCun et al. 1990, PAPERS.md §1): saliency
s_j = ½ D̂_j w_j², with the standard error e_j = ½ SE(D̂_j) w_j², and the k = target_count(sparsity)
smallest saliencies are pruned. With s_(k) the k-th smallest saliency, the threshold is
τ = (s_(k) + s_(k+1))/2 and z = Φ⁻¹((1 + confidence)/2) (1.96 at 95 %). Weight j is *undecided*
when its confidence interval contains the threshold, |s_j − τ| < z e_j. The rule is checked when
the samples read reach ``first``, ``first·growth``, ``first·growth²``, … (and after at least
``min_batches`` batches); drawing stops at the first check where the fraction of undecided weights
(of all entries of the problem's parameters) is at most ``tolerance``, or when ``max_samples``
are read or the data end (the rule is then evaluated once more on all that was read, and
``converged`` says whether it holds). The
intervals are per weight, not simultaneous, and ignore the uncertainty of τ itself: the rule
bounds the share of coin-flip decisions, it does not certify the whole set.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import EmptyDataError, NotDistributedError
from ..paramdict import ParamDict
from ..problem import Problem
from ..selection import target_count
from .base import DiagonalCurvature, DiagonalEstimator, Progress

log = logging.getLogger(__name__)


@dataclass
class SubsampledEstimate:
    """What :meth:`SubsampledDiagonal.estimate` found: the diagonal D̂, its standard errors, the
    samples and batches read, the fraction of undecided weights at the last check (NaN when no
    check ran) and whether the stopping rule fired."""

    diagonal: ParamDict
    stderr: ParamDict
    samples: int
    batches: int
    undecided: float
    converged: bool


class _Welford:
    """Weighted running mean and M2 of per-batch diagonals (float64), West (1979)."""

    def __init__(self):
        self.mean: dict[str, Tensor] = {}
        self.m2: dict[str, Tensor] = {}
        self.weight = 0.0
        self.count = 0

    def add(self, diag: ParamDict, w: float) -> None:
        self.weight += w
        self.count += 1
        for k, v in diag.items():
            v = v.detach().to(torch.float64)
            if k not in self.mean:
                self.mean[k], self.m2[k] = v.clone(), torch.zeros_like(v)
                continue
            delta = v - self.mean[k]
            self.mean[k] += (w / self.weight) * delta
            self.m2[k] += w * delta * (v - self.mean[k])

    def stderr(self) -> dict[str, Tensor]:
        if self.count < 2:
            return {k: torch.full_like(v, math.inf) for k, v in self.mean.items()}
        scale = 1.0 / (self.weight * (self.count - 1))
        return {k: (v.clamp_min(0) * scale).sqrt() for k, v in self.m2.items()}


def undecided_fraction(
    mean: ParamDict, stderr: ParamDict, weights: ParamDict, k: int, z: float
) -> float:
    """The share of entries whose OBD saliency interval ½ w² (D̂ ± z SE) contains the threshold
    between the k-th and (k+1)-th smallest saliency (the module docstring's rule)."""
    names = list(mean)
    w2 = torch.cat([weights[n].detach().to(torch.float64).reshape(-1).square() for n in names])
    s = 0.5 * w2 * torch.cat([mean[n].reshape(-1) for n in names]).to(w2)
    e = 0.5 * w2 * torch.cat([stderr[n].reshape(-1) for n in names]).to(w2)
    if k <= 0 or k >= s.numel():
        return 0.0
    low = torch.topk(s, k + 1, largest=False).values
    tau = 0.5 * (low[k - 1] + low[k])
    return float(((s - tau).abs() < z * e).to(torch.float64).mean())


class SubsampledDiagonal(DiagonalEstimator):
    """A base diagonal estimator run on a growing prefix of the data until the OBD selection at
    ``sparsity`` is stable at ``confidence`` (module docstring: the estimate, its standard error
    and the stopping rule).

    ``diagonal(problem)`` returns D̂ (so the wrapper plugs into OBD and every diagonal consumer);
    :meth:`estimate` also returns the standard errors and the samples used. ``draw``: join
    consecutive batches into draws of at least that many samples (the sampling unit of the
    standard error, and one base-estimator call each: fewer, larger calls for small batches).
    The data must be in random order; this process only (a distributed problem raises
    :class:`~optbrain.errors.NotDistributedError`).
    """

    def __init__(
        self,
        estimator: DiagonalCurvature,
        sparsity: float | int,
        *,
        confidence: float = 0.95,
        tolerance: float = 0.01,
        first: int = 1024,
        growth: float = 2.0,
        min_batches: int = 8,
        max_samples: int | None = None,
        draw: int | None = None,
        dtype: torch.dtype | None = None,
        progress: Progress | None = None,
    ):
        super().__init__(dtype=dtype, progress=progress)
        if not isinstance(estimator, DiagonalCurvature):
            raise TypeError(f"estimator must be a diagonal estimator, not {estimator!r}")
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), not {confidence}")
        if not 0.0 <= tolerance < 1.0:
            raise ValueError(f"tolerance must be in [0, 1), not {tolerance}")
        if first < 1 or growth <= 1.0 or min_batches < 2:
            raise ValueError(
                f"need first >= 1, growth > 1 and min_batches >= 2 (got {first}, {growth}, "
                f"{min_batches})"
            )
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, not {max_samples}")
        if draw is not None and draw < 1:
            raise ValueError(f"draw must be >= 1 or None, not {draw}")
        target_count(sparsity, 2)  # the type and range of the target, before any pass
        self.estimator, self.sparsity = estimator, sparsity
        self.confidence, self.tolerance = confidence, tolerance
        self.first, self.growth, self.min_batches = first, growth, min_batches
        self.max_samples, self.draw = max_samples, draw

    def diagonal(self, problem: Problem) -> ParamDict:
        return self.estimate(problem).diagonal

    def estimate(self, problem: Problem) -> SubsampledEstimate:
        """Draw batches until the stopping rule fires, ``max_samples`` or the data end."""
        if problem.distributed:
            raise NotDistributedError(
                "SubsampledDiagonal cannot run data-parallel: its stopping decision is taken on "
                "one process's stream; run it in one process"
            )
        params = problem.parameters()
        k = target_count(self.sparsity, sum(p.numel() for p in params.values()))
        z = statistics.NormalDist().inv_cdf(0.5 + 0.5 * self.confidence)
        acc, seen, check = _Welford(), 0, float(self.first)
        undecided, converged = math.nan, False
        problem.prepare()
        for x, y in self._draws(problem):
            acc.add(self.estimator.diagonal(problem.on_batch(x, y)), float(x.shape[0]))
            seen += x.shape[0]
            if self.progress is not None:
                self.progress(seen, self.max_samples or 0)
            if seen >= check and acc.count >= self.min_batches:
                while check <= seen:
                    check *= self.growth
                undecided = undecided_fraction(acc.mean, acc.stderr(), params, k, z)
                log.info("%d samples: %.4f of the weights undecided", seen, undecided)
                if undecided <= self.tolerance:
                    converged = True
                    break
            if self.max_samples is not None and seen >= self.max_samples:
                break
        if acc.count == 0:
            raise EmptyDataError("the problem's data yielded no samples")
        if not converged and acc.count >= self.min_batches:  # the data or max_samples ended
            undecided = undecided_fraction(acc.mean, acc.stderr(), params, k, z)
            converged = undecided <= self.tolerance
        out = self._finish(problem, acc.mean, params)
        se = {n: v.to(out[n]) for n, v in acc.stderr().items()}
        return SubsampledEstimate(out, se, seen, acc.count, undecided, converged)

    def _draws(self, problem: Problem):
        """The problem's batches, consecutive ones joined until a draw holds ``draw`` samples
        (each batch its own draw when ``draw`` is None); the rest at the end is a last draw."""
        xs: list[Tensor] = []
        ys: list[Tensor] = []
        n = 0
        for x, y in problem.batches():
            xs.append(x)
            ys.append(y)
            n += x.shape[0]
            if self.draw is None or n >= self.draw:
                yield _joined(xs), _joined(ys)
                xs, ys, n = [], [], 0
        if xs:
            yield _joined(xs), _joined(ys)

    def __repr__(self) -> str:
        return (
            f"SubsampledDiagonal({self.estimator!r}, sparsity={self.sparsity!r}, "
            f"confidence={self.confidence}, tolerance={self.tolerance}, first={self.first}, "
            f"growth={self.growth}, max_samples={self.max_samples}, draw={self.draw})"
        )


def _joined(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)
