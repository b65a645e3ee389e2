"""Inverse curvature (curvature/outer_product.py) against the float64 oracles of reference.py."""

from __future__ import annotations

import logging

import pytest
import torch

import cases
import reference
from optbrain.curvature import (
    AutoInverse,
    DirectInverse,
    InverseCurvature,
    InverseHessian,
    RecursiveInverse,
)
from optbrain.curvature.inverse import damped_inverse
from optbrain.errors import CurvatureTooLargeError, NonFiniteLossError, SingularCurvatureError
from optbrain.masking import Mask, attach

D = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def ggn_oracle(s: cases.Setup) -> torch.Tensor:
    return reference.dense_ggn(s.model, s.loss_fn, s.batches, use_vmap=s.case.vmap_ok)


def eye(p: int) -> torch.Tensor:
    return torch.eye(p, dtype=D)


@pytest.mark.parametrize(
    "case,loss",
    [("mlp_tanh", "mse_mean"), ("mlp_tanh", "ce_mean"), ("conv_avg", "ce_sum"), ("rnn", "mse_sum")],
)
def test_recursive_equals_inverse_of_ggn_plus_alpha(case, loss):
    s = cases.setup(case, loss)
    g = ggn_oracle(s)
    alpha = 1e-3
    expected = torch.linalg.inv(g + alpha * eye(g.shape[0]))
    for chunk in (1, 7):
        inv = RecursiveInverse(alpha, chunk=chunk).inverse(s.problem())
        assert inv.matrix.dtype == D
        assert rel_err(inv.matrix, expected) < 1e-6
        assert inv.info["method"] == "recursive"
        assert inv.info["rows"] == 8 * (3 if loss.startswith("mse") else 2)  # N·K


def test_recursive_default_alpha_on_a_singular_ggn(caplog):
    """More parameters (83) than rows (8·2): G is singular and (G + 1e-6 I)⁻¹ has entries ~1e6."""
    s = cases.setup("mlp_tanh", "ce_mean")
    g = ggn_oracle(s)
    expected = torch.linalg.inv(g + 1e-6 * eye(g.shape[0]))
    with caplog.at_level(logging.WARNING, logger="optbrain.curvature.inverse"):
        inv = RecursiveInverse().inverse(s.problem())
    assert "rank <= 16 < 83" in caplog.text
    assert float(expected.abs().max()) > 1e5
    assert rel_err(inv.matrix, expected) < 1e-6


def test_direct_ggn_with_a_mask_excludes_pruned_coordinates():
    s = cases.setup("mlp_relu", "mse_mean")
    g = ggn_oracle(s)
    mask = Mask.ones(s.model).with_pruned({"0.weight": [0, 5, 7], "4.weight": [2]})
    keep = torch.cat([mask[n].reshape(-1) if n in mask else torch.ones(p.numel(), dtype=bool)
                      for n, p in s.model.named_parameters()])  # fmt: skip
    sub = g[keep][:, keep]
    inv = DirectInverse(damping=1e-3).inverse(s.problem(), mask)
    assert len(inv) == int(keep.sum()) == g.shape[0] - 4
    assert rel_err(inv.matrix, torch.linalg.inv(sub + 1e-3 * eye(sub.shape[0]))) < 1e-10
    assert inv.info["fallbacks"] == [] and inv.info["damping"] == 1e-3
    with pytest.raises(ValueError, match="pruned"):
        inv.flat_index("0.weight", 5)
    assert inv.diag()["0.weight"].reshape(-1)[5] == torch.inf


def test_mask_attached_to_the_model_is_followed():
    """Parameter order changes when a mask is attached; rows are found by name and index."""
    s = cases.setup("mlp_tanh", "mse_mean")
    mask = Mask.ones(s.model).with_pruned({"2.weight": [1, 2, 3]})
    with torch.no_grad():
        s.model[2].weight.view(-1)[[1, 2, 3]] = 0  # what attach does to the stored values
    g = ggn_oracle(s)
    names = [(n, p.numel()) for n, p in s.model.named_parameters()]
    attach(s.model, mask)
    inv = DirectInverse(damping=1e-2).inverse(s.problem(), mask)
    rows = [inv.flat_index(n, i) for n, k in names for i in range(k) if n != "2.weight" or i > 3
            or i == 0]  # fmt: skip
    keep = torch.tensor([n != "2.weight" or i > 3 or i == 0 for n, k in names for i in range(k)])
    sub = g[keep][:, keep]
    got = inv.matrix[rows][:, rows]
    assert rel_err(got, torch.linalg.inv(sub + 1e-2 * eye(sub.shape[0]))) < 1e-10


