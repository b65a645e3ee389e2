"""FPE and effective parameters (optbrain.generalization) against their definitions.

References are written here from the formulas: NNSYSID's matrices (R = ΨΨᵀ of the per-sample
output derivatives, PI = SSE/(2N), D = Nλ/2) built with torch.func, dense GGNs from per-sample
Jacobians, and closed forms on linear models whose Gauss–Newton matrix is diagonal.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from optbrain.generalization import (
    FPEUndefinedError,
    effective_parameters,
    fpe,
)
from optbrain.masking import Mask, attach
from optbrain.problem import Problem

F64 = torch.float64


def _tanh_net(seed: int = 0, inputs: int = 3, hidden: int = 4, outputs: int = 1) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, outputs)).to(F64)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
    return net


def _data(n: int, inputs: int = 3, outputs: int = 1, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inputs, generator=gen, dtype=F64)
    y = torch.randn(n, outputs, generator=gen, dtype=F64)
    return x, y


def _psi(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """NNSYSID's Ψ: p × N matrix of ∂ŷ_n/∂θ (one output), parameters in named order."""
    params = {k: v.detach() for k, v in net.named_parameters()}

    def out(p, xn):
        return functional_call(net, p, (xn[None],))[0, 0]

    jac = vmap(jacrev(out), in_dims=(None, 0))(params, x)
    return torch.cat([jac[k].reshape(x.shape[0], -1) for k in params], 1).T


def _nnsysid(net, x, y, lam: float, form: str) -> tuple[float, float, float]:
    """(FPE, γ1, γ2) exactly as NNSYSID's obdprune/obsprune compute them."""
    n = x.shape[0]
    with torch.no_grad():
        sse = float((y - net(x)).square().sum())
    pi = sse / (2 * n)
    psi = _psi(net, x)
    r = psi @ psi.T
    d = n * lam / 2  # (SSE + θᵀDθ)/(2N) has the minimiser of E + (λ/2)‖θ‖², E = SSE/N
    h = r + d * torch.eye(r.shape[0], dtype=F64)
    if form == "diagonal":
        g1 = float(((torch.diagonal(r) / torch.diagonal(h)) ** 2).sum())
        return (n + g1) * pi / (n - g1), g1, math.nan
    rh = r @ torch.linalg.inv(h)
    g1, g2 = float(torch.trace(rh @ rh)), float(torch.trace(rh))
    return (n + g1) * pi / (n + g1 - 2 * g2), g1, g2


# ------------------------------------------------------------------------- no weight decay
def test_no_weight_decay_is_akaike_with_alive_parameters():
    net = _tanh_net()
    x, y = _data(40)
    prob = Problem(net, nn.MSELoss(), (x, y))
    e = prob.objective()
    est = fpe(prob)
    assert est.n_params == 21 and est.n_samples == 40 and est.form == "none"
    assert est.train_error == pytest.approx(e, rel=1e-12)
    assert est.fpe == pytest.approx((40 + 21) / (40 - 21) * e, rel=1e-12)
    assert est.n_eff == est.gamma1 == est.gamma2 == 21
    # mask-aware: 5 pruned entries of the first weight leave p = 16
    m = torch.ones(4, 3, dtype=torch.bool)
    m.view(-1)[:5] = False
    attach(net, {"0.weight": m})
    est = fpe(prob)
    assert est.n_params == 16
    assert est.fpe == pytest.approx((40 + 16) / (40 - 16) * prob.objective(), rel=1e-12)
    # only the problem's parameters count
    sub = Problem(net, nn.MSELoss(), (x, y), params=["2.weight", "2.bias"])
    assert fpe(sub).n_params == 5
    assert effective_parameters(sub) == 5


def test_too_few_samples_is_an_error_not_a_negative_fpe():
    net = _tanh_net()
    x, y = _data(21)  # N = p
    with pytest.raises(FPEUndefinedError, match="N = 21 samples <= p = 21"):
        fpe(Problem(net, nn.MSELoss(), (x, y)))
    x, y = _data(10)
    with pytest.raises(FPEUndefinedError):
        fpe(Problem(net, nn.MSELoss(), (x, y)))


def test_with_weight_decay_few_samples_depend_on_the_denominator():
    net = _tanh_net()
    x, y = _data(15)  # N < p = 21: with a strong decay N_eff is small and FPE is defined
    est = fpe(Problem(net, nn.MSELoss(), (x, y)), weight_decay=10.0, form="full")
    assert est.n_eff < 15 and est.fpe > est.train_error > 0
    with pytest.raises(FPEUndefinedError, match="N = 15 samples <= N_eff"):
        fpe(Problem(net, nn.MSELoss(), (x, y)), weight_decay=1e-9)


# ------------------------------------------------------------------------- with weight decay
@pytest.mark.parametrize("form", ["diagonal", "full"])
def test_effective_parameters_fall_as_decay_grows(form):
    net = _tanh_net()
    x, y = _data(60)
    prob = Problem(net, nn.MSELoss(), (x, y))
    values = [effective_parameters(prob, lam, form=form) for lam in (1e-4, 1e-2, 1e-1, 1.0, 10.0)]
    assert all(v < 21 for v in values)
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[0] > 10 and values[-1] < 3
    est = fpe(prob, 0.1, form=form)
    assert est.n_eff == pytest.approx(values[2], rel=1e-12)
    assert est.n_samples + est.n_eff > est.n_samples  # estimate above the training error
    assert est.fpe > est.train_error


