"""Generalisation saliencies (γOBD, γOBS, ESP, EBD, validation OBD) and their presets.

Quadratic problems are linear models under MSE (float64), where E is exactly quadratic with the
GGN as its Hessian, so the change of E when one weight is zeroed is known in closed form and
measured directly by the independent oracle ``reference.objective``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reference
from optbrain.curvature import AutoInverse
from optbrain.generalization import effective_parameters
from optbrain.loop import iterative_prune
from optbrain.masking import Mask
from optbrain.problem import Problem
from optbrain.pruners import (
    GAMMA_STOP,
    PRESETS,
    Pruner,
    all_positive,
    ebd,
    esp,
    gamma_obd,
    gamma_obs,
    validation_obd,
)
from optbrain.saliency import OBD, OBS
from optbrain.saliency.generalization import (
    EBD,
    ESP,
    GammaOBD,
    GammaOBS,
    ValidationOBD,
    neff_drop,
    objective_gradient,
)

F64 = torch.float64


def _linear(n=24, d=4, c=2, correlated=True, seed=0, at_ridge=None):
    """(model, loss, (x, y)): random weights (not at a minimum) or, with ``at_ridge=λ``, the exact
    minimum of E + (λ/2)‖θ‖² (every parameter decayed)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    if correlated:
        x = x @ (torch.eye(d, dtype=F64) + 0.8) + 0.5
    y = torch.randn(n, c, generator=g, dtype=F64)
    model = nn.Linear(d, c).to(F64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(c, d, generator=g, dtype=F64))
        model.bias.copy_(torch.randn(c, generator=g, dtype=F64))
    if at_ridge is not None:
        kappa = 2.0 / (n * c)
        xa = torch.cat([x, torch.ones(n, 1, dtype=F64)], 1)
        reg = at_ridge * torch.eye(d + 1, dtype=F64)
        theta = torch.linalg.solve(kappa * xa.T @ xa + reg, kappa * xa.T @ y)
        with torch.no_grad():
            model.weight.copy_(theta[:d].T)
            model.bias.copy_(theta[d])
    return model, nn.MSELoss(), (x, y)


