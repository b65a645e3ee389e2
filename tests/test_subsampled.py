"""SubsampledDiagonal (issue 16, item 3): running mean and standard error of per-batch
diagonals, and the stopping rule on the OBD selection."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from optbrain.curvature import GGNDiagonal, LeCunDiagonal, SubsampledDiagonal
from optbrain.curvature.subsampled import undecided_fraction
from optbrain.problem import Problem
from optbrain.streaming import BatchStream

F64 = torch.float64


def _linear(weights: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weights.numel(), 1, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(weights.reshape(1, -1))
    return lin


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


@pytest.mark.parametrize("draw", [None, 10])
def test_mean_and_stderr_match_the_closed_form(draw):
    # f = w·x, ℓ = (f − y)²: the per-sample GGN diagonal is 2 x_j², so a draw (a batch of 5, or
    # two joined with draw=10) gives the mean of 2 x_j² over its samples; SE = sd of the draw
    # means (m − 1) / √m
    g = torch.Generator().manual_seed(1)
    m, size = 40, 5
    x = torch.randn(m * size, 4, generator=g, dtype=F64) * torch.tensor(
        [1.0, 2.0, 0.5, 3.0], dtype=F64
    )
    y = torch.randn(m * size, 1, generator=g, dtype=F64)
    problem = Problem(_linear(torch.ones(4, dtype=F64)), nn.MSELoss(), _batches(x, y, size))
    est = SubsampledDiagonal(GGNDiagonal(), 0.5, first=10**9, draw=draw).estimate(problem)
    if draw:
        m, size = m * size // draw, draw
    means = (2 * x.square()).reshape(m, size, 4).mean(1)
    torch.testing.assert_close(est.diagonal["weight"][0], means.mean(0), rtol=1e-12, atol=0)
    se = means.std(0, correction=1) / math.sqrt(m)
    torch.testing.assert_close(est.stderr["weight"][0], se, rtol=1e-10, atol=0)
    assert (est.samples, est.batches) == (m * size, m)


def test_all_samples_give_the_full_diagonal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(300, 6, generator=g, dtype=F64), torch.randint(0, 3, (300,), generator=g)
    for base in (GGNDiagonal(), LeCunDiagonal()):
        stream = BatchStream(lambda: iter(_batches(x, y, 32)))  # last batch of 12: weights n_b
        est = SubsampledDiagonal(base, 0.5, first=10**9).estimate(
            Problem(model, nn.CrossEntropyLoss(), stream)
        )
        full = base.diagonal(Problem(model, nn.CrossEntropyLoss(), (x, y)))
        assert est.samples == 300
        for k in full:
            torch.testing.assert_close(est.diagonal[k], full[k], rtol=1e-10, atol=1e-14)


def _regression(weights: torch.Tensor, n: int, seed: int) -> Problem:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, weights.numel(), generator=g, dtype=F64)
    y = torch.randn(n, 1, generator=g, dtype=F64)
    return Problem(_linear(weights), nn.MSELoss(), _batches(x, y, 64))


def test_stopping_rule_fires_when_the_saliencies_are_well_separated():
    # saliencies ½ w_j² · 2 E[x_j²] = w_j², a factor 4 apart: 1024 samples settle the selection
    w = 2.0 ** torch.arange(8, dtype=F64)
    est = SubsampledDiagonal(GGNDiagonal(), 0.5, first=1024).estimate(_regression(w, 20_000, 3))
    assert est.converged and est.samples == 1024 and est.undecided == 0.0


def test_stopping_rule_holds_out_when_the_saliencies_tie():
    # equal weights and i.i.d. inputs: every saliency sits at the threshold, nothing settles
    w = torch.ones(8, dtype=F64)
    est = SubsampledDiagonal(GGNDiagonal(), 0.5, first=512).estimate(_regression(w, 8192, 4))
    assert not est.converged and est.samples == 8192 and est.undecided > 0.5


def test_max_samples_stops_the_draw():
    w = torch.ones(8, dtype=F64)
    sub = SubsampledDiagonal(GGNDiagonal(), 0.5, first=512, max_samples=1000)
    est = sub.estimate(_regression(w, 8192, 4))
    assert est.samples == 1024 and not est.converged  # whole batches: 16 × 64


def test_undecided_fraction_counts_intervals_across_the_threshold():
    mean = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)}
    weights = {"w": torch.full((4,), math.sqrt(2.0), dtype=F64)}  # saliency = D
    # k = 2: τ = 2.5; intervals D ± z·SE with z = 1 and SE (0.1, 0.6, 0.4, 2.0)
    se = {"w": torch.tensor([0.1, 0.6, 0.4, 2.0], dtype=F64)}
    assert undecided_fraction(mean, se, weights, 2, 1.0) == pytest.approx(2 / 4)
    assert undecided_fraction(mean, se, weights, 0, 1.0) == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"confidence": 1.0},
        {"tolerance": 1.0},
        {"growth": 1.0},
        {"min_batches": 1},
        {"max_samples": 0},
        {"draw": 0},
        {"sparsity": 1.5},
    ],
)
def test_bad_arguments_are_refused(kwargs):
    args = {"sparsity": 0.5, **kwargs}
    with pytest.raises(ValueError):
        SubsampledDiagonal(GGNDiagonal(), **args)


def test_needs_a_diagonal_estimator():
    with pytest.raises(TypeError, match="diagonal estimator"):
        SubsampledDiagonal(object(), 0.5)
