"""Problem: data handling, the objective E = (1/N) Σ_n ℓ_n, and validation errors."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import reference
from cases import ALL, LOSSES, setup
from optbrain.curvature import (
    EmpiricalFisherDiagonal,
    ExactHessianDiagonal,
    GGNDiagonal,
    HutchinsonDiagonal,
    LeCunDiagonal,
    MCFisherDiagonal,
)
from optbrain.errors import EmptyDataError, NonFiniteLossError, ShapeMismatchError
from optbrain.problem import Problem, eval_mode

F64 = torch.float64


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)


def _data(sizes=(5, 3), n_out=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(b, 4, generator=g, dtype=F64), torch.randn(b, n_out, generator=g, dtype=F64))
        for b in sizes
    ]


# --------------------------------------------------------------------------- the objective


@pytest.mark.parametrize("sizes", [(5, 3), (8,), (1, 6, 1), (3, 3, 2)])
def test_n_samples_counts_every_batch(sizes):
    assert Problem(_mlp(), nn.MSELoss(), _data(sizes)).n_samples == sum(sizes)


@pytest.mark.parametrize("case", ALL)
@pytest.mark.parametrize("loss", LOSSES)
def test_objective_equals_the_mean_per_sample_loss(case, loss):
    s = setup(case, loss)
    want = float(reference.objective(s.model, s.loss_fn, s.batches, use_vmap=s.case.vmap_ok))
    got = s.problem().objective()
    assert isinstance(got, float)
    assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_objective_does_not_depend_on_the_batching(reduction):
    model, loss = _mlp(), nn.MSELoss(reduction=reduction)
    data = _data((5, 3))
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    # by hand: mean over samples of the per-sample loss (MSE-mean: over the 3 outputs)
    per = ((model(x) - y) ** 2).detach()
    per = per.mean(1) if reduction == "mean" else per.sum(1)
    want = float(per.mean())
    variants = {
        "[5,3]": data,
        "[8]": [(x, y)],
        "(X, Y)": (x, y),
        "[1]*8": [(x[i : i + 1], y[i : i + 1]) for i in range(8)],
        "DataLoader(3)": DataLoader(TensorDataset(x, y), batch_size=3),
    }
    for name, d in variants.items():
        p = Problem(model, loss, d)
        assert p.n_samples == 8, name
        assert p.objective() == pytest.approx(want, rel=1e-12), name


def test_a_single_tuple_is_one_batch():
    model = _mlp()
    x, y = _data((6,))[0]
    p = Problem(model, nn.MSELoss(), (x, y))
    assert p.n_samples == 6
    batches = list(p.batches())
    assert len(batches) == 1
    assert torch.equal(batches[0][0], x) and torch.equal(batches[0][1], y)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_functions_without_a_reduction_attribute(reduction):
    def loss_fn(out, y):
        per = ((out - y) ** 2).sum(1)
        return per.mean() if reduction == "mean" else per.sum()

    model, data = _mlp(), _data((5, 3))
    p = Problem(model, loss_fn, data)
    assert p.reduction == reduction
    want = float(reference.objective(model, loss_fn, data))
    assert p.objective() == pytest.approx(want, rel=1e-12)


def test_batch_objective_shares_add_up_to_the_objective():
    for reduction in ("mean", "sum"):
        model, data = _mlp(), _data((5, 3))
        p = Problem(model, nn.MSELoss(reduction=reduction), data)
        with torch.no_grad():
            total = sum(float(p.batch_objective(model(x), y)) for x, y in p.batches())
        assert total == pytest.approx(p.objective(), rel=1e-12)
        assert p.batch_weight(5) == pytest.approx(5 / 8 if reduction == "mean" else 1 / 8)


def test_objective_uses_eval_mode_and_restores_the_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3)).to(F64).train()
    data = _data((5, 3))
    p = Problem(model, nn.MSELoss(), data)
    values = {p.objective() for _ in range(3)}
    assert len(values) == 1, "dropout was active while evaluating the objective"
    assert model.training and all(m.training for m in model.modules())
    want = float(reference.objective(model, nn.MSELoss(), data))
    assert values.pop() == pytest.approx(want, rel=1e-12)


# --------------------------------------------------------------------------- validation errors


@pytest.mark.parametrize(
    "data",
    [[], [(torch.empty(0, 4, dtype=F64), torch.empty(0, 3, dtype=F64))]],
    ids=["no-batches", "empty-batch"],
)
def test_empty_data(data):
    p = Problem(_mlp(), nn.MSELoss(), data)
    with pytest.raises(EmptyDataError):
        p.n_samples  # noqa: B018
    with pytest.raises(EmptyDataError):
        GGNDiagonal(dtype=F64).diagonal(Problem(_mlp(), nn.MSELoss(), data))


def _shape_pattern(*dims: int) -> str:
    inner = r",\s*".join(str(d) for d in dims)
    return rf"[\(\[]{inner}[\)\]]"


def test_output_shape_not_fitting_the_loss():
    data = _data((5, 3), n_out=2)  # the model has 3 outputs
    p = Problem(_mlp(), nn.MSELoss(), data)
    with pytest.raises(ShapeMismatchError) as info:
        p.n_samples  # noqa: B018
    msg = str(info.value)
    assert re.search(_shape_pattern(5, 3), msg), msg
    assert re.search(_shape_pattern(5, 2), msg), msg
    with pytest.raises(ShapeMismatchError):
        GGNDiagonal(dtype=F64).diagonal(Problem(_mlp(), nn.MSELoss(), data))


def test_inputs_and_targets_of_different_lengths():
    x, y = _data((5,))[0]
    with pytest.raises(ShapeMismatchError):
        Problem(_mlp(), nn.MSELoss(), [(x, y[:4])]).n_samples  # noqa: B018


def test_nan_loss_is_reported():
    (x, y), second = _data((5, 3))
    x = x.clone()
    x[2, 1] = math.nan
    with pytest.raises(NonFiniteLossError):
        Problem(_mlp(), nn.MSELoss(), [(x, y), second]).n_samples  # noqa: B018
    # a NaN in a later batch: the objective still refuses to return it
    first, (x2, y2) = _data((5, 3))
    y2 = y2.clone()
    y2[0, 0] = math.inf
    with pytest.raises(NonFiniteLossError):
        Problem(_mlp(), nn.MSELoss(), [first, (x2, y2)]).objective()


ESTIMATORS = {
    "lecun": lambda: LeCunDiagonal(gauss_newton=False, dtype=F64),
    "lecun_gn": lambda: LeCunDiagonal(gauss_newton=True, dtype=F64),
    "ggn": lambda: GGNDiagonal(dtype=F64),
    "hessian": lambda: ExactHessianDiagonal(dtype=F64),
    "ef": lambda: EmpiricalFisherDiagonal(dtype=F64),
    "mc_fisher": lambda: MCFisherDiagonal(samples=2, seed=0, dtype=F64),
    "hutchinson": lambda: HutchinsonDiagonal(samples=2, seed=0, dtype=F64),
}


@pytest.mark.parametrize("where", ["first", "second"])
@pytest.mark.parametrize("est", list(ESTIMATORS))
def test_estimators_refuse_a_nan_loss(est, where):
    data = _data((5, 3))
    i = 0 if where == "first" else 1
    x = data[i][0].clone()
    x[1, 0] = math.nan
    data[i] = (x, data[i][1])
    with pytest.raises(NonFiniteLossError):
        ESTIMATORS[est]().diagonal(Problem(_mlp(), nn.MSELoss(), data))


class _CountingTrain(nn.Module):
    """A module that overrides train(): eval_mode must call it, not just flip flags."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.calls: list[bool] = []

    def train(self, mode: bool = True):
        self.calls.append(mode)
        return super().train(mode)


@pytest.mark.parametrize("custom", [False, True])
def test_eval_mode_restores_mixed_modes_exactly(custom):
    model = nn.Sequential(
        nn.Linear(2, 2), nn.Dropout(0.5), _CountingTrain() if custom else nn.Tanh()
    )
    model.train()
    model[1].eval()  # mixed: one submodule already in eval mode
    before = [m.training for m in model.modules()]
    if custom:
        model[2].calls.clear()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before
    if custom:
        assert model[2].calls[:1] == [False]  # its own train() ran
