"""Saliencies: OBD (with and without weight decay) against the exact objective change of quadratic
problems, and the baselines (magnitude, random, SNIP) against their definitions.

The quadratic problems are a linear model (``nn.Linear``, no hidden layer) under MSE, placed at the
exact (ridge) least-squares minimum computed in float64. There the objective is exactly quadratic,
E(w* + δ) − E(w*) = gᵀδ + ½ δᵀHδ with constant H (g = 0, or −λw* at a ridge minimum), so:

* deleting ONE weight k (δ = −w_k e_k) raises E by exactly ½ h_kk w_k² (+ λ w_k² with decay),
  whatever the off-diagonal entries of H: OBD's single-weight saliency is exact for any quadratic;
* deleting a SET of weights raises E by the sum of their OBD saliencies only when H is diagonal on
  that set (OBD's "diagonal approximation"); with correlated inputs the cross terms h_jk w_j w_k
  make the actual change differ from the sum, and ½ δᵀHδ (dense H) gives it exactly.

H is diagonal when the input columns are orthogonal to each other and to the constant column (the
bias): E = (1/(N·C)) Σ ‖W x_n + b − y_n‖² has h_{(i,j),(i',j')} = δ_ii' · 2/(N·C) Σ_n x_nj x_nj'.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad

import cases
import reference
from optbrain.curvature import ExactHessianDiagonal, GGNDiagonal
from optbrain.problem import Problem
from optbrain.saliency import OBD, SNIP, Magnitude, Random, Saliency

F64 = torch.float64
N, D, C = 12, 4, 3
SIZES = (5, 7)  # unequal batches: the objective is the per-sample mean whatever the batching
SCALES = (0.5, 1.0, 2.0, 3.5)  # distinct column norms -> distinct h_kk

CURVATURES = {
    "hessian": lambda: ExactHessianDiagonal(dtype=F64),
    "hessian_hvp": lambda: ExactHessianDiagonal(method="hvp", dtype=F64),
    "ggn": lambda: GGNDiagonal(dtype=F64),
    "ggn_func": lambda: GGNDiagonal(method="func", dtype=F64),
}


# --------------------------------------------------------------------------- quadratic problems
def _split(x, y, sizes=SIZES):
    out, i = [], 0
    for b in sizes:
        out.append((x[i : i + b], y[i : i + b]))
        i += b
    return out


def inputs(correlated: bool, seed: int = 0) -> torch.Tensor:
    """N×D inputs: orthogonal, centered columns with norms SCALES·√N, or strongly correlated."""
    g = torch.Generator().manual_seed(seed)
    if correlated:
        z = torch.randn(N, D, generator=g, dtype=F64)
        mix = torch.eye(D, dtype=F64) + 0.9 * torch.ones(D, D, dtype=F64)
        return z @ mix + 0.7  # correlated columns, not centered (bias couples to weights too)
    z = torch.randn(N, D + 1, generator=g, dtype=F64)
    z[:, 0] = 1.0
    q, _ = torch.linalg.qr(z)  # q[:, 0] ∝ 1, so q[:, 1:] is centered and orthonormal
    return q[:, 1:] * torch.tensor(SCALES, dtype=F64) * N**0.5


def quadratic(correlated: bool = False, ridge: float = 0.0, reduction: str = "mean", seed: int = 0):
    """(model, loss_fn, batches) at the exact minimum of E + (ridge/2)‖W‖² (bias not decayed)."""
    g = torch.Generator().manual_seed(100 + seed)
    x = inputs(correlated, seed)
    a = torch.randn(D, C, generator=g, dtype=F64)
    y = x @ a + 0.3 + 0.5 * torch.randn(N, C, generator=g, dtype=F64)  # noise: E(w*) > 0
    # normal equations of E = (κ/2)·Σ‖[X 1][W b]ᵀ − Y‖² + (ridge/2)‖W‖², κ = 2/(N·C) (mean) or 2/N
    kappa = 2.0 / (N * C) if reduction == "mean" else 2.0 / N
    xa = torch.cat([x, torch.ones(N, 1, dtype=F64)], 1)
    reg = torch.diag(torch.tensor([ridge] * D + [0.0], dtype=F64))
    theta = torch.linalg.solve(kappa * xa.T @ xa + reg, kappa * xa.T @ y)  # (D+1) × C
    model = nn.Linear(D, C).to(F64)
    with torch.no_grad():
        model.weight.copy_(theta[:D].T)
        model.bias.copy_(theta[D])
    return model.eval(), nn.MSELoss(reduction=reduction), _split(x, y)


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def objective_at(model, loss_fn, batches, params) -> float:
    """E at ``params`` from the independent float64 oracle (no optbrain code)."""
    return float(reference.objective(model, loss_fn, batches, params))


def zeroed(params, entries):
    """A copy of ``params`` with the (name, flat index) entries set to 0."""
    out = {k: v.clone() for k, v in params.items()}
    for name, idx in entries:
        out[name].view(-1)[idx] = 0.0
    return out


def actual_increase(model, loss_fn, batches, entries) -> float:
    p = params_of(model)
    return objective_at(model, loss_fn, batches, zeroed(p, entries)) - objective_at(
        model, loss_fn, batches, p
    )


def all_entries(model):
    return [(n, i) for n, p in model.named_parameters() for i in range(p.numel())]


def full_gradient(model, loss_fn, batches, ridge: float = 0.0):
    """∇(E + (ridge/2)‖W‖²) with torch.func (checks that the test problem sits at its minimum)."""
    x, y = reference.concat(batches)

    def reg_objective(p):
        out = functional_call(model, p, (x,))
        per = torch.stack([loss_fn(out[n : n + 1], y[n : n + 1]) for n in range(x.shape[0])])
        return per.mean() + 0.5 * ridge * p["weight"].square().sum()

    return grad(reg_objective)(params_of(model))


# --------------------------------------------------------------------------- the test problems
@pytest.mark.parametrize("correlated", [False, True])
@pytest.mark.parametrize("ridge", [0.0, 0.4])
def test_quadratic_problem_is_at_its_exact_minimum(correlated, ridge):
    model, loss_fn, batches = quadratic(correlated, ridge)
    for k, g in full_gradient(model, loss_fn, batches, ridge).items():
        assert float(g.abs().max()) < 1e-12, k
    h = reference.dense_hessian(model, loss_fn, batches)
    off = h - torch.diag(torch.diagonal(h))
    if correlated:
        assert float(off.abs().max()) > 0.1 * float(torch.diagonal(h).max())
    else:
        assert float(off.abs().max()) < 1e-12 * float(torch.diagonal(h).max())


# --------------------------------------------------------------------------- OBD
@pytest.mark.parametrize("curv", list(CURVATURES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("correlated", [False, True])
def test_obd_equals_actual_increase_of_zeroing_one_weight(curv, reduction, correlated):
    """Single deletions on a quadratic at its minimum: ΔE_k = ½ h_kk w_k² exactly (any H)."""
    model, loss_fn, batches = quadratic(correlated, reduction=reduction)
    s = OBD(CURVATURES[curv]())(Problem(model, loss_fn, batches))
    assert list(s) == ["weight", "bias"]
    for name, i in all_entries(model):
        expected = actual_increase(model, loss_fn, batches, [(name, i)])
        assert expected > 1e-6  # every entry matters: the comparison is not 0 == 0
        assert float(s[name].view(-1)[i]) == pytest.approx(expected, rel=1e-9, abs=1e-13)


def test_ggn_and_exact_hessian_agree_for_linear_mse():
    for correlated in (False, True):
        model, loss_fn, batches = quadratic(correlated)
        problem = Problem(model, loss_fn, batches)
        cases.assert_diag_close(
            OBD(GGNDiagonal(dtype=F64))(problem), OBD(ExactHessianDiagonal(dtype=F64))(problem)
        )


@pytest.fixture(scope="module")
def diagonal_case():
    model, loss_fn, batches = quadratic(correlated=False)
    s = OBD(ExactHessianDiagonal(dtype=F64))(Problem(model, loss_fn, batches))
    return model, loss_fn, batches, s


@given(st.sets(st.integers(0, D * C + C - 1), min_size=1))
def test_obd_is_additive_for_any_deleted_set_when_h_is_diagonal(diagonal_case, chosen):
    model, loss_fn, batches, s = diagonal_case
    entries = [all_entries(model)[i] for i in sorted(chosen)]
    predicted = sum(float(s[n].view(-1)[i]) for n, i in entries)
    actual = actual_increase(model, loss_fn, batches, entries)
    assert predicted == pytest.approx(actual, rel=1e-9, abs=1e-12)


def test_obd_deviates_for_sets_when_inputs_are_correlated_and_dense_quadratic_matches():
    """The diagonal approximation: with correlated inputs the sum of saliencies misses the cross
    terms, while ½ δᵀHδ with the dense Hessian is the exact change."""
    model, loss_fn, batches = quadratic(correlated=True)
    s = OBD(ExactHessianDiagonal(dtype=F64))(Problem(model, loss_fn, batches))
    h = reference.dense_hessian(model, loss_fn, batches)
    theta = reference.flatten(params_of(model))
    entries = all_entries(model)  # same order as the flattened parameters
    worst = 0.0
    for a, b in itertools.combinations(range(len(entries)), 2):
        pair = [entries[a], entries[b]]
        actual = actual_increase(model, loss_fn, batches, pair)
        delta = torch.zeros_like(theta)
        delta[[a, b]] = -theta[[a, b]]
        assert float(0.5 * delta @ h @ delta) == pytest.approx(actual, rel=1e-9, abs=1e-12)
        obd_sum = sum(float(s[n].view(-1)[i]) for n, i in pair)
        cross = float(h[a, b] * theta[a] * theta[b])
        assert actual - obd_sum == pytest.approx(cross, rel=1e-7, abs=1e-12)
        worst = max(worst, abs(actual - obd_sum) / actual)
    assert worst > 0.2  # the diagonal approximation really is wrong here


def test_obd_formula_with_a_given_curvature_and_per_layer_decay():
    """s = (½h + λ_name) w² for an arbitrary diagonal estimator, λ per parameter name."""
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1)).to(F64)
    problem = Problem(
        model, nn.MSELoss(), (torch.randn(4, 3, dtype=F64), torch.randn(4, 1, dtype=F64))
    )
    h = {n: torch.rand_like(p) + 0.1 for n, p in model.named_parameters()}

    class Fixed:
        def diagonal(self, problem):
            return {k: v.clone() for k, v in h.items()}

    decay = {"0.weight": 0.3, "2.weight": 0.05}
    s = OBD(Fixed(), weight_decay=decay)(problem)
    for n, p in model.named_parameters():
        expected = (0.5 * h[n] + decay.get(n, 0.0)) * p.detach().square()
        torch.testing.assert_close(s[n], expected, rtol=1e-14, atol=0)
    s_all = OBD(Fixed(), weight_decay=0.2)(problem)
    for n, p in model.named_parameters():
        torch.testing.assert_close(s_all[n], (0.5 * h[n] + 0.2) * p.detach().square())
    assert isinstance(OBD(Fixed()), Saliency)


@pytest.mark.parametrize("bad", [-0.1, {"0.weight": -1.0}])
def test_obd_rejects_negative_weight_decay(bad):
    with pytest.raises(ValueError, match="weight decay"):
        OBD(GGNDiagonal(), weight_decay=bad)


def test_obd_with_restricted_params_matches_the_full_problem():
    model, loss_fn, batches = quadratic(correlated=True)
    full = OBD(ExactHessianDiagonal(dtype=F64))(Problem(model, loss_fn, batches))
    only_w = OBD(ExactHessianDiagonal(dtype=F64))(Problem(model, loss_fn, batches, ["weight"]))
    assert list(only_w) == ["weight"]
    torch.testing.assert_close(only_w["weight"], full["weight"], rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- OBD + weight decay
LAM = 0.4


@pytest.mark.parametrize("curv", ["hessian", "ggn"])
def test_weight_decay_obd_equals_increase_of_unregularised_objective(curv):
    """At the ridge minimum ∂E/∂w = −λw, so zeroing w_k raises E by (λ + ½h_kk) w_k² exactly."""
    model, loss_fn, batches = quadratic(correlated=False, ridge=LAM)
    problem = Problem(model, loss_fn, batches)
    s = OBD(CURVATURES[curv](), weight_decay={"weight": LAM})(problem)
    plain = OBD(CURVATURES[curv]())(problem)
    for name, i in all_entries(model):
        actual = actual_increase(model, loss_fn, batches, [(name, i)])
        assert float(s[name].view(-1)[i]) == pytest.approx(actual, rel=1e-9, abs=1e-13)
        if name == "weight":  # plain OBD misses the first-order term λ w_k² (> 0)
            w = float(model.weight.detach().view(-1)[i])
            assert actual - float(plain[name].view(-1)[i]) == pytest.approx(LAM * w * w, rel=1e-8)
            assert LAM * w * w > 1e-4


def test_weight_decay_of_a_sum_reduced_loss_is_divided_by_the_number_of_samples():
    """Trained full-batch on Σ_n ℓ_n (``reduction="sum"``) with PyTorch's weight_decay=λ, the net
    sits at a minimum of E + (λ/(2N))‖W‖² (E the per-sample mean): OBD's weight_decay is λ/N."""
    lam = 3.0
    model, loss_fn, batches = quadratic(correlated=False, ridge=lam / N, reduction="sum")
    x, y = reference.concat(batches)
    model.zero_grad()
    loss_fn(model(x), y).backward()  # PyTorch's stationarity: ∇Σℓ + λW = 0, ∇_b Σℓ = 0
    torch.testing.assert_close(model.weight.grad, -lam * model.weight.detach(), atol=1e-10, rtol=0)
    torch.testing.assert_close(model.bias.grad, torch.zeros_like(model.bias), atol=1e-10, rtol=0)
    model.zero_grad()
    problem = Problem(model, loss_fn, batches)
    right = OBD(GGNDiagonal(dtype=F64), weight_decay={"weight": lam / N})(problem)
    wrong = OBD(GGNDiagonal(dtype=F64), weight_decay={"weight": lam})(problem)
    for i in range(D * C):
        actual = actual_increase(model, loss_fn, batches, [("weight", i)])
        assert float(right["weight"].view(-1)[i]) == pytest.approx(actual, rel=1e-9, abs=1e-13)
        assert float(wrong["weight"].view(-1)[i]) != pytest.approx(actual, rel=0.1)