def test_exact_hessian_direct_and_indefinite_fallback(caplog):
    s = cases.setup("mlp_tanh", "mse_mean")  # random weights: far from a minimum
    h = reference.dense_hessian(s.model, s.loss_fn, s.batches)
    lam_min = float(torch.linalg.eigvalsh(h)[0])
    assert lam_min < 0  # indefinite
    big = -lam_min + 1.0
    ok = DirectInverse("hessian", damping=big).inverse(s.problem())
    assert ok.info["fallbacks"] == []
    assert rel_err(ok.matrix, torch.linalg.inv(h + big * eye(h.shape[0]))) < 1e-10

    with caplog.at_level(logging.WARNING, logger="optbrain.curvature.inverse"):
        inv = DirectInverse("hessian").inverse(s.problem())
    fb = inv.info["fallbacks"]
    assert fb and fb[-1]["ok"] and not any(f["ok"] for f in fb[:-1])
    assert [f["damping"] for f in fb] == sorted(f["damping"] for f in fb)
    d = inv.info["damping"]
    assert d == fb[-1]["damping"] and d > -lam_min
    assert torch.isfinite(inv.matrix).all()
    assert rel_err(inv.matrix, torch.linalg.inv(h + d * eye(h.shape[0]))) < 1e-8
    assert "not positive definite" in caplog.text


def test_damped_inverse_errors_instead_of_nan():
    bad = torch.tensor([[1e-20, 1e20], [1e20, 1e-20]], dtype=D)  # no damping on the ladder helps
    with pytest.raises(SingularCurvatureError, match="not positive definite"):
        damped_inverse(bad)
    with pytest.raises(NonFiniteLossError):
        damped_inverse(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]], dtype=D))
    inv, d, fb = damped_inverse(torch.zeros(3, 3, dtype=D))  # singular: mean diagonal 0 → scale 1
    assert d == pytest.approx(1e-8) and len(fb) == 1 and torch.allclose(inv, 1e8 * eye(3))


@pytest.mark.parametrize(
    "make",
    [
        lambda: RecursiveInverse(0.0),
        lambda: RecursiveInverse(-1e-6),
        lambda: RecursiveInverse(float("nan")),
        lambda: AutoInverse(0),
        lambda: DirectInverse(damping=-1.0),
        lambda: DirectInverse("fisher"),
        lambda: RecursiveInverse(chunk=0),
    ],
)
def test_bad_options_raise(make):
    with pytest.raises(ValueError):
        make()


def test_too_many_coordinates_is_a_clear_error():
    s = cases.setup("mlp_tanh", "mse_mean")
    with pytest.raises(CurvatureTooLargeError, match="83 alive coordinates"):
        RecursiveInverse(max_params=50).inverse(s.problem())


def test_sequential_eliminate_equals_inverse_of_reduced_matrix():
    s = cases.setup("mlp_sigmoid", "ce_mean")
    g = ggn_oracle(s) + 1e-2 * eye(ggn_oracle(s).shape[0])
    inv = DirectInverse(damping=1e-2).inverse(s.problem())
    p = g.shape[0]
    gone: list[int] = []
    for q in (5, [17, 3, 40], 0, [p - 1, 22]):
        inv.eliminate(q)
        gone += [q] if isinstance(q, int) else q
        keep = torch.ones(p, dtype=bool)
        keep[gone] = False
        expected = torch.linalg.inv(g[keep][:, keep])
        assert rel_err(inv.matrix[keep][:, keep], expected) < 1e-9
        assert (inv.matrix[gone] == 0).all() and (inv.matrix[:, gone] == 0).all()
        assert not inv.alive[gone].any() and int(inv.alive.sum()) == p - len(gone)
    with pytest.raises(ValueError, match="already eliminated"):
        inv.eliminate(5)
    with pytest.raises(ValueError, match="repeat"):
        inv.eliminate([7, 7])
    flat_diag = torch.cat([v.reshape(-1) for v in inv.diag().values()])
    assert torch.isinf(flat_diag[gone]).all() and torch.isfinite(flat_diag[keep]).all()


def test_obs_step_column_and_indices():
    s = cases.setup("mlp_tanh", "mse_mean")
    inv = AutoInverse(1e-3).inverse(s.problem())
    q = inv.flat_index("2.weight", (1, 2))
    assert q == inv.flat_index("2.weight", 1 * 6 + 2) == 24 + 6 + 6 + 2
    col = inv.column("2.weight", (1, 2))
    flat = torch.cat([v.reshape(-1) for v in col.values()])
    torch.testing.assert_close(flat, inv.matrix[:, q])
    weights = {k: p.detach() for k, p in s.model.named_parameters()}
    w = torch.cat([v.reshape(-1) for v in weights.values()])
    loss, dw = inv.obs_step(weights, q)
    assert loss == pytest.approx(float(w[q] ** 2 / (2 * inv.matrix[q, q])), rel=1e-12)
    assert dw["2.weight"][1, 2] == -weights["2.weight"][1, 2]
    expected = -(w[q] / inv.matrix[q, q]) * inv.matrix[:, q]
    expected[q] = -w[q]
    torch.testing.assert_close(torch.cat([v.reshape(-1) for v in dw.values()]), expected)
    with pytest.raises(IndexError):
        inv.flat_index("2.weight", (5, 0))
    with pytest.raises(KeyError):
        inv.flat_index("nope", 0)
    assert isinstance(inv, InverseHessian) and "83 coordinates" in repr(inv)


