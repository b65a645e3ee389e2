"""Unit removal on graphs: residual groups, concatenations, gates, BatchNorm, depthwise convs,
embeddings, functional layers; coupled groups; what blocks removal, naming the node.

Every equality is the definition of removal: the smaller model computes what the masked model
computes with the removed cells' fan-out weights zeroed (float32, eval mode, 1e-6)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optbrain import structure
from optbrain.cellgraph import CellGraphError, UnitRemovalError, unit_graph
from optbrain.cells import cell_mask, cells
from optbrain.masking import Mask, attach

F32 = torch.float32


class ResMLP(nn.Module):
    """Two residual additions and a concatenation."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.h = nn.Linear(8, 6)
        self.out = nn.Linear(8 + 6, 3)

    def forward(self, x):
        z = torch.tanh(self.inp(x))
        z = z + torch.relu(self.a(z))
        z = z + self.b(z)
        return self.out(torch.cat([z, torch.sigmoid(self.h(z))], -1))


class ConvRes(nn.Module):
    """A residual conv block with BatchNorm, global average pooling, a Linear read-out."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(2, 6, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(6)
        self.c1 = nn.Conv2d(6, 5, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(5)
        self.c2 = nn.Conv2d(5, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        y = F.relu(self.bn0(self.c0(x)))
        y = F.relu(self.bn2(self.c2(F.relu(self.bn1(self.c1(y))))) + y)
        return self.out(F.adaptive_avg_pool2d(y, 1).flatten(1))


class Gated(nn.Module):
    """GLU: unit j of the first half gates unit j of the second (chunk, then multiply)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 10)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        a, b = self.lin(x).chunk(2, -1)
        return self.out(a * torch.sigmoid(b))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(2, 6, 1)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(torch.relu(self.dw(self.pw(x))).mean((2, 3)))


class EmbedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.hid = nn.Linear(6, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, tokens):
        return self.out(torch.tanh(self.hid(self.emb(tokens).mean(1))))


class Functional(nn.Module):
    """Its own weights, applied with F.linear; a per-unit gain and shift read by the forward;
    a scalar gain shared by every unit."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(7, 5) * 0.5)
        self.b = nn.Parameter(torch.randn(7) * 0.1)
        self.gain = nn.Parameter(torch.rand(7) + 0.5)
        self.shift = nn.Parameter(torch.randn(1, 7) * 0.1)
        self.alpha = nn.Parameter(torch.tensor(1.3))
        self.out = nn.Linear(7, 2)

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.w, self.b)) * self.gain + self.shift
        return self.out(self.alpha * h)


class SeqBN(nn.Module):
    """BatchNorm1d on a (batch, channels, length) conv output, then a Linear on flattened maps."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(3, 5, 2)
        self.bn = nn.BatchNorm1d(5)
        self.out = nn.Linear(5 * 3, 2)

    def forward(self, x):
        return self.out(torch.flatten(torch.tanh(self.bn(self.c(x))), 1))


def _build(cls, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls().to(F32)
    g = torch.Generator().manual_seed(seed + 7)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


def _input(shape, n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    if shape == "tokens":
        return torch.randint(0, 10, (n, 4), generator=g)
    return torch.randn(n, *shape, generator=g, dtype=F32)


CASES = {
    # name: (class, input shape, cells to remove as (layer, index), expected removed per layer)
    "residual_concat": (
        ResMLP,
        (5,),
        [("inp", 2), ("inp", 5), ("h", 1)],
        {"inp": [2, 5], "a": [2, 5], "b": [2, 5], "h": [1]},
    ),
    "conv_residual_bn": (ConvRes, (2, 5, 5), [("c0", 1), ("c1", 3)], None),
    "chunk_gate": (Gated, (4,), [("lin", 1), ("lin", 3)], {"lin": [1, 3, 6, 8]}),
    "depthwise": (Depthwise, (2, 4, 4), [("pw", 0), ("pw", 4)], {"pw": [0, 4]}),
    "embedding": (EmbedNet, "tokens", [("emb", 2), ("hid", 1)], {"emb": [2], "hid": [1]}),
    "functional": (Functional, (5,), [("", 0), ("", 4)], {"": [0, 4]}),
    "conv1d_bn_flatten": (SeqBN, (3, 4), [("c", 1), ("c", 4)], {"c": [1, 4]}),
}


def _chosen(model, picks, example):
    found = {(c.layer, c.index): c for c in cells(model, example=example)}
    return [found[p] for p in picks]


def _masked(model, chosen):
    masked = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    attach(masked, cell_mask(Mask.ones(model, names), chosen, part="fan_out"))
    return masked


@pytest.mark.parametrize("name", sorted(CASES))
def test_remove_equals_the_masked_model(name):
    cls, shape, picks, removed = CASES[name]
    model = _build(cls)
    x = _input(shape)
    chosen = _chosen(model, picks, x)
    masked = _masked(model, chosen)
    with torch.no_grad():
        res = structure.remove(model, chosen, example=x)
        torch.testing.assert_close(res.model(x), masked(x), rtol=0, atol=1e-6)
        # the masked outputs differ from the original: the removed cells mattered
        assert not torch.allclose(masked(x), model(x), atol=1e-4)
    if removed is not None:
        assert res.removed == removed
    assert type(res.model) is type(model)
    assert list(res.model.state_dict()) == list(model.state_dict())
    assert res.params_after < res.params_before


@pytest.mark.parametrize("name", sorted(CASES))
def test_remove_dead_units_finds_the_masked_cells(name):
    cls, shape, picks, removed = CASES[name]
    model = _build(cls)
    x = _input(shape)
    masked = _masked(model, _chosen(model, picks, x))
    with torch.no_grad():
        res = structure.remove_dead_units(masked, example=x)
        torch.testing.assert_close(res.model(x), masked(x), rtol=0, atol=1e-6)
    if removed is not None:
        assert res.removed == removed
    assert res.params_after < res.params_before
    attach(res.model, res.mask)  # the sliced mask fits the new model
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), masked(x), rtol=0, atol=1e-6)