@pytest.fixture(scope="module")
def ridge_case():
    model, loss_fn, batches = quadratic(correlated=False, ridge=LAM)
    s = OBD(ExactHessianDiagonal(dtype=F64), weight_decay={"weight": LAM})(
        Problem(model, loss_fn, batches)
    )
    return model, loss_fn, batches, s


@given(st.sets(st.integers(0, D * C - 1), min_size=2))
def test_weight_decay_obd_is_additive_for_sets_when_h_is_diagonal(ridge_case, chosen):
    model, loss_fn, batches, s = ridge_case
    entries = [("weight", i) for i in sorted(chosen)]
    predicted = sum(float(s["weight"].view(-1)[i]) for _, i in entries)
    assert predicted == pytest.approx(
        actual_increase(model, loss_fn, batches, entries), rel=1e-9, abs=1e-12
    )


# --------------------------------------------------------------------------- baselines
def small_problem(loss="mse_mean", sizes=(5, 3), **kw):
    s = cases.setup("mlp_tanh", loss, sizes=sizes)
    return s, Problem(s.model, s.loss_fn, s.batches, **kw)


def test_magnitude_is_half_w_squared():
    s, problem = small_problem()
    out = Magnitude()(problem)
    assert list(out) == [n for n, _ in s.model.named_parameters()]
    for n, p in s.model.named_parameters():
        torch.testing.assert_close(out[n], 0.5 * p.detach() ** 2, rtol=0, atol=0)
    only = Magnitude()(Problem(s.model, s.loss_fn, s.batches, ["2.weight"]))
    assert list(only) == ["2.weight"]


