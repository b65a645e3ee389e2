"""Recurrent layers (nn.RNN tanh/relu, nn.GRU, nn.LSTM) in the graph engine: the exact GGN and
empirical Fisher through time equal float64 torch.func oracles, LeCun's recursion through time
equals the slow dense-Jacobian transcription of the same recurrence unrolled step by step, every
option (layers, directions, batch_first, initial states) and the bad inputs."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import reference
import reference_graph
from cases import assert_diag_close
from optbrain import Mask, Problem, attach
from optbrain.curvature import (
    EmpiricalFisherDiagonal,
    ExactHessianDiagonal,
    GGNDiagonal,
    LeCunDiagonal,
    MCFisherDiagonal,
)
from optbrain.errors import ShapeMismatchError, UnsupportedModuleError

D = torch.float64
KINDS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN, "relu": nn.RNN}


class SeqModel(nn.Module):
    """A recurrent layer read out by a Linear at every step (``every``) or the last one; with
    ``state`` the initial state is computed from the first input (differentiable)."""

    def __init__(self, kind, layers=1, bidir=False, batch_first=True, every=True, state=False):
        super().__init__()
        kw = {"nonlinearity": "relu"} if kind == "relu" else {}
        dirs = 2 if bidir else 1
        self.r = KINDS[kind](
            3, 4, num_layers=layers, bidirectional=bidir, batch_first=batch_first, **kw
        )
        self.init = nn.Linear(3, 4 * layers * dirs)
        self.out = nn.Linear(4 * dirs, 2)
        self.kind, self.every, self.state = kind, every, state

    def forward(self, x):
        seq = x if self.r.batch_first else x.transpose(0, 1)
        if self.state:
            h0 = torch.tanh(self.init(x[:, 0])).reshape(x.shape[0], -1, 4).transpose(0, 1)
            state = (h0, torch.zeros_like(h0)) if self.kind == "lstm" else h0
            o, _ = self.r(seq, state)
        else:
            o, _ = self.r(seq)
        if not self.r.batch_first:
            o = o.transpose(0, 1)
        return self.out(o).flatten(1) if self.every else self.out(o[:, -1])


class Unrolled(nn.Module):
    """The same recurrence step by step with functional calls on the same parameters (the
    granularity of the rules' docstring: h = (1 − z) ⊙ n + z ⊙ h₋ for the GRU)."""

    def __init__(self, r: nn.RNNBase, steps: int):
        super().__init__()
        self.r, self.steps = r, steps
        self.batch_first = r.batch_first

    def _step(self, kind, xt, h, c, wi, wh, bi, bh):
        if kind == "LSTM":
            i, f, g, o = (F.linear(xt, wi, bi) + F.linear(h, wh, bh)).chunk(4, -1)
            i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
            c = f * c + i * g
            return o * torch.tanh(c), c
        if kind == "GRU":
            xr, xz, xn = F.linear(xt, wi, bi).chunk(3, -1)
            hr, hz, q = F.linear(h, wh, bh).chunk(3, -1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * q)
            return (1 - z) * n + z * h, c
        a = F.linear(xt, wi, bi) + F.linear(h, wh, bh)
        return (torch.tanh(a) if self.r.nonlinearity == "tanh" else torch.relu(a)), c

    def forward(self, x, state=None):
        r, kind = self.r, type(self.r).__name__
        dirs = 2 if r.bidirectional else 1
        seq = x if r.batch_first else x.transpose(0, 1)
        for layer in range(r.num_layers):
            outs = []
            for d in range(dirs):
                sfx, k = f"_l{layer}" + ("_reverse" if d else ""), layer * dirs + d
                w = [getattr(r, n + sfx) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
                if state is None:
                    h = c = seq[:, 0, :1] * 0.0 + torch.zeros(r.hidden_size, dtype=x.dtype)
                elif kind == "LSTM":
                    h, c = state[0][k], state[1][k]
                else:
                    h, c = state[k], None
                steps = [None] * self.steps
                for t in range(self.steps - 1, -1, -1) if d else range(self.steps):
                    h, c = self._step(kind, seq[:, t], h, c, *w)
                    steps[t] = h
                outs.append(torch.stack(steps, 1))
            seq = torch.cat(outs, -1) if dirs == 2 else outs[0]
        return (seq if r.batch_first else seq.transpose(0, 1)), None


def unrolled_twin(model: SeqModel, steps: int) -> SeqModel:
    twin = copy.copy(model)
    twin._modules = dict(model._modules)
    twin.r = Unrolled(model.r, steps)
    return twin


CONFIGS = {
    "lstm": {"kind": "lstm"},
    "gru": {"kind": "gru"},
    "rnn_tanh": {"kind": "rnn"},
    "rnn_relu": {"kind": "relu"},
    "lstm_2layer_bidir": {"kind": "lstm", "layers": 2, "bidir": True},
    "gru_time_major_last": {"kind": "gru", "batch_first": False, "every": False},
    "lstm_state_bidir": {"kind": "lstm", "state": True, "bidir": True},
    "gru_state_2layer": {"kind": "gru", "state": True, "layers": 2},
    "rnn_bidir_last": {"kind": "rnn", "bidir": True, "every": False},
}
STEPS = 5


def make(name, loss="mse_mean", sizes=(4, 3)):
    torch.manual_seed(sum(map(ord, name)))
    model = SeqModel(**CONFIGS[name]).to(D).eval()
    n = sum(sizes)
    x = torch.randn(n, STEPS, 3, dtype=D)
    out = model(x)
    if loss.startswith("ce"):
        y = torch.randint(0, out.shape[1], (n,))
        loss_fn = nn.CrossEntropyLoss(reduction=loss[3:])
    else:
        y = torch.randn(out.shape, dtype=D)
        loss_fn = nn.MSELoss(reduction=loss[4:])
    batches, i = [], 0
    for b in sizes:
        batches.append((x[i : i + b], y[i : i + b]))
        i += b
    return model, loss_fn, batches


@pytest.mark.parametrize("loss", ["mse_mean", "ce_sum"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ggn_and_fisher_through_time_equal_the_oracles(name, loss):
    model, loss_fn, batches = make(name, loss)
    problem = Problem(model, loss_fn, batches)
    assert GGNDiagonal().path(problem).engine == "graph"
    assert_diag_close(
        GGNDiagonal(method="backprop").diagonal(problem),
        reference.ggn_diag(model, loss_fn, batches, use_vmap=False),
    )
    assert_diag_close(
        EmpiricalFisherDiagonal(method="backprop").diagonal(problem),
        reference.empirical_fisher_diag(model, loss_fn, batches, use_vmap=False),
    )


@pytest.mark.parametrize("gauss_newton", [True, False])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_lecun_through_time_equals_the_unrolled_slow_transcription(name, gauss_newton):
    loss = "ce_sum" if len(name) % 2 else "mse_mean"  # both losses over the configurations
    model, loss_fn, batches = make(name, loss, sizes=(2, 1))
    got = LeCunDiagonal(gauss_newton=gauss_newton).diagonal(Problem(model, loss_fn, batches))
    twin = unrolled_twin(model, STEPS)
    slow = reference_graph.lecun_graph_slow(
        torch.fx.symbolic_trace(twin), twin, loss_fn, batches, gauss_newton
    )
    slow = {k.replace("r.r.", "r."): v for k, v in slow.items()}
    assert_diag_close(got, slow)
    if gauss_newton:
        assert all(bool((v >= 0).all()) for v in got.values())


def test_exact_hessian_through_time_equals_the_oracle():
    model, loss_fn, batches = make("gru", "mse_mean")
    assert_diag_close(
        ExactHessianDiagonal().diagonal(Problem(model, loss_fn, batches)),
        reference.hessian_diag(model, loss_fn, batches, use_vmap=False),
    )


def test_monte_carlo_fisher_uses_the_graph_engine_and_is_plausible():
    model, loss_fn, batches = make("lstm", "ce_sum")
    problem = Problem(model, loss_fn, batches)
    est = MCFisherDiagonal(samples=2, seed=0)
    assert est.path(problem).engine == "graph"
    a, b = est.diagonal(problem), MCFisherDiagonal(samples=2, seed=0).diagonal(problem)
    assert_diag_close(a, b)  # seeded
    assert all(bool((v >= 0).all()) for v in a.values())


def test_masks_attached_to_recurrent_weights():
    model, loss_fn, batches = make("lstm", "mse_mean")
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(p.shape, generator=g) > 0.3
             for n, p in model.named_parameters() if n.startswith("r.weight")}  # fmt: skip
    effective = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in effective.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    attach(model, Mask(masks))
    problem = Problem(model, loss_fn, batches)
    ref = reference.ggn_diag(effective, loss_fn, batches, use_vmap=False)
    out = GGNDiagonal(method="backprop").diagonal(problem)
    for k, v in ref.items():
        expected = v * masks[k] if k in masks else v
        torch.testing.assert_close(out[k], expected, rtol=1e-8, atol=1e-12)


# --------------------------------------------------------------------------- bad input
class _Wrap(nn.Module):
    def __init__(self, r, state=None):
        super().__init__()
        self.r, self.state = r, state

    def forward(self, x):
        o, _ = self.r(x) if self.state is None else self.r(x, self.state)
        return o[:, -1]


def _problem(model, x):
    return Problem(model.to(D), nn.MSELoss(), (x, torch.zeros(x.shape[0], 4, dtype=D)))


def test_proj_size_is_refused_by_name():
    model = _Wrap(nn.LSTM(3, 4, proj_size=2, batch_first=True))
    data = (torch.randn(2, 3, 3, dtype=D), torch.zeros(2, 2, dtype=D))
    with pytest.raises(UnsupportedModuleError, match="proj_size"):
        LeCunDiagonal().diagonal(Problem(model.to(D), nn.MSELoss(), data))


def test_a_hidden_state_of_the_wrong_shape_is_named():
    h0 = torch.zeros(1, 2, 5, dtype=D)  # hidden size 5, the layer has 4
    model = _Wrap(nn.GRU(3, 4, batch_first=True), state=h0)
    with pytest.raises((ShapeMismatchError, RuntimeError), match="h0|hidden"):
        LeCunDiagonal().diagonal(_problem(model, torch.randn(2, 3, 3, dtype=D)))


def test_a_sequence_of_length_zero_is_named():
    model = _Wrap(nn.GRU(3, 4, batch_first=True)).to(D)
    x = torch.randn(2, 0, 3, dtype=D)
    with pytest.raises((ShapeMismatchError, RuntimeError, IndexError)):
        LeCunDiagonal().diagonal(_problem(model, x))


class _Packed(nn.Module):
    def __init__(self):
        super().__init__()
        self.r, self.o = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        lengths = torch.full((x.shape[0],), x.shape[1])
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
        return self.o(self.r(packed)[1][-1])


def test_packed_sequences_are_refused_by_every_engine_with_the_reason():
    from optbrain.curvature import EmpiricalFisherDiagonal, GGNDiagonal, LeCunDiagonal, explain

    g = torch.Generator().manual_seed(0)
    problem = Problem(
        _Packed(), nn.CrossEntropyLoss(), (torch.randn(5, 6, 3, generator=g), torch.arange(5) % 2)
    )
    path = explain(problem)["ggn"]
    assert path.engine == "refused" and "pack_padded_sequence" in path.reason
    for est in (GGNDiagonal(), EmpiricalFisherDiagonal(), LeCunDiagonal()):
        with pytest.raises(UnsupportedModuleError, match="packs sequences"):
            est.diagonal(problem)


def test_layerwise_obs_says_which_prunable_weights_its_default_mask_leaves_out(caplog):
    """Layer-wise OBS has layer Hessians for Linear/Conv only: on a recurrent model the LSTM's
    weights are left out, logged and recorded with the reason."""
    from optbrain.pruners import LayerwiseOBS

    class Reader(nn.Module):
        def __init__(self):
            super().__init__()
            self.r, self.o = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, x):
            return self.o(self.r(x)[0][:, -1])

    torch.manual_seed(0)
    model = Reader().double()
    x = torch.randn(6, 5, 3, dtype=torch.float64)
    problem = Problem(model, nn.MSELoss(), [(x, torch.randn(6, 2, dtype=torch.float64))])
    with caplog.at_level(logging.INFO, logger="optbrain.pruners.layerwise"):
        _, info = LayerwiseOBS()(problem, sparsity=0.5)
    assert "r.weight_ih_l0" in caplog.text and "left out" in caplog.text
    assert "default" in info.excluded["r.weight_ih_l0"]
