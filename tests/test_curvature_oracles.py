"""Curvature estimators against the dense float64 oracles of ``tests/reference.py``.

Exact estimators (ExactHessianDiagonal, GGNDiagonal, EmpiricalFisherDiagonal) must agree with the
oracles to 1e-8 relative on every case × loss × reduction; the stochastic ones (Hutchinson, MC
Fisher) must be unbiased and converge within bounds derived from their exact variances.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import cases
import reference
from cases import ALL, LOSSES, assert_diag_close, oracle, setup
from optbrain.curvature import (
    EmpiricalFisherDiagonal,
    ExactHessianDiagonal,
    GGNDiagonal,
    HutchinsonDiagonal,
    LeCunDiagonal,
    MCFisherDiagonal,
)
from optbrain.errors import UnsupportedModuleError

F64 = torch.float64


def _methods(case: str, generic: str) -> list[str]:
    return ["auto", generic] + (["backprop"] if cases.CASES[case].sequential else [])


def _grid(generic: str):
    return [
        pytest.param(c, loss, m, id=f"{c}-{loss}-{m}")
        for c in ALL
        for loss in LOSSES
        for m in _methods(c, generic)
    ]


# --------------------------------------------------------------------------- exact estimators


@pytest.mark.parametrize("case,loss,method", _grid("hvp"))
def test_exact_hessian_diagonal_matches_dense_hessian(case, loss, method):
    s = setup(case, loss)
    got = ExactHessianDiagonal(method=method, dtype=F64).diagonal(s.problem())
    assert_diag_close(got, oracle(case, loss, "hessian"))


@pytest.mark.parametrize("case,loss,method", _grid("func"))
def test_ggn_diagonal_matches_dense_ggn(case, loss, method):
    s = setup(case, loss)
    got = GGNDiagonal(method=method, dtype=F64).diagonal(s.problem())
    assert_diag_close(got, oracle(case, loss, "ggn"))


@pytest.mark.parametrize("case", ALL)
@pytest.mark.parametrize("loss", LOSSES)
def test_empirical_fisher_matches_per_sample_gradients(case, loss):
    s = setup(case, loss)
    got = EmpiricalFisherDiagonal(dtype=F64).diagonal(s.problem())
    assert_diag_close(got, oracle(case, loss, "ef"))


@pytest.mark.parametrize("case", ALL)
@pytest.mark.parametrize("loss", LOSSES)
def test_ggn_diagonal_is_nonnegative(case, loss):
    got = GGNDiagonal(dtype=F64).diagonal(setup(case, loss).problem())
    for k, v in got.items():
        assert (v >= 0).all(), f"{k}: min {float(v.min())}"


@pytest.mark.parametrize("case", ["mlp_relu", "conv_max"])
@pytest.mark.parametrize("loss", LOSSES)
def test_relu_nets_have_hessian_diagonal_equal_to_ggn_diagonal(case, loss):
    # A ReLU/max-pool net is piecewise linear in every single weight, so diag ∂²f/∂θ² = 0 and
    # the Hessian diagonal equals the GGN diagonal exactly.
    p = setup(case, loss).problem
    h = ExactHessianDiagonal(dtype=F64).diagonal(p())
    g = GGNDiagonal(dtype=F64).diagonal(p())
    assert_diag_close(h, g)


# --------------------------------------------------------------------------- reduction and batching

DETERMINISTIC = {
    "hessian": (ExactHessianDiagonal, {}),
    "ggn": (GGNDiagonal, {}),
    "ef": (EmpiricalFisherDiagonal, {}),
    "lecun": (LeCunDiagonal, {"gauss_newton": False}),
    "lecun_gn": (LeCunDiagonal, {"gauss_newton": True}),
}
ALL_ESTIMATORS = {
    **DETERMINISTIC,
    "mc_fisher": (MCFisherDiagonal, {"samples": 2, "seed": 0}),
    "hutchinson": (HutchinsonDiagonal, {"samples": 3, "seed": 0}),
}
STOCHASTIC = ("mc_fisher", "hutchinson")
METHODS = {  # the non-default code paths, for the contract tests
    "hessian_hvp": (ExactHessianDiagonal, {"method": "hvp"}),
    "hessian_backprop": (ExactHessianDiagonal, {"method": "backprop"}),
    "ggn_func": (GGNDiagonal, {"method": "func"}),
    "ggn_backprop": (GGNDiagonal, {"method": "backprop"}),
}


def make(est: str, **kw):
    """A fresh estimator by short name (float64 unless ``dtype`` is given)."""
    cls, args = {**ALL_ESTIMATORS, **METHODS}[est]
    return cls(**{"dtype": F64, **args, **kw})


def _estimators_for(case: str):
    names = list(DETERMINISTIC)
    if not cases.CASES[case].sequential:
        names = [n for n in names if not n.startswith("lecun")]
    return names


def _est_grid(case_list):
    return [pytest.param(c, e, id=f"{c}-{e}") for c in case_list for e in _estimators_for(c)]


@pytest.mark.parametrize("case,est", _est_grid(["mlp_tanh", "conv_avg", "tied"]))
def test_mse_sum_is_output_dim_times_mse_mean(case, est):
    # ℓ_sum = d·ℓ_mean per sample: second-order diagonals scale by d, squared gradients by d².
    d = cases.CASES[case].n_out
    mean = make(est).diagonal(setup(case, "mse_mean").problem())
    total = make(est).diagonal(setup(case, "mse_sum").problem())
    factor = d**2 if est == "ef" else d
    assert_diag_close(total, {k: factor * v for k, v in mean.items()}, rtol=1e-10)


@pytest.mark.parametrize("case,est", _est_grid(["mlp_tanh", "conv_deep", "tied"]))
def test_ce_sum_equals_ce_mean(case, est):
    # per-sample cross-entropy is the same for both reductions (a batch of one)
    a = make(est).diagonal(setup(case, "ce_mean").problem())
    b = make(est).diagonal(setup(case, "ce_sum").problem())
    assert_diag_close(b, a, rtol=1e-10)


@pytest.mark.parametrize("loss", ["mse_mean", "ce_sum"])
@pytest.mark.parametrize("case,est", _est_grid(["mlp_tanh", "conv_avg", "tied"]))
def test_batching_does_not_change_the_result(case, est, loss):
    s = setup(case, loss)
    ref = make(est).diagonal(s.problem())
    ((x, y),) = s.merged()
    variants = {
        "[8]": s.merged(),
        "[3,1,4]": s.rebatched([3, 1, 4]),
        "[1]*8": s.rebatched([1] * 8),
        "(X, Y)": (x, y),
        "DataLoader(3)": DataLoader(TensorDataset(x, y), batch_size=3),
    }
    for name, data in variants.items():
        got = make(est).diagonal(s.problem(data))
        try:
            assert_diag_close(got, ref, rtol=1e-10)
        except AssertionError as exc:
            raise AssertionError(f"batching {name}: {exc}") from None


# --------------------------------------------------------------------------- API contract


def _all_grid(case_list):
    out = []
    for c in case_list:
        for e in [*ALL_ESTIMATORS, *METHODS]:
            if ("lecun" in e or "backprop" in e) and not cases.CASES[c].sequential:
                continue
            out.append(pytest.param(c, e, id=f"{c}-{e}"))
    return out


@pytest.mark.parametrize("case,est", _all_grid(["mlp_tanh", "conv_max", "tied"]))
def test_keys_shapes_and_no_side_effects(case, est):
    s = setup(case, "ce_mean")
    before = {n: p.detach().clone() for n, p in s.model.named_parameters()}
    modes = [m.training for m in s.model.modules()]
    got = make(est).diagonal(s.problem())
    params = dict(s.model.named_parameters())
    assert list(got) == list(params)
    for k, p in params.items():
        assert got[k].shape == p.shape, k
        assert got[k].dtype == F64, k
        assert torch.isfinite(got[k]).all(), k
        assert p.grad is None, f"{k}: the estimator wrote into .grad"
        assert p.requires_grad, k
        assert torch.equal(p.detach(), before[k]), f"{k}: the estimator changed the parameter"
        assert got[k].data_ptr() != p.data_ptr(), f"{k}: result aliases the parameter"
    assert [m.training for m in s.model.modules()] == modes


@pytest.mark.parametrize("case,est", _all_grid(["conv_max"]))
def test_evaluates_in_eval_mode_and_restores_train_mode(case, est):
    # conv_max has a Dropout(0.3): in train mode the model is random; curvature must use eval.
    s = setup(case, "mse_mean")
    s.model.train()
    in_train = make(est).diagonal(s.problem())
    assert all(m.training for m in s.model.modules()), "train mode was not restored"
    s.model.eval()
    in_eval = make(est).diagonal(s.problem())
    assert not any(m.training for m in s.model.modules()), "eval mode was not restored"
    assert_diag_close(in_train, in_eval, rtol=1e-12)
    if est not in STOCHASTIC and "lecun" not in est:
        assert_diag_close(in_train, oracle(case, "mse_mean", est.split("_")[0]))


@pytest.mark.parametrize("est", ["hessian", "ggn", "ef", "lecun", "lecun_gn"])
def test_params_subset_and_frozen_parameters(est):
    s = setup("mlp_tanh", "ce_mean")
    full = make(est).diagonal(s.problem())
    sub = make(est).diagonal(s.problem(params=["2.weight", "0.bias"]))
    assert list(sub) == ["2.weight", "0.bias"]
    assert_diag_close(sub, {k: full[k] for k in sub}, rtol=1e-10)

    s.model[2].bias.requires_grad_(False)
    frozen = make(est).diagonal(s.problem())
    assert list(frozen) == [k for k in full if k != "2.bias"]
    assert_diag_close(frozen, {k: full[k] for k in frozen}, rtol=1e-10)


@pytest.mark.parametrize("est", list(ALL_ESTIMATORS))
def test_float32_model_with_float64_accumulation(est):
    s = setup("mlp_tanh", "ce_mean")
    m32 = copy.deepcopy(s.model).float()
    data32 = [(x.float(), y) for x, y in s.batches]
    got64 = make(est).diagonal(cases.Setup(s.case, m32, s.loss_fn, data32).problem())
    for k, p in m32.named_parameters():
        assert p.dtype == torch.float32, "the model's parameters were converted"
        assert got64[k].dtype == F64, k
    # the same estimate on an exact float64 copy of the float32 model
    m64 = copy.deepcopy(m32).double()
    data64 = [(x.double(), y) for x, y in data32]
    want = make(est).diagonal(cases.Setup(s.case, m64, s.loss_fn, data64).problem())
    assert_diag_close(got64, want, rtol=1e-10)

    got32 = make(est, dtype=None).diagonal(cases.Setup(s.case, m32, s.loss_fn, data32).problem())
    for k in want:
        assert got32[k].dtype == torch.float32, f"{k}: dtype=None must keep the params' dtype"
    if est not in STOCHASTIC:  # random probes may be drawn differently in float32
        assert_diag_close(
            got32, {k: v.float() for k, v in want.items()}, rtol=1e-3, atol_scale=1e-5
        )


@pytest.mark.parametrize("est", list(ALL_ESTIMATORS))
def test_progress_callback(est):
    calls: list[tuple[int, int]] = []
    e = make(est, progress=lambda done, total: calls.append((done, total)))
    e.diagonal(setup("mlp_tanh", "mse_mean").problem())
    assert calls, "progress was never called"
    dones = [d for d, _ in calls]
    assert dones == sorted(dones)
    assert calls[-1][0] == calls[-1][1] > 0


@pytest.mark.parametrize("cls", [ExactHessianDiagonal, GGNDiagonal])
def test_backprop_method_rejects_non_registry_models(cls):
    s = setup("tied", "mse_mean")
    with pytest.raises(UnsupportedModuleError, match="tied|second derivatives"):
        cls(method="backprop", dtype=F64).diagonal(s.problem())


@pytest.mark.parametrize("cls", [ExactHessianDiagonal, GGNDiagonal])
def test_unknown_method_is_a_value_error(cls):
    with pytest.raises(ValueError, match="nope"):
        cls(method="nope", dtype=F64).diagonal(setup("mlp_tanh", "mse_mean").problem())


# --------------------------------------------------------------------------- stochastic estimators
# Bounds are 6 standard deviations of the estimator, computed from the dense oracles. For the
# Hutchinson estimate z_i (Hz)_i the variance is at most Σ_{j≠i} H_ij² + 2 H_ii² (Gaussian probes;
# Rademacher probes give less). For MC Fisher the per-draw value X = ((J_nᵀ s)_i)² with Cov(s) = H_n
# has E X² ≤ 3 m² (m = E X; Gaussian or Rademacher-type s) and, for cross-entropy with a sampled
# label, E X² = Σ_c p_c ((J_nᵀ (e_c − p))_i)⁴; the bound uses the larger of the two.

STOCH_CASES = [("mlp_tanh", "mse_mean"), ("mlp_tanh", "ce_mean"), ("conv_avg", "ce_sum")]


def _hutchinson_sd(case, loss, samples):
    s = setup(case, loss)
    h = reference.dense_hessian(s.model, s.loss_fn, s.batches)
    d = torch.diagonal(h)
    var = (h**2).sum(1) - d**2 + 2 * d**2
    like = reference.params_of(s.model)
    return reference.unflatten((var / samples).sqrt(), like), math.sqrt(
        2 * float((h**2).sum()) / samples
    )


def _mc_fisher_sd(case, loss, samples):
    s = setup(case, loss)
    j = reference.per_sample_jacobians(s.model, s.batches)  # (N, C, P)
    h = reference.per_sample_output_hessians(s.model, s.loss_fn, s.batches)  # (N, C, C)
    m = torch.einsum("nci,ncd,ndi->ni", j, h, j)  # E X per sample and parameter
    ex2 = 3 * m**2
    if loss.startswith("ce"):
        p = torch.softmax(reference.outputs(s.model, s.batches), dim=-1)  # (N, C)
        eye = torch.eye(p.shape[1], dtype=p.dtype)
        grads = torch.einsum("nci,nkc->nki", j, eye[None] - p[:, None, :])  # (N, labels, P)
        ex2 = torch.maximum(ex2, torch.einsum("nk,nki->ni", p, grads**4))
    n = j.shape[0]
    var = ex2.sum(0) / n**2 / samples
    # the total: sd of Σ_i X_i per draw ≤ Σ_i sd(X_i) (Minkowski), a loose but safe bound
    tot = (ex2.sqrt().sum(1) ** 2).sum() / n**2 / samples
    return reference.unflatten(var.sqrt(), reference.params_of(s.model)), math.sqrt(float(tot))


def _check_within(got, target, sd, sd_total, k=6.0):
    scale = max(float(v.abs().max()) for v in target.values())
    for name in target:
        err = (got[name] - target[name]).abs()
        bound = k * sd[name] + 1e-9 * scale
        bad = err > bound
        assert not bad.any(), (
            f"{name}: |est − target| exceeds {k}σ at {int(bad.sum())} entries; worst "
            f"{float((err / bound).max()):.2f}× the bound"
        )
    tot_err = abs(
        sum(float(v.sum()) for v in got.values()) - sum(float(v.sum()) for v in target.values())
    )
    assert tot_err <= k * sd_total + 1e-9 * scale, f"total off by {tot_err} (σ {sd_total})"


@pytest.mark.slow
@pytest.mark.parametrize("case,loss", STOCH_CASES)
def test_hutchinson_converges_to_the_hessian_diagonal(case, loss):
    samples = 16000
    s = setup(case, loss)
    got = HutchinsonDiagonal(samples=samples, seed=1, dtype=F64).diagonal(s.problem())
    sd, sd_tot = _hutchinson_sd(case, loss, samples)
    target = oracle(case, loss, "hessian")
    _check_within(got, target, sd, sd_tot)
    # and it is a real estimate, not the exact answer in disguise: the error is not negligible
    scale = max(float(v.abs().max()) for v in target.values())
    assert max(float((got[k] - target[k]).abs().max()) for k in target) > 1e-8 * scale


@pytest.mark.slow
@pytest.mark.parametrize("case,loss", STOCH_CASES[:2])
def test_hutchinson_is_unbiased_over_seeds(case, loss):
    per_call, seeds = 2, 400
    s = setup(case, loss)
    runs = [
        HutchinsonDiagonal(samples=per_call, seed=k, dtype=F64).diagonal(s.problem())
        for k in range(seeds)
    ]
    mean = {k: torch.stack([r[k] for r in runs]).mean(0) for k in runs[0]}
    sd, sd_tot = _hutchinson_sd(case, loss, per_call * seeds)
    _check_within(mean, oracle(case, loss, "hessian"), sd, sd_tot)


@pytest.mark.slow
@pytest.mark.parametrize("case,loss", STOCH_CASES)
def test_mc_fisher_converges_to_the_ggn_diagonal(case, loss):
    samples = 20000
    s = setup(case, loss)
    got = MCFisherDiagonal(samples=samples, seed=1, dtype=F64).diagonal(s.problem())
    sd, sd_tot = _mc_fisher_sd(case, loss, samples)
    target = oracle(case, loss, "ggn")
    _check_within(got, target, sd, sd_tot)
    for k, v in got.items():
        assert (v >= 0).all(), f"{k}: a mean of squares cannot be negative"


@pytest.mark.slow
@pytest.mark.parametrize("case,loss", STOCH_CASES[:2])
def test_mc_fisher_is_unbiased_over_seeds(case, loss):
    per_call, seeds = 1, 400
    s = setup(case, loss)
    runs = [
        MCFisherDiagonal(samples=per_call, seed=k, dtype=F64).diagonal(s.problem())
        for k in range(seeds)
    ]
    mean = {k: torch.stack([r[k] for r in runs]).mean(0) for k in runs[0]}
    sd, sd_tot = _mc_fisher_sd(case, loss, per_call * seeds)
    _check_within(mean, oracle(case, loss, "ggn"), sd, sd_tot)


@pytest.mark.parametrize("cls", [MCFisherDiagonal, HutchinsonDiagonal])
def test_seeded_estimates_are_reproducible_and_seed_dependent(cls):
    p = setup("mlp_tanh", "ce_mean").problem
    a = cls(samples=3, seed=7, dtype=F64).diagonal(p())
    b = cls(samples=3, seed=7, dtype=F64).diagonal(p())
    c = cls(samples=3, seed=8, dtype=F64).diagonal(p())
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.allclose(a[k], c[k]) for k in a), "the seed has no effect"


@pytest.mark.parametrize("cls", [MCFisherDiagonal, HutchinsonDiagonal])
def test_seeded_estimates_leave_the_global_rng_alone(cls):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    cls(samples=2, seed=0, dtype=F64).diagonal(setup("mlp_tanh", "mse_mean").problem())
    assert torch.equal(torch.rand(3), expected)


def test_oracles_agree_with_each_other_on_a_linear_mse_model():
    # self-check of the reference: for a linear model under MSE the Hessian is the GGN, and the
    # empirical Fisher at a zero-residual target equals 0
    model = nn.Linear(3, 2).double()
    x = torch.randn(6, 3, dtype=F64)
    batches = [(x[:4], torch.randn(4, 2, dtype=F64)), (x[4:], torch.randn(2, 2, dtype=F64))]
    for red in ("mean", "sum"):
        loss = nn.MSELoss(reduction=red)
        h = reference.dense_hessian(model, loss, batches)
        g = reference.dense_ggn(model, loss, batches)
        torch.testing.assert_close(h, g, rtol=1e-12, atol=1e-14)
        exact = [(xb, model(xb).detach()) for xb, _ in batches]
        ef = reference.empirical_fisher_diag(model, loss, exact)
        assert all(float(v.abs().max()) < 1e-20 for v in ef.values())