def _orthogonal(n=16, at_ridge=0.2):
    """A one-output linear model with a diagonal GGN (orthogonal centred inputs) at a ridge
    minimum."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(n, 4, generator=g, dtype=F64)
    z[:, 0] = 1.0
    q, _ = torch.linalg.qr(z)
    x = q[:, 1:] * torch.tensor([0.5, 1.0, 2.0], dtype=F64) * n**0.5
    y = x @ torch.tensor([[0.4], [-0.3], [0.05]], dtype=F64) + 0.3 * torch.randn(
        n, 1, generator=g, dtype=F64
    )
    xa = torch.cat([x, torch.ones(n, 1, dtype=F64)], 1)
    kappa = 2.0 / n
    reg = at_ridge * torch.eye(4, dtype=F64)
    theta = torch.linalg.solve(kappa * xa.T @ xa + reg, kappa * xa.T @ y)
    model = nn.Linear(3, 1).to(F64)
    with torch.no_grad():
        model.weight.copy_(theta[:3].T)
        model.bias.copy_(theta[3])
    return model, nn.MSELoss(), (x, y)


def _tanh_net(seed=0):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(F64)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    x = torch.randn(40, 3, generator=g, dtype=F64)
    y = torch.randn(40, 1, generator=g, dtype=F64)
    return net, nn.MSELoss(), (x, y)


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _e(model, loss, data, params=None) -> float:
    return float(reference.objective(model, loss, [data], params))


def _zeroing_changes(model, loss, data):
    """E(w with entry k zeroed) − E(w) for every entry, as a ParamDict."""
    base = _params(model)
    e0 = _e(model, loss, data, base)
    out = {}
    for name, p in base.items():
        vals = torch.empty(p.numel(), dtype=F64)
        for i in range(p.numel()):
            q = {k: v.clone() for k, v in base.items()}
            q[name].view(-1)[i] = 0.0
            vals[i] = _e(model, loss, data, q) - e0
        out[name] = vals.reshape(p.shape)
    return out


def _close(a, b, rtol=1e-9, atol=1e-12):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].to(F64), b[k].to(F64), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------- γOBD
def test_gamma_obd_without_decay_is_obd_shifted_so_it_ranks_like_obd():
    model, loss, data = _tanh_net()
    prob = Problem(model, loss, data)
    shift = 2 * prob.objective() / prob.n_samples
    g, o = GammaOBD()(prob), OBD()(prob)
    _close(g, {k: v - shift for k, v in o.items()})
    flat = lambda d: torch.cat([v.reshape(-1) for v in d.values()])  # noqa: E731
    assert torch.equal(torch.argsort(flat(g), stable=True), torch.argsort(flat(o), stable=True))


def test_gamma_obd_is_the_training_change_minus_the_fpe_penalty_at_a_ridge_minimum():
    lam = 0.3
    model, loss, data = _linear(at_ridge=lam)
    prob = Problem(model, loss, data)
    s = GammaOBD(lam)(prob)
    h = reference.ggn_diag(model, loss, [data])
    change = _zeroing_changes(model, loss, data)  # exact ΔE_train (E quadratic)
    e, n = prob.objective(), 24
    expected = {k: change[k] - (2 / n) * (h[k] / (h[k] + lam)) ** 2 * e for k in h}
    _close(s, expected, rtol=1e-8)
    # between equal training changes, the weight least held by decay goes first
    assert GammaOBD({"weight": 0.3, "bias": 0.3})(prob).keys() == s.keys()


def test_gamma_obd_prefers_weights_determined_by_the_data():
    """Two weights with the same training saliency: the one with larger h/(h+λ) ranks lower."""
    model, loss, data = _orthogonal()
    prob = Problem(model, loss, data)
    h = reference.ggn_diag(model, loss, [data])
    lam = 0.2
    train = OBD(weight_decay=lam)(prob)
    test = GammaOBD(lam)(prob)
    r = {k: h[k] / (h[k] + lam) for k in h}
    diff = {k: train[k] - test[k] for k in h}  # (2/N) r² E: larger for better-determined weights
    c = 2 * prob.objective() / prob.n_samples
    _close(diff, {k: c * r[k].square() for k in h})
    flat_r = torch.cat([v.reshape(-1) for v in r.values()])
    assert float(flat_r.max() - flat_r.min()) > 0.2  # the weights really differ in r


# ------------------------------------------------------------------------------- γOBS
def _neff(g, lam):
    hinv = torch.linalg.inv(g + lam * torch.eye(g.shape[0], dtype=F64))
    m = g @ hinv
    return float(torch.trace(m @ m))


def test_neff_drop_equals_recomputing_n_eff_without_the_coordinate():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(7, 5, generator=gen, dtype=F64)
    g = a.T @ a / 7
    for lam in (0.0, 0.05, 1.0):
        hinv = torch.linalg.inv(g + lam * torch.eye(5, dtype=F64)) if lam else torch.linalg.inv(g)
        drop = neff_drop(hinv, lam)
        for q in range(5):
            keep = [i for i in range(5) if i != q]
            sub = g[keep][:, keep]
            expected = _neff(g, lam) - _neff(sub, lam) if lam else 1.0
            assert float(drop[q]) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_gamma_obs_equals_gamma_obd_where_the_curvature_is_diagonal():
    model, loss, data = _orthogonal()
    prob = Problem(model, loss, data)
    lam = 0.2
    _close(GammaOBS(lam)(prob), GammaOBD(lam)(prob), rtol=1e-7, atol=1e-10)


def test_gamma_obs_without_decay_is_obs_shifted():
    model, loss, data = _tanh_net(1)
    prob = Problem(model, loss, data)
    shift = 2 * prob.objective() / prob.n_samples
    inv = AutoInverse(alpha=1e-6)
    _close(GammaOBS(inverse=inv)(prob), {k: v - shift for k, v in OBS(inv)(prob).items()}, 1e-9)


def test_gamma_obs_generalisation_term_uses_the_reduced_effective_parameters():
    lam = 0.1
    model, loss, data = _linear(at_ridge=lam, c=1)
    prob = Problem(model, loss, data)
    s = GammaOBS(lam)(prob)
    train = OBS(weight_decay=lam)(prob)
    g = reference.dense_ggn(model, loss, [data])
    e, n = prob.objective(), 24
    flat = torch.cat([(train[k] - s[k]).reshape(-1) for k in s]) * n / (2 * e)
    for q in range(g.shape[0]):
        keep = [i for i in range(g.shape[0]) if i != q]
        expected = _neff(g, lam) - _neff(g[keep][:, keep], lam)
        assert float(flat[q]) == pytest.approx(expected, rel=1e-7)
    assert effective_parameters(prob, lam, form="full") == pytest.approx(_neff(g, lam), rel=1e-9)


# ------------------------------------------------------------------------------- ESP / EBD
@pytest.mark.parametrize("correlated", [False, True])
def test_esp_is_the_exact_change_of_zeroing_one_weight_away_from_the_minimum(correlated):
    model, loss, data = _linear(correlated=correlated)
    prob = Problem(model, loss, data)
    grad = objective_gradient(prob)
    assert max(float(v.abs().max()) for v in grad.values()) > 0.1  # really not at a minimum
    _close(ESP()(prob), _zeroing_changes(model, loss, data), rtol=1e-9, atol=1e-12)


def test_ebd_is_the_change_relative_to_converging_along_the_weight():
    """EBD_k = E(w_k = 0) − min_t E(w + t e_k): on a quadratic the minimum along one coordinate
    is found from three evaluations of E (a parabola)."""
    model, loss, data = _linear()
    prob = Problem(model, loss, data)
    base = _params(model)
    e0 = _e(model, loss, data, base)
    zero = _zeroing_changes(model, loss, data)
    expected = {}
    for name, p in base.items():
        vals = torch.empty(p.numel(), dtype=F64)
        for i in range(p.numel()):
            es = []
            for t in (-1.0, 1.0):
                q = {k: v.clone() for k, v in base.items()}
                q[name].view(-1)[i] += t
                es.append(_e(model, loss, data, q))
            curv = es[1] + es[0] - 2 * e0  # = h
            slope = (es[1] - es[0]) / 2  # = g
            best = e0 - 0.5 * slope**2 / curv
            vals[i] = (e0 + float(zero[name].view(-1)[i])) - best
        expected[name] = vals.reshape(p.shape)
    s = EBD()(prob)
    _close(s, expected, rtol=1e-8, atol=1e-12)
    assert all(bool((v >= -1e-12).all()) for v in s.values())


def test_ebd_zero_curvature_rule():
    """A dead input (zero column) has h = 0 and g = 0: EBD (and ESP) give 0, not NaN."""
    model, loss, (x, y) = _linear()
    x = x.clone()
    x[:, 1] = 0
    prob = Problem(model, loss, (x, y))
    for sal in (EBD(), ESP()):
        s = sal(prob)
        assert torch.isfinite(s["weight"]).all()
        assert torch.equal(s["weight"][:, 1], torch.zeros(2, dtype=F64))


# ------------------------------------------------------------------------------- validation
def test_validation_obd_is_the_exact_change_of_the_validation_error():
    model, loss, train = _linear(seed=0)
    _, _, val = _linear(seed=5)
    prob = Problem(model, loss, train)
    s = ValidationOBD(val)(prob)
    _close(s, _zeroing_changes(model, loss, val), rtol=1e-9, atol=1e-12)
    # the training data do not enter
    other = Problem(model, loss, (train[0][:5], train[1][:5]))
    _close(ValidationOBD(val)(other), s)


def test_validation_obd_needs_a_validation_set():
    with pytest.raises(ValueError, match="needs a validation set"):
        ValidationOBD()
    with pytest.raises(ValueError, match="needs a validation set"):
        validation_obd()


# ------------------------------------------------------------------------------- presets
def test_presets_are_pruners_and_prune():
    model, loss, data = _tanh_net(2)
    _, _, val = _tanh_net(3)
    made = {
        "gamma_obd": gamma_obd(0.01),
        "gamma_obs": gamma_obs(0.01),
        "esp": esp(),
        "ebd": ebd(scope="layer"),
        "validation_obd": validation_obd(val),
    }
    assert set(made) <= set(PRESETS)
    for name, pruner in made.items():
        assert isinstance(pruner, Pruner), name
        net, _, _ = _tanh_net(2)
        mask, info = pruner(Problem(net, loss, data), sparsity=0.25)
        assert info.newly_pruned == 5, name


def test_gamma_stopping_rule_in_the_loop():
    model, loss, data = _orthogonal()
    prob = Problem(model, loss, data)
    mask = Mask.ones(model)
    scores = GammaOBD(0.2)(prob)
    assert not all_positive({k: v - 1e9 for k, v in scores.items()}, mask)
    assert all_positive({k: v.abs() + 1e-9 for k, v in scores.items()}, mask)
    # one weight worth less than its share of the FPE penalty: deleted, then the loop stops
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1.0, 0.01]]))
        model.bias.zero_()
    x, _ = data
    y = x @ torch.tensor([[1.0], [-1.0], [0.0]], dtype=F64) + 0.3 * torch.sin(7 * x[:, :1])
    history = iterative_prune(
        model,
        gamma_obd(0.0),
        lambda r: r / 3,
        rounds=2,
        make_problem=lambda m: Problem(m, loss, (x, y)),
        stop_saliency=GAMMA_STOP,
    )
    assert [r.round for r in history.records] == [0, 1]
    assert history.stopped and "smallest saliency" in history.stopped
    assert model.weight[0, 2] == 0 and bool((model.weight[0, :2] != 0).all())


# ------------------------------------------------------------------------------- float32 nets
def _near_dead_float32():
    """A float32 tanh net whose first hidden unit has four tiny weights of distinct sizes: their
    saliencies (~1e-10) are far below the (2/N)·E ≈ 0.01 that γOBD subtracts."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        net[0].weight[0] = torch.tensor([4e-5, 3e-5, 2e-5, 1e-5])
    x = torch.randn(200, 4, generator=g)
    y = x.sum(1, keepdim=True) + torch.randn(200, 1, generator=g)
    return net, nn.MSELoss(), (x, y)