def test_residual_group_stays_while_any_member_still_reads_it():
    model = _build(ResMLP)
    x = _input((5,))
    with torch.no_grad():
        for layer in (model.a, model.b, model.h):  # every reader of unit 3 but the read-out
            layer.weight[:, 3] = 0
        kept = structure.remove_dead_units(model)
        assert kept.removed == {} and kept.model.inp.out_features == 8
        model.out.weight[:, 3] = 0  # now nothing reads the group: it goes, from every layer
        res = structure.remove_dead_units(model)
        torch.testing.assert_close(res.model(x), model(x), rtol=0, atol=1e-6)
    assert res.removed == {"inp": [3], "a": [3], "b": [3]}
    assert res.model.a.in_features == res.model.b.out_features == 7


def test_constant_residual_group_is_folded_into_every_reader():
    """Every unit of the group outputs a constant (zero rows): folded into the readers."""
    model = _build(ResMLP)
    x = _input((5,))
    with torch.no_grad():
        for layer in (model.inp, model.a, model.b):
            layer.weight[4] = 0
        res = structure.remove_dead_units(model)
        torch.testing.assert_close(res.model(x), model(x), rtol=0, atol=1e-6)
    assert res.folded == {"inp": [4], "a": [4], "b": [4]}
    with torch.no_grad():  # one member still listens: the group is not constant
        model = _build(ResMLP)
        model.inp.weight[4] = 0
        model.a.weight[4] = 0
        res = structure.remove_dead_units(model)
    assert res.removed == {} and res.unfolded == {}  # live through b: not even a candidate


class WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.hid = nn.Linear(6, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.hid(self.norm(self.lin(x)))))


def test_layernorm_blocks_the_units_it_normalises_naming_the_node():
    model = _build(WithLayerNorm)
    x = _input((4,))
    with torch.no_grad():
        model.lin.weight[2] = 0  # constant, but LayerNorm's mean and variance still see it
        model.hid.weight[:, 3] = 0  # LayerNorm output 3 read by nobody: still normalised
        model.out.weight[:, 1] = 0  # a unit after the norm: removable
        res = structure.remove_dead_units(model)
        torch.testing.assert_close(res.model(x), model(x), rtol=0, atol=1e-6)
    assert res.removed == {"hid": [1]}
    assert {c.layer for c in cells(model) if c.kind != "input"} == {"hid"}
    with pytest.raises(UnitRemovalError, match=r"unit 2 of layer 'lin'.*LayerNorm.*node 'norm'"):
        structure.remove(model, {"lin": [2]})
    with pytest.raises(UnitRemovalError, match="last layer"):
        structure.remove(model, {"out": [0]})


class HardCodedView(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x)).view(-1, 8))


class SizedSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 8)
        self.p = nn.Linear(3, 2)
        self.q = nn.Linear(5, 2)

    def forward(self, x):
        a, b = torch.split(self.lin(x), [3, 5], -1)
        return self.p(a) + self.q(b)


def test_removals_a_node_cannot_follow_raise_naming_it():
    x = _input((3,))
    with pytest.raises(CellGraphError, match=r"view.*node 'view'"):
        structure.remove(_build(HardCodedView), {"lin": [1]})
    with pytest.raises(CellGraphError, match=r"split.*node 'split'"):
        structure.remove(_build(SizedSplit), {"lin": [0]})
    # remove_dead_units leaves such units in place and says why
    model = _build(SizedSplit)
    with torch.no_grad():
        model.p.weight[:, 0] = 0
        res = structure.remove_dead_units(model)
        torch.testing.assert_close(res.model(x), model(x), rtol=0, atol=1e-6)
    assert res.removed == {} and res.kept_dead == {"lin": [0]}


def test_unit_graph_names_what_blocks_each_group():
    ug = unit_graph(_build(WithLayerNorm))
    blocks = {str(g.block) for g in ug.groups.values() if g.block is not None and g.members}
    assert any("LayerNorm" in b and "'norm'" in b for b in blocks)
    assert any("model output" in b for b in blocks)
    # the scalar gain is shared by every unit: blocked, the units stay removable
    fn = unit_graph(_build(Functional))
    assert sum(g.removable for g in fn.groups.values() if g.members) == 7


def test_masked_weights_are_recorded_by_their_stored_tensor():
    """A masked weight read as ``module.weight`` is a fresh tensor on every read, whose id a
    later temporary may take: the unit graph keys it by the stored ``original`` (once, a
    16-unit and a 3-unit layer were united by such a reused id, in the full test suite)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    attach(model, Mask.ones(model))
    ug = unit_graph(model, input_shape=(8,))
    stored = {id(model[i].parametrizations.weight.original) for i in (0, 2)}
    weights = {key[0] for key, rec in ug.rec.axes.items() if rec.attr == "weight"}
    assert weights == stored
