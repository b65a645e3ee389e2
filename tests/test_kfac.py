"""K-FAC inverse curvature: the Kronecker factors against a per-sample transcription, exactness
on a one-layer model under MSE, and the bulk step's group update."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optbrain.curvature import DirectInverse, KFACInverse
from optbrain.curvature.inverse import Coordinates
from optbrain.curvature.losses import hessian_factor
from optbrain.pruners import OBSPruner
from test_blocks import ALPHA, _problem, convnet, mlp, one_layer

F64 = torch.float64


def _slow_factors(p, layer: nn.Module, conv: bool):
    """A and B of ``layer`` from per-sample forward/backward passes (the module doc's sums)."""
    model = p.model
    A = B = 0
    n = 0
    for x, y in p.batches():
        for xi, yi in zip(x, y):
            seen = {}

            def hook(m, args, out, seen=seen):
                seen["in"], seen["out"] = args[0], out

            h = layer.register_forward_hook(hook)
            out = model(xi[None])
            h.remove()
            cols, _ = hessian_factor(p, out.detach(), yi[None])
            a = seen["in"].detach()
            if conv:
                a = F.unfold(a, layer.kernel_size, padding=layer.padding)[0].T  # T × L
            a = torch.cat(
                [a.reshape(-1, a.shape[-1]), torch.ones(a.shape[0] if conv else 1, 1, dtype=F64)], 1
            )
            A = A + a.T @ a
            T = a.shape[0]
            for c in cols:
                (g,) = torch.autograd.grad(out, seen["out"], c, retain_graph=True)
                g = g[0].reshape(g.shape[1], -1).T if conv else g.reshape(1, -1)
                B = B + g.T @ g / T
            n += 1
    return A / n, B / n


@pytest.mark.parametrize(
    ("model", "loss", "shape"), [(mlp, "ce", (5,)), (convnet, "mse", (2, 4, 4))]
)
def test_factors_equal_the_per_sample_sums(model, loss, shape):
    p = _problem(model(), loss, in_shape=shape)
    coords = Coordinates(p.parameters())
    factors = KFACInverse().factors(p, coords)
    for slot, A, B in factors:
        conv = isinstance(slot.module, nn.Conv2d)
        A0, B0 = _slow_factors(p, slot.module, conv)
        torch.testing.assert_close(A, A0)
        torch.testing.assert_close(B, B0)


def test_one_layer_mse_kfac_is_the_dense_inverse():
    p = _problem(one_layer())
    kinv = KFACInverse(alpha=ALPHA).inverse(p)
    dense = DirectInverse("ggn", damping=ALPHA).inverse(p)
    torch.testing.assert_close(kinv.diagonal_vector(), dense.diagonal_vector())
    w = p.parameters()
    for q in ([3], [0, 9], [15], [17, 1]):
        lk, dk = kinv.obs_step(w, q)
        ld, dd = dense.obs_step(w, q)
        assert lk == pytest.approx(ld, rel=1e-8)
        for k in dd:
            torch.testing.assert_close(dk[k], dd[k])
        kinv.eliminate(q)
        dense.eliminate(q)
    torch.testing.assert_close(kinv.diagonal_vector(), dense.diagonal_vector())


def test_bulk_step_is_the_group_obs_update():
    p = _problem(mlp(), "ce")
    est = KFACInverse(alpha=ALPHA)
    bulk, exact = est.inverse(p), est.inverse(p)
    theta = bulk.gather(p.parameters())
    cand = torch.zeros(len(bulk), dtype=torch.bool)
    cand[bulk.coords.rows["0.weight"]] = True
    cand[bulk.coords.rows["2.weight"]] = True
    d = bulk.diagonal_vector()
    sal = torch.where(cand, theta.square() / (2 * d), torch.inf)
    want_rows = torch.argsort(sal)[:20]
    loss, delta = exact.step_vector(theta, want_rows)  # the low-rank group step, solved directly
    got = theta.clone()
    rows, shares = bulk.prune(got, cand, 20)
    assert sorted(rows.tolist()) == sorted(want_rows.tolist())
    torch.testing.assert_close(got, theta + delta, rtol=1e-7, atol=1e-9)
    assert sum(shares) == pytest.approx(loss, rel=1e-7)
    assert not bool(bulk.alive[rows].any())


def test_one_layer_bulk_step_equals_dense_group_obs():
    p = _problem(one_layer())
    kinv = KFACInverse(alpha=ALPHA).inverse(p)
    dense = DirectInverse("ggn", damping=ALPHA).inverse(p)
    theta = kinv.gather(p.parameters())
    cand = torch.zeros(len(kinv), dtype=torch.bool)
    cand[kinv.coords.rows["0.weight"]] = True
    got = theta.clone()
    rows, shares = kinv.prune(got, cand, 6)
    loss, delta = dense.step_vector(theta, rows)
    torch.testing.assert_close(got, theta + delta, rtol=1e-7, atol=1e-9)
    assert sum(shares) == pytest.approx(loss, rel=1e-7)


def test_obs_pruner_with_kfac_runs_and_predicts_its_sum():
    m = mlp()
    p = _problem(m, "ce")
    before = p.objective()
    mask, info = OBSPruner(inverse=KFACInverse(alpha=ALPHA))(p, sparsity=0.3)
    assert mask.pruned() == round(0.3 * mask.total())
    assert info.predicted_increase > 0
    assert all(bool((m.state_dict()[k][~mask[k]] == 0).all()) for k in mask.names)
    assert info.objective_before == pytest.approx(before)


def test_a_single_step_holds_weights_pruned_before_the_inverse_at_zero():
    """One Linear layer under MSE (K-FAC exact) with entries pruned beforehand: deleting one
    more weight solves the constrained quadratic, as the dense OBS inverse does."""
    from optbrain.masking import Mask

    m = one_layer()
    keep = {n: torch.ones_like(p, dtype=torch.bool) for n, p in m.named_parameters()}
    keep["0.weight"][0, :3] = False
    with torch.no_grad():
        m[0].weight[0, :3] = 0
    p = _problem(m)
    mask = Mask(keep)
    kfac = KFACInverse(alpha=ALPHA).inverse(p, mask)
    dense = DirectInverse("ggn", damping=ALPHA).inverse(p, mask)
    w = p.parameters()
    for idx in [(0, 3), (1, 0)]:
        lk, dk = kfac.obs_step(w, [kfac.flat_index("0.weight", idx)])
        ld, dd = dense.obs_step(w, [dense.flat_index("0.weight", idx)])
        assert lk == pytest.approx(ld, rel=1e-8)
        for k in dd:
            torch.testing.assert_close(dk[k], dd[k], rtol=1e-7, atol=1e-10)
