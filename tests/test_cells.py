"""cells(): fan-in/fan-out slabs checked by brute force on the network's own forward pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optbrain.cellgraph import unit_graph
from optbrain.cells import Slab, cell_mask, cell_sums, cells, layer_chain
from optbrain.errors import ShapeMismatchError, UnsupportedModuleError
from optbrain.masking import Mask, attach
from optbrain.models import LeCunTanh
from optbrain.models.digits import digits_cnn, digits_mlp

DT = torch.float64


def _seeded(build, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build().to(DT).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics and affine parameters
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            g = torch.Generator().manual_seed(1)
            m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=DT))
            m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=DT) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g, dtype=DT))
            m.bias.data.copy_(torch.rand(m.num_features, generator=g, dtype=DT) + 0.5)
    return model


MODELS = {
    "mlp_tanh": (lambda: digits_mlp((7, 5), "tanh", n_in=6, n_out=3), (6,)),
    "mlp_sigmoid_nobias": (
        lambda: nn.Sequential(
            nn.Linear(5, 4, bias=False), nn.Sigmoid(), nn.Dropout(0.1), nn.Linear(4, 2)
        ),
        (5,),
    ),
    "nested_bn": (
        lambda: nn.Sequential(
            nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU()),
            nn.Sequential(nn.Sequential(nn.Linear(6, 4), LeCunTanh()), nn.Linear(4, 3)),
        ),
        (5,),
    ),
    "digits_cnn": (digits_cnn, (1, 8, 8)),
    "conv_conv_bn": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 3, 3),
            nn.Tanh(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(3 * 2 * 2, 2),
        ),
        (2, 6, 6),
    ),
    "conv1d": (
        lambda: nn.Sequential(
            nn.Conv1d(3, 4, 3),
            nn.Sigmoid(),
            nn.Flatten(),
            nn.Linear(4 * 5, 4),
            nn.Tanh(),
            nn.Linear(4, 2),
        ),
        (3, 7),
    ),
}


def _cell_site(model: nn.Module, cell):
    """The module whose output holds the cell's activation, channel on dim 1 (before a Flatten)."""
    for layer in layer_chain(model):
        if layer.path == cell.layer:
            site = layer.module
            for _, m in layer.between:
                if isinstance(m, nn.Flatten):
                    break
                site = m
            return site
    raise KeyError(cell.layer)


def _forward_zeroing(model, x, cell):
    """Model output with the cell's activation replaced by zero."""
    if cell.kind == "input":
        x = x.clone()
        x[:, cell.index] = 0
        return model(x)

    def hook(_m, _inp, out):
        out = out.clone()
        out[:, cell.index] = 0
        return out

    handle = _cell_site(model, cell).register_forward_hook(hook)
    try:
        return model(x)
    finally:
        handle.remove()


def _activation(model, x, cell):
    got = {}

    def hook(_m, _inp, out):
        got["a"] = out.detach().clone()

    handle = _cell_site(model, cell).register_forward_hook(hook)
    try:
        model(x)
    finally:
        handle.remove()
    return got["a"]


def _params(model):
    return dict(model.named_parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fan_out_slabs_carry_exactly_the_cells_contribution(name):
    build, shape = MODELS[name]
    model = _seeded(build)
    x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(2), dtype=DT)
    all_cells = cells(model)
    assert {c.kind for c in all_cells} >= {"input"}
    matters = 0
    with torch.no_grad():
        for cell in all_cells:
            expected = _forward_zeroing(model, x, cell)
            params = _params(model)
            saved = {s.name: params[s.name].clone() for s in cell.fan_out}
            for s in cell.fan_out:
                params[s.name][s.index()] = 0
            got = model(x)
            for n, v in saved.items():
                params[n].copy_(v)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
            matters += not torch.allclose(got, model(x))
    # most cells matter on these inputs (a ReLU unit may be off on all of them)
    assert matters >= 0.8 * len(all_cells)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fan_in_slabs_feed_exactly_that_cell(name):
    build, shape = MODELS[name]
    model = _seeded(build)
    x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(3), dtype=DT)
    gen = torch.Generator().manual_seed(4)
    hidden = [c for c in cells(model) if c.kind != "input"]
    assert hidden
    with torch.no_grad():
        for cell in hidden:
            before = _activation(model, x, cell)
            params = _params(model)
            fan_in = {(s.name, s.start) for s in cell.fan_in}
            layer_names = {s.name for s in cell.fan_in}
            saved = {n: params[n].clone() for n in layer_names}
            # perturbing the fan-in changes this cell's activation and no other cell's
            for s in cell.fan_in:
                view = params[s.name][s.index()]
                view += torch.randn(view.shape, generator=gen, dtype=DT)
            after = _activation(model, x, cell)
            diff = (after - before).abs().reshape(after.shape[0], after.shape[1], -1)
            changed = diff.amax(-1).amax(0) > 1e-9
            assert changed.nonzero().flatten().tolist() == [cell.index]
            for n, v in saved.items():
                params[n].copy_(v)
            # perturbing every other entry of the same tensors leaves this cell unchanged
            for n in layer_names:
                for j in range(params[n].shape[0]):
                    if (n, j) not in fan_in:
                        params[n][j] += 1.0
            after = _activation(model, x, cell)
            torch.testing.assert_close(after[:, cell.index], before[:, cell.index])
            for n, v in saved.items():
                params[n].copy_(v)