@pytest.mark.parametrize("form", ["diagonal", "full"])
def test_matches_nnsysid_convention(form):
    """Our FPE (units of E = SSE/N) is NNSYSID's (units of PI = SSE/(2N)) times 2, γ's equal."""
    net = _tanh_net(3)
    x, y = _data(50, seed=4)
    lam = 0.05
    est = fpe(Problem(net, nn.MSELoss(), (x, y)), lam, form=form)
    ref, g1, g2 = _nnsysid(net, x, y, lam, form)
    assert est.gamma1 == pytest.approx(g1, rel=1e-9)
    if form == "full":
        assert est.gamma2 == pytest.approx(g2, rel=1e-9)
    assert est.fpe == pytest.approx(2 * ref, rel=1e-9)


@pytest.mark.parametrize("form", ["diagonal", "full"])
def test_scale_invariant_in_the_objective(form):
    """Scaling the loss by c (and λ with it: same minimiser) scales FPE by c, not N_eff."""
    net = _tanh_net(5)
    x, y = _data(50)
    mse = nn.MSELoss()

    class Scaled(nn.Module):
        reduction = "mean"

        def forward(self, out, target):
            return 7.0 * mse(out, target)

    a = fpe(Problem(net, mse, (x, y)), 0.03, form=form)
    b = fpe(Problem(net, Scaled(), (x, y)), 0.21, form=form)
    assert b.n_eff == pytest.approx(a.n_eff, rel=1e-9)
    assert b.gamma2 == pytest.approx(a.gamma2, rel=1e-9)
    assert b.fpe == pytest.approx(7.0 * a.fpe, rel=1e-9)


def _orthogonal_linear(n: int = 32):
    """A linear model whose GGN is diagonal: ±1 Hadamard-like input columns orthogonal to each
    other and to the constant (bias) column, with distinct norms."""
    base = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])
    x = base.repeat(n // 4, 1).to(F64) * torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(n, 1, generator=gen, dtype=F64)
    net = nn.Linear(3, 1).to(F64)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[0.3, -0.2, 0.1]]))
        net.bias.fill_(0.05)
    return Problem(net, nn.MSELoss(), (x, y))


def test_full_and_diagonal_agree_where_the_curvature_is_diagonal():
    prob = _orthogonal_linear()
    for lam in (0.01, 0.3, 2.0):
        d = fpe(prob, lam, form="diagonal")
        f = fpe(prob, lam, form="full")
        assert d.gamma1 == pytest.approx(f.gamma1, rel=1e-12)
        assert d.gamma2 == pytest.approx(f.gamma2, rel=1e-12)
        # closed form: h = 2·mean(x_j²) for each weight, 2 for the bias
        h = torch.tensor([0.5, 2.0, 8.0, 2.0], dtype=F64)
        r = h / (h + lam)
        assert d.gamma1 == pytest.approx(float(r.square().sum()), rel=1e-12)
        n, e = 32, d.train_error
        assert d.fpe == pytest.approx((n + d.gamma1) / (n - d.gamma1) * e, rel=1e-12)
        assert f.fpe == pytest.approx((n + f.gamma1) / (n + f.gamma1 - 2 * f.gamma2) * e, rel=1e-12)


def test_per_parameter_decay_and_singular_full_form_is_damped():
    prob = _orthogonal_linear()
    est = fpe(prob, {"weight": 0.5}, form="diagonal")  # bias undecayed: counts fully
    h = torch.tensor([0.5, 2.0, 8.0], dtype=F64)
    assert est.gamma1 == pytest.approx(float((h / (h + 0.5)).square().sum()) + 1.0, rel=1e-12)
    # a dead input (zero column) without decay makes G + Λ singular: damped and reported
    x, y = next(iter(prob.batches()))
    x = x.clone()
    x[:, 0] = 0
    dead = Problem(prob.model, nn.MSELoss(), (x, y))
    full = fpe(dead, {"bias": 0.1}, form="full")
    assert full.damping > 0 and math.isfinite(full.fpe)
    assert fpe(dead, 0.1, form="full").damping == 0.0


def test_interpolating_net_whose_full_form_needs_damping_is_undefined_not_huge():
    """151 parameters, 20 samples, decay on one bias only: G + Λ is singular (damped), and the
    undecayed parameters fit every sample, so γ1 ≈ γ2 ≈ N and N + γ1 − 2γ2 is ~0 only by the grace
    of the damping: FPE is undefined (it used to come out ~2.5e7 with a warning)."""
    net = _tanh_net(inputs=3, hidden=30)
    x, y = _data(20)
    prob = Problem(net, nn.MSELoss(), (x, y))
    with pytest.raises(FPEUndefinedError, match=r"damping .* N \+ γ1 - 2γ2"):
        fpe(prob, {"2.bias": 0.1}, form="full")
    assert math.isfinite(fpe(prob, 10.0, form="full").fpe)  # decay on every parameter: defined


def test_bad_inputs():
    prob = _orthogonal_linear()
    with pytest.raises(ValueError, match="finite number >= 0"):
        fpe(prob, -0.1)
    with pytest.raises(ValueError, match="for 'weight'"):
        fpe(prob, {"weight": -1.0})
    with pytest.raises(TypeError):
        fpe(prob, "0.1")
    with pytest.raises(KeyError, match="unknown parameter"):
        fpe(prob, {"nope": 0.1})
    with pytest.raises(ValueError, match="form must be one of"):
        fpe(prob, 0.1, form="dense")
    m = Mask({"weight": torch.tensor([[True, False, True]])})
    with pytest.raises(ValueError, match="attach it first"):
        fpe(prob, mask=m)
    with torch.no_grad():
        prob.model.weight[0, 1] = 0.0
    assert fpe(prob, mask=m).n_params == 3