def test_auto_chooses_the_cheaper_path():
    s = cases.setup("mlp_tanh", "mse_mean")  # 8 samples × 3 columns = 24 rows < 83 / 2
    rec = AutoInverse(1e-3).inverse(s.problem())
    assert rec.info["method"] == "recursive" and rec.info["auto"]["rows"] == 24
    few = Mask.ones(s.model).with_pruned({"0.weight": list(range(20)), "2.weight": list(range(25))})
    direct = AutoInverse(1e-3).inverse(s.problem(), few)  # 38 coordinates: 24 > 19
    assert direct.info["method"] == "direct_ggn"
    other = RecursiveInverse(1e-3).inverse(s.problem(), few)
    assert rel_err(direct.matrix, other.matrix) < 1e-9
    for est in (AutoInverse(), RecursiveInverse(2e-3), DirectInverse(damping=3e-3)):
        assert isinstance(est, InverseCurvature)
    assert [e.regularizer for e in (AutoInverse(), RecursiveInverse(2e-3), DirectInverse())] == [
        1e-6,
        2e-3,
        0.0,
    ]


def test_float32_model_is_inverted_in_float64_and_progress_is_reported():
    s = cases.setup("mlp_tanh", "ce_sum")
    expected = torch.linalg.inv(ggn_oracle(s) + 1e-2 * eye(83))
    model32 = s.model.float()
    batches = [(x.float(), y) for x, y in s.batches]
    calls = []
    inv = RecursiveInverse(1e-2, progress=lambda d, t: calls.append((d, t))).inverse(
        cases.Setup(s.case, model32, s.loss_fn, batches).problem()
    )
    assert inv.matrix.dtype == D
    assert rel_err(inv.matrix, expected) < 1e-4
    assert calls == [(5, 8), (8, 8)]
    assert all(p.dtype == torch.float32 for p in model32.parameters())  # model left alone


def test_coordinates_row_accepts_any_integer_and_checks_mask_shapes():
    import numpy as np

    from optbrain.curvature.inverse import Coordinates
    from optbrain.errors import ShapeMismatchError

    params = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    coords = Coordinates(
        params, Mask({"w": torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool)})
    )
    assert coords.row("w", 2) == coords.row("w", (0, 2)) == 1
    assert coords.row("w", np.int64(2)) == coords.row("w", torch.tensor(2)) == 1
    assert coords.row("w", (np.int64(1), torch.tensor(0))) == 2
    assert coords.row("b", torch.tensor(1)) == 6
    with pytest.raises(TypeError):
        coords.row("w", (0, 1.5))
    with pytest.raises(ValueError, match="pruned"):
        coords.row("w", 1)
    with pytest.raises(ShapeMismatchError, match="w"):
        Coordinates(params, Mask({"w": torch.ones(3, 2, dtype=torch.bool)}))


class QuarticLoss(torch.nn.Module):
    """mean((f − y)² − 0.3 (f − y)⁴): its Hessian 2 − 3.6 r² is negative for |r| > 0.75."""

    reduction = "mean"

    def forward(self, out, y):
        r = out - y
        return (r.square() - 0.3 * r.pow(4)).mean()


def test_indefinite_loss_hessian_direct_and_recursive_agree_on_its_positive_part(caplog):
    """Both estimators use G₊ = (1/N) Σ Jᵀ Λ₊ J, Λ₊ the non-negative part of the loss Hessian."""
    g = torch.Generator().manual_seed(4)
    model = torch.nn.Linear(3, 2).to(D)
    x = torch.randn(12, 3, generator=g, dtype=D)
    y = 1.5 * torch.randn(12, 2, generator=g, dtype=D)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    from optbrain.problem import Problem

    problem = Problem(model, QuarticLoss(), batches)
    j = reference.per_sample_jacobians(model, batches)
    h = reference.per_sample_output_hessians(model, QuarticLoss(), batches)
    lam, u = torch.linalg.eigh(h)
    assert (lam < 0).any() and (lam > 0).any()
    h_pos = u @ torch.diag_embed(lam.clamp(min=0)) @ u.transpose(1, 2)
    g_pos = torch.einsum("nci,ncd,ndj->ij", j, h_pos, j) / j.shape[0]
    alpha = 1e-3
    expected = torch.linalg.inv(g_pos + alpha * eye(g_pos.shape[0]))
    with caplog.at_level(logging.WARNING, logger="optbrain.curvature.inverse"):
        direct = DirectInverse("ggn", damping=alpha).inverse(problem)
        recursive = RecursiveInverse(alpha).inverse(problem)
    dropped = int((lam < 0).sum())
    for inv in (direct, recursive):
        assert rel_err(inv.matrix, expected) < 1e-10
        assert inv.info["negative_rows_dropped"] == dropped
    assert direct.info["fallbacks"] == []
    assert "indefinite" in caplog.text
    mat, _ = DirectInverse("ggn").matrix(problem)
    assert rel_err(mat, g_pos) < 1e-12
