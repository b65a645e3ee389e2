"""The course project's "OBD" score ½(Σ_b ∂L_b/∂w)²w² against its definition: per-sample
gradients summed over the samples of the batches used, by a loop of single-sample autograd
calls (PAPERS.md §14.2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optbrain.curvature import EmpiricalFisherDiagonal
from optbrain.problem import Problem
from optbrain.saliency import AccumulatedGradient

F64 = torch.float64


class PerPosition(nn.Module):
    """Logits (N, C, T) from (N, T, 3) inputs: cross-entropy over positions, as the NMT model."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).transpose(1, 2)


def setup(reduction: str):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = PerPosition().to(F64)
    x = torch.randn(11, 6, 3, generator=g, dtype=F64)
    y = torch.randint(0, 4, (11, 6), generator=g)
    data = [(x[:4], y[:4]), (x[4:9], y[4:9]), (x[9:], y[9:])]  # unequal batches
    return model, nn.CrossEntropyLoss(reduction=reduction), data


def oracle(model, loss_fn, data, batches):
    """½ (Σ_{n in the first `batches` batches} ∂ℓ_n/∂w)² w², ℓ_n = the per-sample loss of
    optbrain's objective (mean over positions for reduction='mean', sum for 'sum')."""
    params = dict(model.named_parameters())
    acc = {k: torch.zeros_like(p) for k, p in params.items()}
    for x, y in data[:batches]:
        for i in range(x.shape[0]):
            loss = loss_fn(model(x[i : i + 1]), y[i : i + 1])
            for k, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
                acc[k] += g
    return {k: 0.5 * acc[k].square() * params[k].detach().square() for k in params}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("batches", [1, 2, None])
def test_accumulated_gradient_matches_its_definition(reduction, batches):
    model, loss_fn, data = setup(reduction)
    got = AccumulatedGradient(batches)(Problem(model, loss_fn, data))
    want = oracle(model, loss_fn, data, 3 if batches is None else batches)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-14)


def test_it_is_not_the_empirical_fisher_obd():
    """Squaring after summing over samples differs from ½·mean(per-sample g²)·w²."""
    model, loss_fn, data = setup("mean")
    problem = Problem(model, loss_fn, data)
    ours = AccumulatedGradient()(problem)
    ef = EmpiricalFisherDiagonal().diagonal(problem)
    w = dict(model.named_parameters())
    k = "a.weight"
    ef_score = 0.5 * ef[k] * w[k].detach().square() * problem.n_samples**2
    assert not torch.allclose(ours[k], ef_score, rtol=1e-2)
    assert (ours[k] <= ef_score * (1 + 1e-9) + 1e-15).all()  # Cauchy–Schwarz: (Σg)² ≤ NΣg²


def test_bad_batches_are_refused():
    with pytest.raises(ValueError, match="batches"):
        AccumulatedGradient(0)