def test_random_is_seeded_reproducible_and_leaves_global_rng_alone():
    s, problem = small_problem()
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a = Random(seed=7)(problem)
    b = Random(seed=7)(problem)
    assert torch.equal(torch.get_rng_state(), state)
    for n, p in s.model.named_parameters():
        assert torch.equal(a[n], b[n])
        assert a[n].shape == p.shape and a[n].dtype == p.dtype
        assert float(a[n].min()) >= 0.0 and float(a[n].max()) < 1.0
    r = Random(seed=7)
    first, second = r(problem), r(problem)
    assert any(not torch.equal(first[n], second[n]) for n in first)  # new draw per round
    again = Random(seed=7)(problem)
    assert all(torch.equal(again[n], first[n]) for n in first)  # ... reproducibly
    other = Random(seed=8)(problem)
    assert any(not torch.equal(other[n], a[n]) for n in a)


def _snip_oracle(model, loss_fn, batches):
    """|w · ∇E| with E the per-sample mean over ``batches`` (reference oracle + torch.func.grad)."""
    params = params_of(model)
    g = grad(lambda p: reference.objective(model, loss_fn, batches, p))(params)
    return {k: (params[k] * g[k]).abs() for k in params}


@pytest.mark.parametrize("loss", ["mse_mean", "mse_sum", "ce_mean", "ce_sum"])
@pytest.mark.parametrize("batches", [1, 2, None])
def test_snip_is_abs_w_times_gradient(loss, batches):
    s, problem = small_problem(loss, sizes=(5, 3, 4))
    used = s.batches if batches is None else s.batches[:batches]
    expected = _snip_oracle(s.model, s.loss_fn, used)
    out = SNIP(batches)(problem)
    cases.assert_diag_close(out, expected, rtol=1e-10)
    if batches == 1:  # really only the first batch: differs from the all-data value
        alldata = _snip_oracle(s.model, s.loss_fn, s.batches)
        assert any(not torch.allclose(out[k], alldata[k]) for k in out)


def test_snip_rejects_bad_batches():
    with pytest.raises(ValueError, match="batches"):
        SNIP(0)


def test_obd_weight_decay_refuses_nan_and_unknown_names():
    from optbrain.saliency import OBD

    with pytest.raises(ValueError, match=">= 0"):
        OBD(weight_decay=float("nan"))
    model = nn.Linear(2, 1)
    problem = Problem(model, nn.MSELoss(), (torch.randn(4, 2), torch.randn(4, 1)))
    with pytest.raises(KeyError, match="typo.weight"):
        OBD(weight_decay={"typo.weight": 0.1})(problem)
