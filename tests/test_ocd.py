"""Optimal Cell Damage: cell saliencies against float64 oracles, and the cell pruner.

* ``method="sum"``: a cell's saliency is the sum of the OBD saliencies ½ h_kk w_k² of its fan-out
  weights; checked against the OBD ParamDict summed by hand over the columns (no ``cells`` code).
* ``method="gate"``: ½ sᵀMs for the cell's fan-out weights s, M the dense GGN or Hessian of
  ``tests/reference.py`` (``torch.func``); equal to the sum when M is diagonal on the cell (an
  input of a linear model under MSE) and different when the cell's weights interact.
* The pruner removes a planted irrelevant input, masks fan-in and fan-out of units, never empties
  a layer, and keeps removed cells removed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reference
from optbrain.curvature import EmpiricalFisherDiagonal, ExactHessianDiagonal, GGNDiagonal
from optbrain.errors import EmptyLayerError, UnsupportedModuleError
from optbrain.loop import iterative_prune
from optbrain.masking import Mask, attach
from optbrain.problem import Problem
from optbrain.pruners import PRESETS, ocd
from optbrain.pruners.cell_pruner import CellPruneInfo, CellPruner
from optbrain.saliency import OBD, OCD
from optbrain.schedule import linear
from optbrain.selection import TargetExceededError

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _init(model: nn.Module, seed: int) -> nn.Module:
    g = _gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.7)
    return model.eval()


def mlp(loss: str = "ce", seed: int = 0):
    """4-5-3 tanh MLP (float64), CE or MSE, two batches of unequal size."""
    model = _init(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64), seed)
    g = _gen(10 + seed)
    x = torch.randn(11, 4, generator=g, dtype=F64)
    if loss == "ce":
        y, loss_fn = torch.randint(0, 3, (11,), generator=g), nn.CrossEntropyLoss()
    else:
        y, loss_fn = torch.randn(11, 3, generator=g, dtype=F64), nn.MSELoss()
    return model, loss_fn, [(x[:6], y[:6]), (x[6:], y[6:])]


def convnet(seed: int = 0):
    """Conv1d(2→3, k=3) → ReLU → Flatten → Linear(3·4 → 2): channels own 4 columns each."""
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 2)).to(F64)
    _init(model, seed)
    g = _gen(20 + seed)
    x = torch.randn(7, 2, 6, generator=g, dtype=F64)
    y = torch.randint(0, 2, (7,), generator=g)
    return model, nn.CrossEntropyLoss(), [(x[:4], y[:4]), (x[4:], y[4:])]


def fan_out_vector(model: nn.Module, name: str, cols: slice) -> torch.Tensor:
    """Flat vector (reference parameter order) holding ``name[:, cols]``, zero elsewhere."""
    like = reference.params_of(model)
    s = {k: torch.zeros_like(v) for k, v in like.items()}
    s[name][:, cols] = like[name][:, cols]
    return reference.flatten(s)


# --------------------------------------------------------------------------- sum = Σ fan-out OBD
@pytest.mark.parametrize("curv", ["ggn", "hessian"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_sum_is_sum_of_fan_out_obd_saliencies(curv, loss):
    model, loss_fn, data = mlp(loss)
    make = GGNDiagonal if curv == "ggn" else ExactHessianDiagonal
    problem = Problem(model, loss_fn, data)
    sal = OCD(make(dtype=F64), kinds=("input", "unit"))(problem)
    obd = OBD(make(dtype=F64))(Problem(model, loss_fn, data))
    expected = [obd["0.weight"][:, i].sum() for i in range(4)]
    expected += [obd["2.weight"][:, j].sum() for j in range(5)]
    assert [(c.kind, c.index) for c in sal.cells] == [("input", i) for i in range(4)] + [
        ("unit", j) for j in range(5)
    ]
    torch.testing.assert_close(sal.values, torch.stack(expected), rtol=1e-12, atol=1e-15)
    assert sal.values.dtype == F64 and sal.method == "sum"


def test_sum_for_conv_channels_spans_the_flattened_columns():
    model, loss_fn, data = convnet()
    sal = OCD(GGNDiagonal(dtype=F64), kinds=("input", "channel"))(Problem(model, loss_fn, data))
    obd = OBD(GGNDiagonal(dtype=F64))(Problem(model, loss_fn, data))
    expected = [obd["0.weight"][:, i].sum() for i in range(2)]
    expected += [obd["3.weight"][:, 4 * j : 4 * (j + 1)].sum() for j in range(3)]
    torch.testing.assert_close(sal.values, torch.stack(expected), rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------- gate = ½ sᵀMs
@pytest.mark.parametrize("matrix", ["ggn", "hessian"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_gate_equals_quadratic_form_of_dense_oracle(matrix, loss):
    model, loss_fn, data = mlp(loss, seed=1)
    dense = reference.dense_ggn if matrix == "ggn" else reference.dense_hessian
    m = dense(model, loss_fn, data)
    sal = OCD(matrix, kinds=("input", "unit"), method="gate", dtype=F64)(
        Problem(model, loss_fn, data)
    )
    vecs = [fan_out_vector(model, "0.weight", slice(i, i + 1)) for i in range(4)]
    vecs += [fan_out_vector(model, "2.weight", slice(j, j + 1)) for j in range(5)]
    expected = torch.stack([0.5 * v @ m @ v for v in vecs])
    torch.testing.assert_close(sal.values, expected, rtol=1e-10, atol=1e-14)
    if matrix == "hessian":  # away from a minimum the exact form can be negative somewhere
        assert sal.method == "gate"


def test_gate_on_conv_channels_matches_oracle():
    model, loss_fn, data = convnet(seed=2)
    m = reference.dense_ggn(model, loss_fn, data)
    sal = OCD(kinds=("channel",), method="gate", dtype=F64)(Problem(model, loss_fn, data))
    vecs = [fan_out_vector(model, "3.weight", slice(4 * j, 4 * j + 4)) for j in range(3)]
    expected = torch.stack([0.5 * v @ m @ v for v in vecs])
    torch.testing.assert_close(sal.values, expected, rtol=1e-10, atol=1e-14)


def test_gate_equals_sum_when_the_cell_block_is_diagonal():
    """Linear model under MSE: the Hessian couples W[k, i] and W[k', i] only for k = k', so the
    block of an input's fan-out column is diagonal and the joint estimate equals the sum."""
    g = _gen(3)
    model = _init(nn.Linear(4, 3).to(F64), 3)
    x, y = torch.randn(9, 4, generator=g, dtype=F64), torch.randn(9, 3, generator=g, dtype=F64)
    data = [(x[:5], y[:5]), (x[5:], y[5:])]
    problem = Problem(model, nn.MSELoss(), data)
    for matrix in ("ggn", "hessian"):
        gate = OCD(matrix, kinds=("input",), method="gate", dtype=F64)(problem)
        summed = OCD(matrix, kinds=("input",), dtype=F64)(problem)
        torch.testing.assert_close(gate.values, summed.values, rtol=1e-10, atol=1e-15)
    assert bool((gate.values > 0).all())


def test_gate_differs_from_sum_when_the_cell_weights_interact():
    """Hidden units under cross-entropy: the cross terms Σ_{j≠k} h_jk s_j s_k are not zero."""
    model, loss_fn, data = mlp("ce", seed=4)
    problem = Problem(model, loss_fn, data)
    gate = OCD(kinds=("unit",), method="gate", dtype=F64)(problem)
    summed = OCD(kinds=("unit",), dtype=F64)(problem)
    m = reference.dense_ggn(model, loss_fn, data)
    vecs = [fan_out_vector(model, "2.weight", slice(j, j + 1)) for j in range(5)]
    diag_only = torch.stack([0.5 * (v * torch.diagonal(m) * v).sum() for v in vecs])
    torch.testing.assert_close(summed.values, diag_only, rtol=1e-10, atol=1e-15)
    assert (gate.values - summed.values).abs().max() > 1e-3 * summed.values.abs().max()


def test_gate_progress_and_removed_cells_score_zero():
    model, loss_fn, data = mlp("ce")
    with torch.no_grad():
        model[0].weight[:, 2] = 0
    ticks = []
    sal = OCD(
        kinds=("input",), method="gate", dtype=F64, progress=lambda d, t: ticks.append((d, t))
    )(Problem(model, loss_fn, data))
    assert sal.values[2] == 0 and bool((sal.values[[0, 1, 3]] > 0).all())
    assert ticks and ticks[-1] == (4, 4)
    summed = OCD(kinds=("input",), dtype=F64)(Problem(model, loss_fn, data))
    assert summed.values[2] == 0


def test_to_params_and_back():
    model, loss_fn, data = mlp("ce")
    sal = OCD(kinds=("input", "unit"), dtype=F64)(Problem(model, loss_fn, data))
    like = dict(model.named_parameters())
    spread = sal.to_params(like)
    torch.testing.assert_close(spread["0.weight"][3], sal.values[:4])  # every row = inputs
    torch.testing.assert_close(spread["2.weight"][1], sal.values[4:])
    assert bool(torch.isinf(spread["0.bias"]).all())
    back = sal.from_params(spread)
    torch.testing.assert_close(back.values, sal.values)
    only_units = sal.select(kind="unit")
    assert len(only_units) == 5 and {c.kind for c in only_units.cells} == {"unit"}


# --------------------------------------------------------------------------- the pruner
def planted(seed: int = 0):
    """y depends on inputs 0 and 1 only; inputs 2 and 3 are pure noise. A trained 4-8-1 MLP."""
    g = _gen(seed)
    x = torch.randn(128, 4, generator=g, dtype=F64)
    y = (torch.sin(1.5 * x[:, :1]) + 0.8 * x[:, 1:2] ** 2).to(F64)
    model = _init(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(F64), seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    loss_fn = nn.MSELoss()
    for _ in range(300):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return model, loss_fn, [(x, y)]


@pytest.fixture(scope="module")
def trained():
    model, loss_fn, data = planted()
    return {k: v.clone() for k, v in model.state_dict().items()}, loss_fn, data


def _fresh(trained):
    state, loss_fn, data = trained
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(F64)
    model.load_state_dict(state)
    return model, loss_fn, data


@pytest.mark.parametrize("method", ["sum", "gate"])
def test_pruner_removes_the_planted_irrelevant_inputs(trained, method):
    model, loss_fn, data = _fresh(trained)
    pruner = ocd(method=method)
    assert isinstance(pruner, CellPruner) and PRESETS["ocd"] is ocd
    problem = Problem(model, loss_fn, data)
    sal = pruner.cell_scores(problem)
    assert sal.values[2:].max() < 0.1 * sal.values[:2].min()
    mask, info = pruner(problem, sparsity=2)
    assert isinstance(info, CellPruneInfo)
    assert sorted(info.removed) == [("input", "0", 2), ("input", "0", 3)]
    assert info.cells_total == 4 and info.cells_removed == 2 and info.newly_pruned == 16
    kept = mask["0.weight"]
    assert not kept[:, 2:].any() and bool(kept[:, :2].all()) and bool(mask["2.weight"].all())
    assert bool((model[0].weight[:, 2:] == 0).all())  # zeroed in place
    torch.testing.assert_close(
        torch.tensor(info.predicted_increase, dtype=F64), sal.values[2:].sum()
    )
    # idempotent total target; a fraction means the same number of cells
    attach(model, mask)
    again, info2 = pruner(problem, sparsity=0.5)
    assert again == mask and info2.newly_pruned == 0 and info2.removed == []
    with pytest.raises(TargetExceededError):
        pruner(problem, sparsity=1)


def test_pruner_removes_units_fan_in_and_fan_out():
    model, loss_fn, data = mlp("ce")
    problem = Problem(model, loss_fn, data)
    pruner = ocd(kinds=("unit",), steps=None)  # one step: the lowest saliency goes
    sal = pruner.cell_scores(problem)
    lowest = int(sal.values.argmin())
    start = Mask.ones(model, ["0.weight", "0.bias", "2.weight"])
    x = data[0][0]
    with torch.no_grad():
        gated = model[2](torch.tanh(model[0](x)) * (torch.arange(5) != lowest))
    mask, info = pruner(problem, start, sparsity=1)
    assert info.removed == [("unit", "0", lowest)]
    assert not mask["0.weight"][lowest].any() and not mask["0.bias"][lowest]
    assert not mask["2.weight"][:, lowest].any()
    assert mask.pruned() == 4 + 1 + 3
    with torch.no_grad():
        torch.testing.assert_close(model(x), gated)  # removing = gate 0


def test_pruner_never_empties_a_layer():
    model, loss_fn, data = mlp("ce")
    problem = Problem(model, loss_fn, data)
    mask, info = ocd()(problem, sparsity=3)  # 3 of 4 inputs: allowed
    assert info.cells_removed == 3 and int(mask["0.weight"].any(0).sum()) == 1
    with pytest.raises(ValueError, match="out of range"):  # all 4: refused like the fraction 1
        ocd()(problem, mask, sparsity=4)
    assert ocd()(problem, units=3)[0] == mask  # units= is the same target as sparsity here
    with pytest.raises(EmptyLayerError, match="unit/channel"):
        ocd(kinds=("unit", "input"))(Problem(model, loss_fn, data), sparsity=8)


def test_pruner_counts_cells_dead_after_weight_pruning_as_removed():
    model, loss_fn, data = mlp("ce")
    mask = Mask.ones(model).with_pruned({"0.weight": torch.tensor([1, 5, 9, 13, 17])})  # column 1
    attach(model, mask)
    new, info = ocd()(Problem(model, loss_fn, data), sparsity=1)
    assert new == mask and info.cells_removed == 1 and info.removed == []


def test_pruner_drives_iterative_prune_and_scores_broadcast(trained):
    model, loss_fn, data = _fresh(trained)
    pruner = ocd()
    start = pruner.cell_scores(Problem(model, loss_fn, data)).values
    history = iterative_prune(
        model,
        pruner,
        linear(0.5, 2),
        rounds=2,
        make_problem=lambda m: Problem(m, loss_fn, data),
        stop_saliency=1e6,
    )
    assert [r.round for r in history.records] == [0, 1, 2]
    assert not model[0].weight[:, 2:].any() and bool(model[0].weight[:, :2].any(0).all())
    assert [r.remaining for r in history.records] == [40, 32, 24]  # 8 weights per input
    first = history.records[1].predicted_increase
    torch.testing.assert_close(torch.tensor(first, dtype=F64), start.min())
    scores = pruner.scores(Problem(model, loss_fn, data))
    assert set(scores) == {"0.weight", "2.weight"} and bool(torch.isinf(scores["2.weight"]).all())
    assert pruner.state_dict() == {} and "CellPruner(OCD(" in repr(pruner)


def test_pruner_accepts_precomputed_scores(trained):
    model, loss_fn, data = _fresh(trained)
    pruner = ocd()
    problem = Problem(model, loss_fn, data)
    as_params = pruner.scores(problem)
    mask_a, _ = pruner(problem, sparsity=1, scores=as_params)
    mask_b, _ = pruner(problem, sparsity=1, scores=pruner.cell_scores(problem))
    assert mask_a == mask_b


# --------------------------------------------------------------------------- bad input
def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="method must be"):
        OCD(method="joint")
    with pytest.raises(ValueError, match="kinds"):
        OCD(kinds=("neuron",))
    with pytest.raises(ValueError, match="cannot use"):
        OCD(EmpiricalFisherDiagonal(), method="gate")
    with pytest.raises(TypeError, match="diagonal curvature"):
        OCD("fisher")
    model, loss_fn, data = mlp("ce")
    with pytest.raises(ValueError, match="fan-out weights"):
        ocd()(Problem(model, loss_fn, data), Mask.ones(model, ["2.weight"]), sparsity=1)
    with pytest.raises(ValueError, match="sparsity"):
        ocd()(Problem(model, loss_fn, data), sparsity=1.5)

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.a(x) + self.b(x)

    # a and b add into the output: their units are not cells, the inputs are
    branchy = OCD()(Problem(Branchy(), loss_fn, [(data[0][0].float(), data[0][1])]))
    assert [c.kind for c in branchy.cells] == ["input"] * 4

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else -self.a(x)

    with pytest.raises(UnsupportedModuleError, match="torch.fx cannot trace"):
        OCD()(Problem(Untraceable(), loss_fn, [(data[0][0].float(), data[0][1])]))


def test_removed_cells_give_a_smaller_model_with_the_same_outputs(trained):
    from optbrain import structure

    model, loss_fn, data = _fresh(trained)
    mask, _ = ocd()(Problem(model, loss_fn, data), sparsity=2)
    attach(model, mask)
    mask, info = ocd(kinds=("unit",), method="gate")(Problem(model, loss_fn, data), sparsity=3)
    attach(model, mask)
    assert info.cells_removed == 3
    res = structure.remove_dead_units(model, inputs=True)
    assert res.kept_inputs.tolist() == [0, 1]
    assert res.model[0].weight.shape == (5, 2) and res.model[2].weight.shape == (1, 5)
    x = data[0][0]
    with torch.no_grad():
        torch.testing.assert_close(res.model(res.select_inputs(x)), model(x))


def test_layer_scope_removes_the_same_fraction_of_every_layer():
    model = _init(
        nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).to(
            F64
        ),
        5,
    )
    _, loss_fn, data = mlp("ce")
    problem = Problem(model, loss_fn, data)
    pruner = ocd(kinds=("unit",), scope="layer")
    sal = pruner.cell_scores(problem)
    mask, info = pruner(problem, sparsity=0.5)
    by_layer = {}
    for _kind, layer, index in info.removed:
        by_layer.setdefault(layer, []).append(index)
    first, second = sal.values[:6], sal.values[6:]
    assert by_layer["0"] == sorted(torch.argsort(first)[:3].tolist())
    assert by_layer["2"] == sorted(torch.argsort(second)[:2].tolist())
    assert "scope='layer'" in repr(pruner)
    with pytest.raises(TargetExceededError, match="target of 2 removed cells.*5 already"):
        pruner(problem, mask, sparsity=0.2)
    with pytest.raises(ValueError, match="scope"):
        ocd(scope="unit")


