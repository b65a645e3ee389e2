"""The helpers the DTU reproductions share: tanh nets, the elimination loop, size grids."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from optbrain.experiments.dtu_common import eliminate, on_grid, restore, spearman, tanh_net
from optbrain.experiments.hassibi_common import all_parameters_mask, fit
from optbrain.generalization import fpe
from optbrain.masking import Mask, attach, current_mask
from optbrain.problem import Problem
from optbrain.pruners import obd, obs


def _linear_data(n=60, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.tensor([[1.5, -1.0, 0.0, 0.0, 0.5]], dtype=torch.float64)
    y = x @ w.T + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return x, y


def test_tanh_net_layout_init_and_rng():
    state = torch.get_rng_state()
    net = tanh_net(12, 8, seed=3, bias=False)
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched
    assert sum(p.numel() for p in net.parameters()) == 12 * 8 + 8 + 1
    assert net[0].bias is None and isinstance(net[1], nn.Tanh) and len(net) == 3
    assert max(float(p.detach().abs().max()) for p in net.parameters()) <= 0.5
    again = tanh_net(12, 8, seed=3, bias=False)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), again.parameters()))
    assert isinstance(tanh_net(2, 2, 0, out_tanh=True)[-1], nn.Tanh)
    assert sum(p.numel() for p in tanh_net(6, 10, 0).parameters()) == 81  # Pedersen et al.
    with pytest.raises(ValueError, match="layer sizes"):
        tanh_net(0, 2, 0)
    with pytest.raises(ValueError, match="init"):
        tanh_net(2, 2, 0, init=0.0)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 100]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 2], [2, 1]))
    with pytest.raises(ValueError, match="lengths"):
        spearman([1, 2, 3], [1, 2])


def _eliminate_linear(pruner, lam=1e-3, per_step=1, min_kept=2, track=False):
    x, y = _linear_data()
    model = nn.Sequential(nn.Linear(5, 1)).to(torch.float64)
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    fit(model, x, y, weight_decay=lam, max_iter=200)
    template = nn.Sequential(nn.Linear(5, 1)).to(torch.float64)
    template.load_state_dict(model.state_dict())
    attach(model, all_parameters_mask(model))

    def evaluate(m):
        with torch.no_grad():
            return {"val_loss": float(nn.functional.mse_loss(m(x), y))}

    el = eliminate(
        model,
        pruner,
        lambda m: Problem(m, nn.MSELoss(), (x, y)),
        retrain=lambda m, step: fit(m, x, y, weight_decay=lam, max_iter=100),
        evaluate=evaluate,
        min_kept=min_kept,
        weight_decay=lam,
        per_step=per_step,
        track_saliency=track,
    )
    return el, model, template, (x, y)


def test_eliminate_records_every_size_and_restores_them():
    lam = 1e-3
    el, model, template, (x, y) = _eliminate_linear(
        obd(weight_decay=lam, steps=None, min_kept=0), lam, track=True
    )
    recs = el.history.records
    assert [r.remaining for r in recs] == [6, 5, 4, 3, 2]  # 5 weights + bias, one per step
    assert [r.round for r in recs] == list(range(5))
    assert len(el.states) == len(recs) and len(el.min_saliency) == len(recs) - 1
    assert all(math.isfinite(v) for v in el.min_saliency)
    # deleted first: the three coordinates that are zero in the true model (weights 2, 3, bias)
    m3 = Mask.from_state_dict(el.states[3]["mask"])
    assert m3["0.weight"][0].tolist() == [True, True, False, False, True]
    assert not bool(m3["0.bias"][0])
    for i, rec in enumerate(recs):
        # FPE with decay recorded for the retrained net of every size
        restored = restore(template, el.states[i])
        est = fpe(Problem(restored, nn.MSELoss(), (x, y)), weight_decay=lam, form="full")
        assert rec.generalization["fpe"] == pytest.approx(est.fpe, rel=1e-9)
        with torch.no_grad():
            again = float(nn.functional.mse_loss(restored(x), y))
        assert rec.metrics["val_loss"] == pytest.approx(again, rel=1e-12)
        assert current_mask(restored).kept() == rec.remaining
    for rec in recs[1:]:  # linear model at its (regularised) minimum: OBD's ΔE is exact
        assert rec.predicted_increase == pytest.approx(rec.actual_increase, rel=1e-4, abs=1e-12)
    assert el.select("fpe") == recs.index(el.history.select("fpe"))
    assert current_mask(model).kept() == 2


def test_eliminate_groups_and_per_step():
    el, *_ = _eliminate_linear(obd(steps=None, min_kept=0), 0.0, per_step=2, min_kept=1)
    assert [r.remaining for r in el.history.records] == [6, 4, 2, 1]
    assert math.isnan(el.min_saliency[0])  # not tracked
    el, *_ = _eliminate_linear(
        obs(weight_decay=1e-3, steps=None, safeguard=False, min_kept=0), 1e-3
    )
    assert [r.remaining for r in el.history.records] == [6, 5, 4, 3, 2]


def test_eliminate_refuses_bad_input():
    x, y = _linear_data()
    model = nn.Sequential(nn.Linear(5, 1)).to(torch.float64)
    kwargs = dict(retrain=None, evaluate=lambda m: {}, min_kept=1)
    make = lambda m: Problem(m, nn.MSELoss(), (x, y))  # noqa: E731
    with pytest.raises(ValueError, match="attach the prunable set"):
        eliminate(model, obd(), make, **kwargs)
    attach(model, all_parameters_mask(model))
    with pytest.raises(ValueError, match="min_kept"):
        eliminate(model, obd(), make, retrain=None, evaluate=lambda m: {}, min_kept=6)
    with pytest.raises(ValueError, match="per_step"):
        eliminate(model, obd(), make, per_step=0, **kwargs)


def test_on_grid_takes_the_first_record_at_or_below_each_size():
    el, *_ = _eliminate_linear(
        obd(steps=None, min_kept=0), 0.0, per_step=2, min_kept=1
    )  # sizes 6, 4, 2, 1
    got = on_grid(el, lambda r: r.remaining, [7, 6, 5, 4, 3, 2, 1, 0])
    assert got[:7] == [6, 6, 4, 4, 2, 2, 1]
    assert math.isnan(got[7])
