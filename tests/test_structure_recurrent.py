"""Hidden units of recurrent layers: cells, physical removal, dead units, OCD saliencies.

Removal is checked against its definition (the masked model with the unit's fan-out zeroed,
float32, eval mode, 1e-6); OCD's unit saliencies against a hand-written LSTM whose unit j's
hidden state is multiplied by a gate γ before it reaches anything (γ = 0 removes the unit)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import reference
from optbrain import structure
from optbrain.cellgraph import CellGraphError, UnitRemovalError
from optbrain.cells import cell_mask, cells
from optbrain.curvature import GGNDiagonal
from optbrain.errors import UnsupportedModuleError
from optbrain.masking import Mask, attach
from optbrain.problem import Problem
from optbrain.pruners.cell_pruner import CellPruner
from optbrain.saliency.ocd import OCD

F32, F64 = torch.float32, torch.float64
MODES = {"rnn_tanh": (nn.RNN, {}), "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}),
         "gru": (nn.GRU, {}), "lstm": (nn.LSTM, {})}  # fmt: skip


class RecNet(nn.Module):
    """A recurrent layer and a Linear read-out of every step, the last step or the final state."""

    def __init__(self, mode="lstm", layers=1, bi=False, batch_first=True, readout="steps"):
        super().__init__()
        cls, kw = MODES[mode]
        self.rnn = cls(3, 6, num_layers=layers, bidirectional=bi, batch_first=batch_first, **kw)
        self.readout = readout
        self.out = nn.Linear(6 * (2 if bi and readout != "final" else 1), 2)

    def forward(self, x):
        o, state = self.rnn(x)
        h = state[0] if isinstance(self.rnn, nn.LSTM) else state  # (fx traces isinstance(module))
        if self.readout == "steps":
            return self.out(o)
        if self.readout == "last":
            return self.out(o[:, -1] if self.rnn.batch_first else o[-1])
        return self.out(h[-1])


def _build(seed=0, dtype=F32, **kw):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RecNet(**kw).to(dtype).eval()


def _seq(model, n=4, t=5, seed=1, dtype=F32):
    g = torch.Generator().manual_seed(seed)
    shape = (n, t, 3) if model.rnn.batch_first else (t, n, 3)
    return torch.randn(shape, generator=g, dtype=dtype)


def _masked(model, chosen):
    masked = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    attach(masked, cell_mask(Mask.ones(model, names), chosen, part="fan_out"))
    return masked


CONFIGS = [
    (mode, layers, bi, bf, readout)
    for mode in MODES
    for layers, bi, bf, readout in [
        (1, False, True, "steps"),
        (2, True, False, "last"),
        (2, False, True, "final"),
    ]
]


@pytest.mark.parametrize(("mode", "layers", "bi", "batch_first", "readout"), CONFIGS)
def test_removing_recurrent_units_equals_the_masked_model(mode, layers, bi, batch_first, readout):
    model = _build(mode=mode, layers=layers, bi=bi, batch_first=batch_first, readout=readout)
    x = _seq(model)
    units = [c for c in cells(model) if c.kind == "unit" and c.layer.startswith("rnn")]
    keys = sorted({c.layer for c in units})
    assert len(keys) == layers * (2 if bi else 1)
    chosen = [c for c in units if c.index in (1, 4)]  # the same count in every layer/direction
    masked = _masked(model, chosen)
    with torch.no_grad():
        res = structure.remove(model, chosen)
        torch.testing.assert_close(res.model(x), masked(x), rtol=0, atol=1e-6)
        assert not torch.allclose(masked(x), model(x), atol=1e-4)
        dead = structure.remove_dead_units(masked)
        torch.testing.assert_close(dead.model(x), masked(x), rtol=0, atol=1e-6)
    assert res.removed == {k: [1, 4] for k in keys} == dead.removed
    rnn = res.model.rnn
    assert rnn.hidden_size == 4 and rnn.weight_hh_l0.shape[1] == 4
    gates = {"lstm": 4, "gru": 3}.get(mode, 1)
    assert rnn.weight_ih_l0.shape == (gates * 4, 3)
    if layers == 2:
        assert rnn.weight_ih_l1.shape == (gates * 4, 4 * (2 if bi else 1))


def _hidden(model, x):
    with torch.no_grad():
        return model.rnn(x)[0]


def test_dead_lstm_unit_with_a_live_state_is_removed_and_others_stay():
    model = _build(mode="lstm")
    x = _seq(model)
    with torch.no_grad():
        model.rnn.weight_hh_l0[:, 2] = 0  # unit 2 feeds no gate of any unit ...
        model.out.weight[:, 2] = 0  # ... and not the read-out: dead, though its state is not 0
        model.out.weight[:, 5] = 0  # unit 5 still feeds the recurrence: alive
        model.rnn.weight_ih_l0[[0, 6, 12, 18]] = 0  # unit 0 hears no input: not constant
        model.rnn.weight_hh_l0[[0, 6, 12, 18]] = 0
        assert _hidden(model, x)[..., 2].abs().mean() > 1e-2
        res = structure.remove_dead_units(model)
        torch.testing.assert_close(res.model(x), model(x), rtol=0, atol=1e-6)
    assert res.removed == {"rnn": [2]} and res.folded == {} and res.unfolded == {}
    assert res.kept["rnn"].tolist() == [0, 1, 3, 4, 5]


def test_multi_layer_removal_keeps_one_hidden_size():
    model = _build(mode="lstm", layers=2)
    x = _seq(model)
    with torch.no_grad():
        for j in (1, 3):  # two dead units in layer 0, one in layer 1
            model.rnn.weight_hh_l0[:, j] = 0
            model.rnn.weight_ih_l1[:, j] = 0
        model.rnn.weight_hh_l1[:, 2] = 0
        model.out.weight[:, 2] = 0
        res = structure.remove_dead_units(model)
        torch.testing.assert_close(res.model(x), model(x), rtol=0, atol=1e-6)
    assert res.removed == {"rnn.l0": [1], "rnn.l1": [2]}
    assert res.kept_dead == {"rnn.l0": [3]} and res.model.rnn.hidden_size == 5
    with pytest.raises(CellGraphError, match=r"hidden_size.*rnn\.l0.*node 'rnn'"):
        structure.remove(model, {"rnn.l0": [1, 3], "rnn.l1": [2]})


class EncoderDecoder(nn.Module):
    """The encoder's final (h, c) starts the decoder: encoder unit j and decoder unit j are one
    group."""

    def __init__(self):
        super().__init__()
        self.enc = nn.LSTM(3, 5, batch_first=True)
        self.dec = nn.LSTM(2, 5, batch_first=True)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        _, state = self.enc(x)
        o, _ = self.dec(x[:, :, :2], state)
        return self.out(o)


def test_initial_state_couples_encoder_and_decoder_units():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = EncoderDecoder().eval()
    x = _seq(_build(), n=3)
    units = [c for c in cells(model) if c.kind == "unit"]
    assert [(c.layer, c.index) for c in units] == [("enc", j) for j in range(5)]
    slabs = {s.name for s in units[0].fan_out}
    assert slabs == {"enc.weight_hh_l0", "dec.weight_hh_l0", "out.weight"}
    with torch.no_grad():
        model.dec.weight_hh_l0[:, 1] = 0
        model.out.weight[:, 1] = 0
        assert structure.remove_dead_units(model).removed == {}  # the encoder still needs it
        model.enc.weight_hh_l0[:, 1] = 0
        res = structure.remove_dead_units(model)
        torch.testing.assert_close(res.model(x), model(x), rtol=0, atol=1e-6)
    assert res.removed == {"enc": [1], "dec": [1]}


def test_units_of_unfollowable_recurrent_layers_are_refused_by_name():
    class Projected(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(3, 6, proj_size=2, batch_first=True)
            self.out = nn.Linear(2, 1)

        def forward(self, x):
            return self.out(self.rnn(x)[0])

    with pytest.raises(UnitRemovalError, match=r"proj_size.*node 'rnn'"):
        structure.remove(Projected(), {"rnn": [0]})
    with pytest.raises(UnitRemovalError, match="model output"):
        structure.remove(nn.Sequential(nn.Linear(3, 3), nn.GRU(3, 4)), {"1": [0]})


# --------------------------------------------------------------------------- OCD
def _gated_lstm(model: RecNet, x: torch.Tensor, j: int, gamma: torch.Tensor) -> torch.Tensor:
    """The LSTM read-out network with unit j's hidden state multiplied by γ before it is used
    (by the recurrence and the read-out): PyTorch's equations, gate order i, f, g, o."""
    rnn = model.rnn
    w_ih, w_hh = rnn.weight_ih_l0, rnn.weight_hh_l0
    b = rnn.bias_ih_l0 + rnn.bias_hh_l0
    n, hsz = x.shape[0], rnn.hidden_size
    scale = torch.ones(hsz, dtype=x.dtype).index_put((torch.tensor([j]),), gamma.reshape(1))
    h = x.new_zeros(n, hsz)
    c = x.new_zeros(n, hsz)
    outs = []
    for t in range(x.shape[1]):
        a = x[:, t] @ w_ih.T + h @ w_hh.T + b
        i, f, g, o = a.chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c) * scale
        outs.append(model.out(h))
    return torch.stack(outs, 1)