def _flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


def test_gamma_obd_without_decay_ranks_exactly_like_obd_on_a_float32_net():
    model, loss, data = _near_dead_float32()
    prob = Problem(model, loss, data)
    g, o = GammaOBD()(prob), OBD()(prob)
    assert g["0.weight"][0].argsort().tolist() == [3, 2, 1, 0]  # smallest weight first
    assert torch.equal(torch.argsort(_flat(g), stable=True), torch.argsort(_flat(o), stable=True))
    assert _flat(g).dtype == F64


@pytest.mark.parametrize(
    "saliency",
    [
        lambda data: GammaOBD(0.01),
        lambda data: GammaOBS(0.01),
        lambda data: GammaOBS(),
        lambda data: ESP(),
        lambda data: EBD(),
        lambda data: ValidationOBD(data),
    ],
    ids=["gamma_obd", "gamma_obs", "gamma_obs_no_decay", "esp", "ebd", "validation_obd"],
)
def test_generalisation_saliencies_of_a_float32_net_rank_like_its_float64_copy(saliency):
    """Computed in float64 whatever the parameters' dtype: tiny saliencies are not rounded into
    ties with the constant generalisation term (which would turn the order into index order)."""
    model, loss, data = _near_dead_float32()
    s32 = saliency(data)(Problem(model, loss, data))["0.weight"][0]
    wide = (data[0].to(F64), data[1].to(F64))
    s64 = saliency(wide)(Problem(model.to(F64), loss, wide))["0.weight"][0]
    assert len(set(s32.tolist())) == 4  # no ties
    assert s32.argsort().tolist() == s64.argsort().tolist()
    assert s32.dtype == F64
