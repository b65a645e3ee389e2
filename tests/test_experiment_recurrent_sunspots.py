"""The pruned recurrent sunspot net (Pedersen & Hansen 1995): the windowed model, its data, the
impulse response and the lag inputs it reads, and the quick run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optbrain import experiments
from optbrain.experiments import pedersen1995_recurrent_sunspots as rec
from optbrain.experiments.base import Result

pytest.importorskip("matplotlib")
pytest.importorskip("statsmodels")


def test_model_size_rng_and_forward_is_the_recursion():
    state = torch.get_rng_state()
    net = rec.RecurrentSunspotNet(window=6, seed=2)
    assert torch.equal(state, torch.get_rng_state())
    assert sum(p.numel() for p in net.parameters()) == 41 == rec.Config().n_params
    x = torch.randn(3, 6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    h = torch.zeros(3, 4, dtype=torch.float64)
    w, b, u = net.inp.weight, net.inp.bias, net.rec.weight
    for t in range(6):
        h = torch.tanh(x[:, t] @ w.T + b + h @ u.T)
    assert torch.allclose(net(x), h @ net.out.weight.T + net.out.bias, atol=1e-14)
    with pytest.raises(ValueError, match=">= 1"):
        rec.RecurrentSunspotNet(window=0)


def test_windows_hold_the_lagged_series():
    from optbrain.data.sunspots import NNSYSID_SCALE, sunspot_series

    years, act = sunspot_series()
    data = rec.load(window=5)
    x = data.x("train")
    assert x.shape[1:] == (5, 4)
    first = 1700 + 5 + 4 - 1  # the first target with a full window
    assert data.y["train"].shape[0] == 1920 - first + 1
    year = {int(v): float(a) / NNSYSID_SCALE for v, a in zip(years, act)}
    n = 17
    target = first + n
    assert float(data.y["train"][n, 0]) == pytest.approx(year[target])
    for t in range(5):  # step t of the window: τ = T − 4 + t, lags y(τ − 1) … y(τ − 4)
        tau = target - 4 + t
        assert x[n, t].tolist() == pytest.approx([year[tau - j] for j in range(1, 5)])
    test1 = data.x("test1")
    assert test1.shape[0] == 35 and float(data.y["test1"][0, 0]) == pytest.approx(year[1921])
    assert test1[0, -1].tolist() == pytest.approx([year[1920 - j] for j in range(4)])


def test_impulse_response_of_a_feedforward_net_stops_at_lag_4():
    data = rec.load(window=8)
    net = rec.RecurrentSunspotNet(window=8, seed=0)
    with torch.no_grad():
        net.rec.weight.zero_()  # no memory: a tapped-delay net on 4 lags
    resp = rec.impulse_response(net, data)
    assert len(resp) == 8 + 4 - 1
    assert all(v == 0 for v in resp[4:]) and all(v > 0 for v in resp[:4])
    assert rec.memory_length(resp, 0.1) <= 4
    with torch.no_grad():
        net.rec.weight.copy_(0.9 * torch.eye(4, dtype=torch.float64))  # memory
    longer = rec.impulse_response(net, data)
    assert rec.memory_length(longer, 0.1) > 4
    assert rec.memory_length([0.0, 0.0], 0.1) == 0
    assert rec.memory_length([1.0, 0.5, 0.05, 0.2, 0.01], 0.1) == 4


def test_lags_used_follows_live_units():
    net = rec.RecurrentSunspotNet(window=5, seed=0)
    with torch.no_grad():
        net.inp.weight.zero_()
        net.rec.weight.zero_()
        net.out.weight.zero_()
        net.inp.weight[0, 2] = 1.0  # lag 3 into unit 0
        net.inp.weight[1, 0] = 1.0  # lag 1 into unit 1 ...
        net.rec.weight[0, 1] = 1.0  # ... which feeds unit 0
        net.inp.weight[3, 3] = 1.0  # lag 4 into unit 3, which reaches nothing
        net.out.weight[0, 0] = 1.0
    assert rec.lags_used(net) == [1, 3]


def test_curvature_paths_on_the_custom_module():
    """torch.fx traces the windowed loop (the graph engine takes LeCun's recursion); the
    GGN diagonal through the window equals a per-sample Jacobian computation."""
    from optbrain.curvature import GGNDiagonal, explain
    from optbrain.problem import Problem

    data = rec.load(window=6)
    net = rec.RecurrentSunspotNet(window=6, seed=1)
    x, y = data.x("train")[:12], data.y["train"][:12]
    problem = Problem(net, nn.MSELoss(), (x, y))
    paths = explain(problem)
    assert paths["lecun"].engine == "graph"
    diag = GGNDiagonal().diagonal(problem)
    params = dict(net.named_parameters())
    expect = {k: torch.zeros_like(p) for k, p in params.items()}
    for i in range(x.shape[0]):
        out = net(x[i : i + 1])[0, 0]
        grads = torch.autograd.grad(out, list(params.values()))
        for k, g in zip(params, grads):
            expect[k] += 2 * g.square() / x.shape[0]  # MSE: ℓ'' = 2
    for k in params:
        assert torch.allclose(diag[k], expect[k], rtol=1e-10, atol=1e-14), k


def test_quick_run(tmp_path):
    result = experiments.run("pedersen1995-recurrent-sunspots", tmp_path, quick=True)
    assert [c.name.split(" (")[0] for c in result.claims] == [
        "the FPE-selected net discards most lag inputs",
        "it predicts from internal memory with an impulse response of about 12 steps",
    ]
    (row,) = result.tables["selected_by_fpe"]
    assert 4 <= row["parameters"] <= 41 and row["impulse_length"] >= 1
    assert any("torch.fx" in n or "graph" in n for n in result.notes)
    assert Result.load(tmp_path).claims == result.claims
    assert (tmp_path / "figures" / "pruning_and_impulse_response.png").is_file()
