"""The two-class, five-dimensional Gaussian mixture of Hassibi, Stork, Wolff & Watanabe (1994).

Class A is an equal mixture of N(μ_A1, Σ_A1) and N(μ_A2, Σ_A2), class B of N(μ_B1, Σ_B1) and
N(μ_B2, Σ_B2), all covariances diagonal (values from the paper, PAPERS.md §2.3); classes are
equiprobable. The paper does not give the weights of the two components within a class; we take
them equal. Targets: 1 for class A, 0 for class B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "COMPONENT_CLASS",
    "MEANS",
    "VARIANCES",
    "MixtureData",
    "bayes_posterior",
    "load_gaussian_mixture",
    "sample_mixture",
]

MEANS = torch.tensor(
    [
        [1.0, 1.0, 0.0, 1.0, 0.5],  # A1
        [0.0, 0.0, 1.0, 0.0, 0.5],  # A2
        [0.0, 1.0, 0.0, 0.0, 0.5],  # B1
        [1.0, 0.0, 1.0, 1.0, 0.5],  # B2
    ],
    dtype=torch.float64,
)
"""Component means, rows A1, A2, B1, B2."""
VARIANCES = torch.tensor(
    [
        [0.99, 1.00, 0.88, 0.70, 0.95],
        [1.28, 0.60, 0.52, 0.93, 0.93],
        [0.84, 0.68, 1.28, 1.02, 0.89],
        [0.52, 1.25, 1.09, 0.64, 1.13],
    ],
    dtype=torch.float64,
)
"""Diagonals of the component covariances, rows A1, A2, B1, B2."""
COMPONENT_CLASS = torch.tensor([1, 1, 0, 0])
"""Class of each component: 1 = A, 0 = B."""


def sample_mixture(
    n: int, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor]:
    """``(X, Y, component)``: ``n`` draws (class equiprobable, then one of its two components
    with probability ½), ``X`` n×5, ``Y`` n×1 (1 = class A), ``component`` int64 in 0..3."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n!r}")
    comp = torch.randint(0, 4, (n,), generator=generator)
    z = torch.randn(n, 5, generator=generator, dtype=torch.float64)
    x = MEANS[comp] + z * VARIANCES[comp].sqrt()
    y = COMPONENT_CLASS[comp].to(dtype).unsqueeze(1)
    return x.to(dtype), y, comp


def bayes_posterior(x: Tensor) -> Tensor:
    """P(class A | x) under the true mixture (float64, shape n×1): the Bayes-optimal output."""
    x = x.to(torch.float64)
    diff = x.unsqueeze(1) - MEANS  # n×4×5
    logp = -0.5 * (diff.square() / VARIANCES).sum(-1) - 0.5 * VARIANCES.log().sum(-1)
    logp = logp - 2.5 * math.log(2 * math.pi)
    log_a = torch.logsumexp(logp[:, :2], dim=1)
    log_b = torch.logsumexp(logp[:, 2:], dim=1)
    return torch.sigmoid(log_a - log_b).unsqueeze(1)


@dataclass
class MixtureData:
    """Train / validation / test draws (inputs n×5, targets n×1 in {0, 1})."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor


def load_gaussian_mixture(
    n_train: int = 1000,
    n_test: int = 1000,
    n_val: int = 0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> MixtureData:
    """Independent train, test and validation sets (the paper: 1000 train, 1000 test) from one
    generator seeded with ``seed``, drawn in that order (so adding a validation set changes
    neither the training nor the test set)."""
    for name, n in (("n_train", n_train), ("n_test", n_test), ("n_val", n_val)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n!r}")
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, _ = sample_mixture(n_train, gen, dtype)
    x_te, y_te, _ = sample_mixture(n_test, gen, dtype)
    x_va, y_va, _ = sample_mixture(n_val, gen, dtype)
    return MixtureData(x_tr, y_tr, x_va, y_va, x_te, y_te)