def test_cell_layout_of_digits_nets():
    mlp = digits_mlp((30, 10))
    got = cells(mlp)
    assert [c.kind for c in got].count("input") == 64
    assert [c.kind for c in got].count("unit") == 40
    assert got[64].fan_in == (Slab("0.weight", 0, 0, 1), Slab("0.bias", 0, 0, 1))
    assert got[64].fan_out == (Slab("2.weight", 1, 0, 1),)
    cnn = cells(digits_cnn(), kinds=("channel",))
    assert len(cnn) == 8 + 16
    assert cnn[-1].fan_out == (Slab("7.weight", 1, 60, 64),)  # 16 channels × 2×2 after Flatten
    assert cells(digits_cnn(), kinds=("unit",)) == []


def test_cells_with_mask_attached_keep_clean_names():
    model = digits_mlp((6,), n_in=4, n_out=2)
    plain = cells(model)
    attach(model, Mask.ones(model).with_pruned({"0.weight": [0, 3]}))
    assert cells(model) == plain


def test_cell_sums_and_cell_mask():
    model = digits_mlp((3,), n_in=4, n_out=2)
    values = {
        n: torch.arange(p.numel(), dtype=DT).reshape(p.shape) for n, p in _params(model).items()
    }
    cs = cells(model)
    w0, w2 = values["0.weight"], values["2.weight"]
    torch.testing.assert_close(cell_sums(values, cs[:4]), w0.sum(0))
    units = cs[4:]
    torch.testing.assert_close(cell_sums(values, units), w2.sum(0))
    torch.testing.assert_close(cell_sums(values, units, "fan_in"), w0.sum(1) + values["0.bias"])
    torch.testing.assert_close(
        cell_sums(values, units, "both"), w2.sum(0) + w0.sum(1) + values["0.bias"]
    )
    # names missing from the values contribute nothing
    torch.testing.assert_close(
        cell_sums({"0.weight": w0}, units, "both"), cell_sums({"0.weight": w0}, units, "fan_in")
    )
    with pytest.raises(ValueError, match="part"):
        cell_sums(values, units, "rows")

    mask = cell_mask(Mask.ones(model, ["0.weight", "2.weight"]), [units[1], cs[0]])
    assert mask.names == ("0.weight", "2.weight")  # bias not in the mask: left alone
    assert not mask["0.weight"][1].any() and not mask["0.weight"][:, 0].any()
    assert not mask["2.weight"][:, 1].any()
    assert mask.pruned() == 4 + 3 + 2 - 1
    everything = Mask.ones(model, ["0.weight", "0.bias", "2.weight", "2.bias"])
    only_out = cell_mask(everything, [units[1]], part="fan_out")
    assert only_out.pruned() == 2 and only_out["0.bias"].all()
    assert cell_mask(everything, [units[1]]).pruned() == 4 + 1 + 2


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)

    def forward(self, x):
        return self.a(x) + self.b(x)


_lin = nn.Linear(3, 3)


def _units(found):
    return [(c.kind, c.layer, c.index) for c in found if c.kind != "input"]


# Models the nn.Sequential walker refused are read as graphs now: what is a cell, and what
# blocks the others (the unit graph names the node).
@pytest.mark.parametrize(
    ("model", "n_inputs", "units", "blocked"),
    [
        (_Branchy(), 3, [], "model output"),  # a and b add: one group, reaching the output
        (
            nn.Sequential(nn.Linear(3, 3), _Branchy(), nn.Linear(3, 2)),
            3,
            [("unit", "0", j) for j in range(3)] + [("unit", "1.a", j) for j in range(3)],
            None,
        ),
        (nn.Sequential(nn.RNN(3, 3)), 3, [], "model output"),
        (
            nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2)),
            0,
            [],
            "grouped convolution (groups=2)",
        ),
        (nn.Sequential(_lin, nn.Tanh(), _lin), 0, [], "model output"),  # a layer called twice
        (nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2)), 3, [], None),
        (nn.Sequential(nn.Conv1d(3, 4, 2), nn.Linear(4, 2)), 3, [], "several units at one"),
        (
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(start_dim=2), nn.Linear(4, 2)),
            1,
            [],
            "several units at one",
        ),
        (nn.Sequential(nn.Linear(3, 4), nn.Softmax(-1), nn.Linear(4, 2)), 3, [], "softmax mixes"),
        (nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)), 3, [], "LayerNorm"),
    ],
)
def test_graph_models_cells_and_what_blocks_the_others(model, n_inputs, units, blocked):
    found = cells(model)
    assert [c.kind for c in found].count("input") == n_inputs
    assert _units(found) == units
    reasons = [str(g.block) for g in unit_graph(model).groups.values() if g.block]
    if blocked is not None:
        assert any(blocked in r for r in reasons), reasons


@pytest.mark.parametrize(
    ("model", "error", "match"),
    [
        (nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 2)), ShapeMismatchError, r"shape \(3,\)"),
        (nn.Sequential(nn.Tanh()), ShapeMismatchError, "input_shape="),
        (nn.Sequential(nn.Flatten(), nn.Conv1d(1, 2, 2)), ShapeMismatchError, "Conv1d"),
    ],
)
def test_inputs_whose_shape_cannot_be_found_raise(model, error, match):
    with pytest.raises(error, match=match):
        cells(model)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else -self.a(x)


def test_untraceable_model_raises_naming_the_cause():
    with pytest.raises(UnsupportedModuleError, match="torch.fx cannot trace"):
        cells(_DataDependent())


def test_layer_chain_refuses_graphs_naming_the_node():
    with pytest.raises(UnsupportedModuleError, match="not a chain of layers.*node"):
        layer_chain(nn.Sequential(nn.Linear(3, 3), _Branchy(), nn.Linear(3, 2)))


def test_anything_may_follow_the_last_layer_and_bad_kinds_raise():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.LogSoftmax(-1))
    assert len(cells(model)) == 3 + 4
    with pytest.raises(ValueError, match="unknown cell kind"):
        cells(model, kinds=("neuron",))
