"""NARX / output-error / GRU / LSTM models, sequence framing, and OBD through time against
float64 torch.func oracles of the whole simulated trajectory."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, jacrev

from optbrain.curvature import GGNDiagonal
from optbrain.loop import iterative_prune
from optbrain.masking import Mask, attach, current_mask
from optbrain.models.rnn_sysid import RecurrentSequenceModel, gru_model, lstm_model
from optbrain.models.sequences import frame, sequence_problem, simulation_error
from optbrain.models.sysid import NARX, OutputError
from optbrain.paramdict import named_parameters
from optbrain.pruners import presets
from optbrain.schedule import one_shot

D = torch.float64


def signals(t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = 12 + 7 * torch.rand(t, 1, generator=g, dtype=D)
    y = 7 + torch.cumsum(torch.randn(t, 1, generator=g, dtype=D), 0) * 0.1
    return u, y


def oe_model(n_a=2, n_b=3, k=4, delay=1, seed=0) -> OutputError:
    torch.manual_seed(seed)
    m = OutputError(n_a, n_b, k, delay, u_scaling=(15.0, 2.0), y_scaling=(7.0, 1.5)).double()
    with torch.no_grad():  # feedback weights large enough that the loop matters
        m.hidden.weight[:, m.n_u :] *= 3.0
    return m


# --------------------------------------------------------------------------- the oracle
def reference(params: dict, x: torch.Tensor, m: OutputError, feedback_grad: bool = True):
    """The OE recursion written out element by element from the model equation (one sample
    x: T × 2, process units): y(k) = c + v·tanh(W r(k) + b), r(k) = [u(k−τ)…u(k−n_B),
    ŷ(k−1)…ŷ(k−n_A)] in scaled units; ŷ(k) = y(k) for k < start (initial conditions)."""
    w, b = params["hidden.weight"], params["hidden.bias"]
    v, c = params["output.weight"][0], params["output.bias"][0]
    us = (x[:, 0] - 15.0) / 2.0
    ys = list((x[:, 1] - 7.0) / 1.5)
    out = []
    for k in range(m.start, x.shape[0]):
        past = [ys[k - i] for i in range(1, m.n_a + 1)]
        if not feedback_grad:
            past = [p.detach() for p in past]
        r = torch.stack([us[k - j] for j in range(m.delay, m.n_b + 1)] + past)
        yk = c + v @ torch.tanh(w @ r + b)
        ys[k] = yk
        out.append(yk * 1.5 + 7.0)
    return torch.stack(out)


def oracle_ggn(m, xs, feedback_grad=True) -> dict:
    params = {k: p.detach().clone() for k, p in m.named_parameters()}
    acc = {k: torch.zeros_like(p) for k, p in params.items()}
    for x in xs:
        jac = jacrev(lambda p, x=x: reference(p, x, m, feedback_grad))(params)
        for k, j in jac.items():  # j: L' × shape; ∂²ℓ/∂ŷ² = 2/L' (MSE mean)
            acc[k] += 2.0 / j.shape[0] * j.square().sum(0)
    return {k: v / len(xs) for k, v in acc.items()}


# --------------------------------------------------------------------------- forward passes
def test_oe_forward_matches_reference_recursion():
    m = oe_model()
    u, y = signals(40)
    x, _ = frame(u, y, m.start)
    params = {k: p.detach() for k, p in m.named_parameters()}
    assert torch.allclose(m(x)[0, :, 0], reference(params, x[0], m), atol=1e-12)


def test_narx_equals_oe_when_fed_the_models_own_outputs():
    oe = oe_model(n_a=3, n_b=2, k=5)
    narx = NARX(3, 2, 5, u_scaling=(15.0, 2.0), y_scaling=(7.0, 1.5)).double()
    narx.load_state_dict(oe.state_dict())
    u, y = signals(30)
    x = torch.cat([u, y], 1)[None]
    sim = oe(x)
    fed = x.clone()
    fed[0, oe.start :, 1] = sim[0, :, 0]
    assert torch.allclose(narx(fed), sim, atol=1e-12)
    assert torch.allclose(narx.simulate(x), sim, atol=1e-12)
    assert not torch.allclose(narx(x), sim, atol=1e-3)  # one-step ≠ simulation on other data


@pytest.mark.parametrize(
    "n_a, n_b, delay, k", [(1, 1, 1, 3), (2, 3, 1, 4), (3, 2, 2, 5), (2, 2, 0, 2)]
)
def test_parameter_count_and_start(n_a, n_b, delay, k):
    m = OutputError(n_a, n_b, k, delay)
    assert sum(p.numel() for p in m.parameters()) == (n_a + n_b - delay + 3) * k + 1
    assert m.start == max(n_a, n_b)
    u, y = signals(m.start + 5)
    assert m.double()(torch.cat([u, y], 1)[None]).shape == (1, 5, 1)


def test_scaling_buffers_and_fit():
    m = OutputError(2, 2, 3)
    u, y = signals(200)
    m.fit_scaling(u, y)
    assert float(m.u_offset) == pytest.approx(float(u.mean()), rel=1e-6)
    assert float(m.y_scale) == pytest.approx(float(y.std()), rel=1e-6)
    assert {n for n, _ in m.named_parameters()} == {
        "hidden.weight",
        "hidden.bias",
        "output.weight",
        "output.bias",
    }
    with pytest.raises(ValueError, match="standard deviation"):
        m.fit_scaling(torch.ones(10), y[:10])


@pytest.mark.parametrize("make", [gru_model, lstm_model])
def test_gru_lstm_shapes_and_causality(make):
    torch.manual_seed(0)
    m = make(6, warmup=5, delay=2).double()
    u, y = signals(30)
    x = torch.cat([u, y], 1)[None]
    out = m(x)
    assert out.shape == (1, 25, 1) and m.start == 5
    x2 = x.clone()
    x2[0, 20:, 0] += 1.0  # inputs from k = 20 on act on ŷ(k) from k = 22 (delay 2)
    out2 = m(x2)
    assert torch.equal(out[0, : 22 - 5], out2[0, : 22 - 5])
    assert not torch.allclose(out[0, 22 - 5], out2[0, 22 - 5])
    x3 = x.clone()
    x3[..., 1] = 0.0  # the measured output is not read
    assert torch.equal(m(x3), out)


@pytest.mark.parametrize(
    "make", [lambda s: OutputError(2, 2, 3, seed=s), lambda s: gru_model(3, seed=s)]
)
def test_seeded_construction_leaves_the_global_rng_alone(make):
    state = torch.get_rng_state()
    a, b, c = make(5), make(5), make(6)
    assert torch.equal(state, torch.get_rng_state())
    pa, pb, pc = (torch.cat([p.reshape(-1) for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


# --------------------------------------------------------------------------- framing
def test_frame_predicts_every_sample_once():
    u, y = signals(47)
    x, t = frame(u, y, start=3, segment=12)
    assert x.shape == (4, 12, 2) and t.shape == (4, 9, 1)  # offsets 0, 9, 18, 27; 39..46 left out
    assert torch.equal(t.reshape(-1), y[3:39, 0])
    assert torch.equal(x[1, :3, 1], y[9:12, 0])  # next segment's initial conditions
    whole, tw = frame(u, y, start=3)
    assert whole.shape == (1, 47, 2) and torch.equal(tw[0, :, 0], y[3:, 0])


def test_sequence_too_short_and_bad_orders_are_refused():
    u, y = signals(10)
    with pytest.raises(ValueError, match="too short"):
        frame(u, y, start=4, segment=4)
    with pytest.raises(ValueError, match="10 samples"):
        frame(u, y, start=4, segment=20)
    m = OutputError(3, 4, 2).double()
    with pytest.raises(ValueError, match="needs more than 4"):
        m(torch.cat([u, y], 1)[None, :4])
    with pytest.raises(ValueError, match="batch × time × 2"):
        m(torch.cat([u, y], 1))
    for kwargs, what in [
        ({"n_a": 0}, "n_a"),
        ({"n_b": 0}, "n_b"),
        ({"hidden": 0}, "hidden"),
        ({"delay": 5}, "delay"),
        ({"delay": -1}, "delay"),
    ]:
        args = {"n_a": 2, "n_b": 2, "hidden": 3, "delay": 1, **kwargs}
        with pytest.raises(ValueError, match=what):
            OutputError(**args)
    with pytest.raises(ValueError, match="cell"):
        RecurrentSequenceModel("rnn", 3)
    with pytest.raises(ValueError, match="u has 10"):
        frame(u, y[:8], start=1)


def test_simulation_error_on_a_common_window():
    m = oe_model()
    u, y = signals(60)
    full = simulation_error(m, u, y)
    out = m(torch.cat([u, y], 1)[None])[0, :, 0].detach()
    assert full == pytest.approx(float(((out - y[m.start :, 0]) ** 2).mean()), rel=1e-12)
    late = simulation_error(m, u, y, start=10)
    assert late == pytest.approx(float(((out[10 - m.start :] - y[10:, 0]) ** 2).mean()), rel=1e-12)
    with pytest.raises(ValueError, match="start"):
        simulation_error(m, u, y, start=1)


# --------------------------------------------------------------------------- OBD through time
def test_gradient_through_the_feedback_matches_oracle():
    m = oe_model()
    u, y = signals(50, seed=1)
    problem = sequence_problem(m, u, y, segment=20)
    params = dict(m.named_parameters())
    total = sum(problem.batch_objective(m(x), t) for x, t in problem.batches())
    got = torch.autograd.grad(total, list(params.values()))
    xs, ts = problem.data

    def objective(p):
        return sum(((reference(p, x, m) - t[:, 0]) ** 2).mean() for x, t in zip(xs, ts)) / len(xs)

    want = grad(objective)({k: v.detach() for k, v in params.items()})
    for g, k in zip(got, params):
        assert torch.allclose(g, want[k], rtol=1e-10, atol=1e-12), k


def test_ggn_diagonal_through_the_feedback_matches_oracle():
    m = oe_model()
    u, y = signals(50, seed=2)
    problem = sequence_problem(m, u, y, segment=20)
    got = GGNDiagonal().diagonal(problem)
    want = oracle_ggn(m, problem.data[0])
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-9, atol=1e-14), k
    # the dependence through earlier fed-back outputs is a large part of it
    direct = oracle_ggn(m, problem.data[0], feedback_grad=False)
    w = "hidden.weight"
    rel = (direct[w] - want[w]).abs().max() / want[w].max()
    assert rel > 0.1


def test_one_obd_pruning_round_on_a_small_oe_model():
    m = oe_model(n_a=2, n_b=2, k=3)
    u, y = signals(60, seed=3)
    attach(m, Mask.ones(m, names=list(named_parameters(m))))  # biases prunable too
    stored = {k: p.detach().clone() for k, p in named_parameters(m).items()}
    problem = sequence_problem(m, u, y, segment=30)
    h = oracle_ggn(oe_model(n_a=2, n_b=2, k=3), problem.data[0])
    sal = {k: 0.5 * h[k] * stored[k] ** 2 for k in h}
    flat = torch.cat([s.reshape(-1) for s in sal.values()])
    n_del = round(0.3 * flat.numel())
    history = iterative_prune(
        m,
        presets.obd(steps=None, min_kept=0),
        one_shot(0.3),
        rounds=1,
        make_problem=lambda mm: sequence_problem(mm, u, y, segment=30),
    )
    mask = current_mask(m)
    deleted = torch.cat([(~mask[k]).reshape(-1) for k in sal])
    assert int(deleted.sum()) == n_del
    assert flat[deleted].max() <= flat[~deleted].min()
    rec = history.last
    assert rec.predicted_increase == pytest.approx(float(flat[deleted].sum()), rel=1e-8)
    for k in mask:  # the effective weights are zero where deleted
        mod, attr = k.split(".")
        eff = getattr(getattr(m, mod), attr)
        assert torch.equal(eff[~mask[k]], torch.zeros_like(eff[~mask[k]]))
    pruned = {k: torch.where(mask[k], stored[k], 0.0) for k in stored}
    x = problem.data[0]
    assert torch.allclose(m(x)[1, :, 0], reference(pruned, x[1], m), atol=1e-12)
    # after the deletion the GGN of the pruned model is zero on the deleted entries
    g = GGNDiagonal().diagonal(sequence_problem(m, u, y, segment=30))
    assert all(torch.equal(g[k][~mask[k]], torch.zeros_like(g[k][~mask[k]])) for k in g)


@pytest.mark.parametrize("build", ["gru_model", "lstm_model"])
def test_recurrent_sysid_models_take_the_graph_engine(build):
    """Their input check is skipped while torch.fx traces them, so the curvature runs on the
    graph engine's recurrent rules (equal to the torch.func path)."""
    from optbrain import Problem, models
    from optbrain.curvature import GGNDiagonal, explain

    model = getattr(models, build)(4).double()
    x = torch.randn(3, 40, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.randn_like(model(x))
    problem = Problem(model, torch.nn.MSELoss(), (x, y))
    assert explain(problem)["ggn"].engine == "graph"
    fast, slow = GGNDiagonal().diagonal(problem), GGNDiagonal(method="func").diagonal(problem)
    for k in slow:
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="batch × time"):
        model(torch.randn(3, 40, dtype=torch.float64))  # the check still runs outside tracing