def _lstm_problem():
    model = _build(mode="lstm", dtype=F64, seed=5)
    x = _seq(model, n=6, seed=6, dtype=F64)
    y = torch.randn(6, 5, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    return model, nn.MSELoss(), data, x, y


def test_ocd_unit_saliencies_of_an_lstm_match_their_definition():
    model, loss_fn, data, x, y = _lstm_problem()
    problem = Problem(model, loss_fn, data)
    units = [c for c in cells(model) if c.kind == "unit"]
    assert len(units) == 6
    one = torch.ones((), dtype=F64)
    # the gated network is the model at γ = 1 and the masked model at γ = 0
    masked = _masked(model, units[3:4])
    with torch.no_grad():
        torch.testing.assert_close(_gated_lstm(model, x, 3, one), model(x))
        torch.testing.assert_close(_gated_lstm(model, x, 3, 0 * one), masked(x))
    n_out = y[0].numel()

    def objective(j):
        return lambda gam: ((_gated_lstm(model, x, j, gam) - y) ** 2).sum() / (n_out * len(x))

    exact = torch.stack(
        [torch.autograd.functional.hessian(objective(j), one) for j in range(6)]
    ).reshape(-1)
    ggn = []
    for j in range(6):
        _, jac = torch.func.jvp(lambda gam, j=j: _gated_lstm(model, x, j, gam), (one,), (one,))
        ggn.append((2 / n_out) * jac.square().sum() / len(x))
    gate_h = OCD("hessian", kinds=("unit",), method="gate", dtype=F64)(problem)
    gate_g = OCD("ggn", kinds=("unit",), method="gate", dtype=F64)(problem)
    torch.testing.assert_close(gate_h.values, 0.5 * exact, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(gate_g.values, 0.5 * torch.stack(ggn), rtol=1e-8, atol=1e-12)
    # "sum": ½ Σ h_kk w_k² over the weights that multiply h_j (its weight_hh column in every
    # gate, its read-out column), h from a torch.func oracle
    diag = reference.ggn_diag(model, loss_fn, data, use_vmap=False)
    summed = OCD(GGNDiagonal(dtype=F64), kinds=("unit",))(problem)
    by_hand = torch.stack(
        [
            0.5 * (diag["rnn.weight_hh_l0"][:, j] * model.rnn.weight_hh_l0[:, j] ** 2).sum()
            + 0.5 * (diag["out.weight"][:, j] * model.out.weight[:, j] ** 2).sum()
            for j in range(6)
        ]
    )
    torch.testing.assert_close(summed.values, by_hand.detach(), rtol=1e-8, atol=1e-14)


def test_cell_pruner_removes_recurrent_units_in_every_gate():
    model, loss_fn, data, x, _ = _lstm_problem()
    problem = Problem(model, loss_fn, data)
    pruner = CellPruner(OCD(kinds=("unit",), dtype=F64))
    mask, info = pruner(problem, Mask.ones(model, ["rnn.weight_ih_l0", "rnn.weight_hh_l0",
                                                    "out.weight"]), sparsity=2)  # fmt: skip
    gone = [i for _, _, i in info.removed]
    assert len(gone) == 2 and info.cells_total == 6
    rows = [g * 6 + j for g in range(4) for j in gone]
    assert not mask["rnn.weight_ih_l0"][rows].any() and not mask["rnn.weight_hh_l0"][:, gone].any()
    attach(model, mask)
    with torch.no_grad():
        res = structure.remove_dead_units(model)
        torch.testing.assert_close(res.model(x), model(x), rtol=0, atol=1e-12)
    assert res.removed == {"rnn": sorted(gone)}


class _TypeBranch(RecNet):
    """``isinstance`` of a layer's *output* is decided while tracing, not when running: the
    traced graph reads ``c_n`` where the model reads ``h_n``."""

    def forward(self, x):
        _, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state
        return self.out(h[-1])


def test_a_trace_that_differs_from_the_model_is_refused_naming_the_output():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _TypeBranch(layers=2).eval()
    with pytest.raises(UnsupportedModuleError, match="does not compute the model's output"):
        cells(model)


def test_gate_saliency_of_a_float32_lstm_falls_back_to_float64():
    """oneDNN's float32 LSTM kernel has no forward-mode derivative: the Gauss–Newton gate form
    is computed on a float64 copy instead (the same numbers as asking for float64)."""
    model = _build(mode="lstm", seed=2)
    x = _seq(model, n=5)
    problem = Problem(model, nn.MSELoss(), [(x, torch.zeros(5, 5, 2))])
    got = OCD(kinds=("unit",), method="gate")(problem)
    want = OCD(kinds=("unit",), method="gate", dtype=F64)(problem)
    torch.testing.assert_close(got.values, want.values, rtol=1e-12, atol=0)
