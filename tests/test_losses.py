"""Closed forms of the loss Hessian at the output for cross-entropy over positions (a class at
every position of a sequence) against torch.func's per-sample Hessians."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import hessian

from optbrain import Problem
from optbrain.curvature import losses

D = torch.float64


def _setup(reduction: str, shape=(3, 5, 4, 2)):
    g = torch.Generator().manual_seed(0)
    out = torch.randn(*shape, generator=g, dtype=D)
    y = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    problem = Problem(nn.Identity(), nn.CrossEntropyLoss(reduction=reduction), (out, y))
    return problem, out, y


def _dense(problem, out, y):
    def loss(o, t):
        return problem.loss_fn(o.reshape(out.shape[1:])[None], t[None])

    return torch.stack([hessian(loss)(out[n].reshape(-1), y[n]) for n in range(out.shape[0])])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sequence_cross_entropy_factor_and_diagonal_are_exact(reduction):
    problem, out, y = _setup(reduction)
    h = _dense(problem, out, y)
    cols, sign = losses.hessian_factor(problem, out, y)
    assert sign is None and cols.shape[0] == 4 * 2 * (5 - 1)
    flat = cols.reshape(cols.shape[0], out.shape[0], -1)
    torch.testing.assert_close(torch.einsum("kni,knj->nij", flat, flat), h)
    diag = torch.diagonal(h, dim1=1, dim2=2).reshape(out.shape)
    torch.testing.assert_close(losses.hessian_diagonal(problem, out, y), diag)


def test_sequence_cross_entropy_monte_carlo_columns_are_unbiased():
    problem, out, y = _setup("mean", shape=(2, 3, 4))
    h = _dense(problem, out, y)
    cols = losses.mc_factor(problem, out, y, 40_000, torch.Generator().manual_seed(1))
    flat = cols.reshape(cols.shape[0], out.shape[0], -1)
    est = torch.einsum("kni,knj->nij", flat, flat)
    torch.testing.assert_close(est, h, atol=4e-3, rtol=0)


def test_labels_drawn_for_the_mc_fisher_follow_the_predictive_distribution():
    """The inverse-CDF draw gives label j with probability p_j on every row (200,000 draws
    a row: frequencies within 0.005), and the same draws for the same generator state."""
    from optbrain.curvature.losses import _draw

    probs = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.0, 0.5], [0.0, 0.0, 1.0]])
    idx = _draw(probs, 200_000, torch.Generator().manual_seed(0))
    freq = torch.stack([(idx == j).double().mean(1) for j in range(3)], 1)
    torch.testing.assert_close(freq, probs.double(), atol=5e-3, rtol=0)
    again = _draw(probs, 200_000, torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)