def test_layer_scope_counts_add_up_to_the_target():
    layers = [nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh()]
    model = _init(nn.Sequential(*layers, nn.Linear(3, 3)).to(F64), 6)
    _, loss_fn, data = mlp("ce")
    problem = Problem(model, loss_fn, data)
    pruner = ocd(kinds=("unit",), scope="layer", steps=None)  # one step: the lowest go
    sal = pruner.cell_scores(problem).values
    mask, info = pruner(problem, sparsity=4)  # three layers of 3 units: 1 + 2 + 1, not 1 + 1 + 1
    assert info.cells_removed == 4 and len(info.removed) == 4
    by_layer = {"0": [], "2": [], "4": []}
    for _kind, layer, index in info.removed:
        by_layer[layer].append(index)
    for i, (layer, want) in enumerate(zip(by_layer, (1, 2, 1))):
        lowest = torch.argsort(sal[3 * i : 3 * i + 3], stable=True)[:want]
        assert by_layer[layer] == sorted(lowest.tolist())
    # a total reachable from an uneven start: layer '0' already lost 2 of its 3 units
    start = Mask.ones(model)
    start = start.with_pruned({"2.weight": torch.tensor([0, 1, 3, 4, 6, 7])})  # columns 0, 1
    attach(model, start)
    mask, info = pruner(Problem(model, loss_fn, data), start, sparsity=5)
    assert info.cells_removed == 5 and all(layer != "0" for _k, layer, _i in info.removed)
