"""Block-diagonal inverse curvature (WoodFisher's chunks, per row, per layer) against the dense
Gauss-Newton matrix, and its bulk greedy OBS against a slow one-deletion-at-a-time greedy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optbrain.curvature import BlockInverse, DirectInverse
from optbrain.curvature.inverse import Coordinates
from optbrain.errors import CurvatureTooLargeError, UnsupportedModuleError
from optbrain.masking import Mask
from optbrain.problem import Problem
from optbrain.pruners import OBSPruner

F64 = torch.float64
ALPHA = 1e-3


def _seeded(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * 0.6)
    return model


def _problem(model, loss="mse", n=40, in_shape=(5,), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *in_shape, generator=g, dtype=F64)
    with torch.no_grad():
        out = model(x)
    if loss == "mse":
        y = out + 0.3 * torch.randn(out.shape, generator=g, dtype=F64)
        fn = nn.MSELoss()
    else:
        y = torch.randint(0, out.shape[1], (n,), generator=g)
        fn = nn.CrossEntropyLoss()
    return Problem(model, fn, [(x[:17], y[:17]), (x[17:], y[17:])])


def one_layer():
    return _seeded(nn.Sequential(nn.Linear(5, 3)).to(F64), 0)


def mlp():
    return _seeded(nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).to(F64), 1)


def convnet():
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 3))
    return _seeded(m.to(F64), 2)


def _dense_blocks(p, est, mask=None):
    """(block of G, G_QQ of the dense GGN) for every block's alive coordinates Q."""
    G, coords = DirectInverse("ggn").matrix(p, mask)
    index, grams, _ = est.blocks(p, coords)
    for idx, gram in zip(index, grams):
        for b in range(idx.shape[0]):
            ok = idx[b] >= 0
            q = idx[b][ok]
            yield gram[b][ok][:, ok], G[q][:, q]


@pytest.mark.parametrize("block", ["layer", "row"])
def test_one_layer_mse_blocks_equal_the_dense_inverse(block):
    p = _problem(one_layer())
    binv = BlockInverse(block, alpha=ALPHA).inverse(p)
    dense = DirectInverse("ggn", damping=ALPHA).inverse(p)
    torch.testing.assert_close(binv.diagonal_vector(), dense.diagonal_vector())
    w = p.parameters()
    for q in (0, 7, 15, 17):
        lb, db = binv.obs_step(w, q)
        ld, dd = dense.obs_step(w, q)
        assert lb == pytest.approx(ld, rel=1e-8)
        for k in dd:
            torch.testing.assert_close(db[k], dd[k])
        binv.eliminate(q)
        dense.eliminate(q)
    torch.testing.assert_close(binv.diagonal_vector(), dense.diagonal_vector())


@pytest.mark.parametrize(
    ("model", "loss", "block", "shape"),
    [
        (mlp, "ce", 3, (5,)),
        (mlp, "mse", "row", (5,)),
        (mlp, "ce", "layer", (5,)),
        (convnet, "ce", 4, (2, 4, 4)),
        (convnet, "mse", "row", (2, 4, 4)),
    ],
)
def test_blocks_are_the_dense_ggn_blocks(model, loss, block, shape):
    p = _problem(model(), loss, in_shape=shape)
    for got, want in _dense_blocks(p, BlockInverse(block, alpha=ALPHA)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_pruned_entries_are_left_out_of_their_blocks():
    m = mlp()
    g = torch.Generator().manual_seed(5)
    mask = Mask({"0.weight": torch.rand(7, 5, generator=g) > 0.3})
    p = _problem(m, "ce")
    binv = BlockInverse(4, alpha=ALPHA).inverse(p, mask)
    assert int((~binv.alive).sum()) == 0 and len(binv) == Coordinates(p.parameters(), mask).size
    for got, want in _dense_blocks(p, BlockInverse(4, alpha=ALPHA), mask):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    for g in binv.groups:  # padding and pruned slots are empty rows and columns
        for b in range(g.index.shape[0]):
            ok = g.index[b] >= 0
            assert torch.all(g.inv[b][~ok] == 0) and torch.all(g.inv[b][:, ~ok] == 0)


def _slow_greedy(binv, theta, candidates, count, caps=()):
    """One deletion at a time: the least w²/(2[H⁻¹]_qq) over every block, OBS update, eliminate."""
    theta = theta.clone()
    cand = candidates.clone()
    limits = [[rows, most] for rows, most in caps]
    out = []
    for _ in range(count):
        d = binv.diagonal_vector()
        s = torch.where(cand, theta.square() / (2 * torch.where(cand, d, 1.0)), torch.inf)
        for rows, most in limits:
            if most == 0:
                s[rows] = torch.inf
        q = int(torch.argmin(s))
        if not torch.isfinite(s[q]):
            break
        loss, delta = binv.step_vector(theta, q)
        theta += delta
        theta[q] = 0
        binv.eliminate(q)
        cand[q] = False
        for lim in limits:
            if bool((lim[0] == q).any()):
                lim[1] -= 1
        out.append((q, loss))
    return out, theta


@pytest.mark.parametrize("block", [3, "row", "layer"])
@pytest.mark.parametrize("count", [5, 30, 44])
def test_bulk_prune_equals_the_slow_greedy(block, count):
    p = _problem(mlp(), "ce")
    est = BlockInverse(block, alpha=ALPHA)
    slow_inv, fast_inv = est.inverse(p), est.inverse(p)
    theta = slow_inv.gather(p.parameters())
    cand = torch.zeros(len(slow_inv), dtype=torch.bool)
    cand[slow_inv.coords.rows["0.weight"]] = True
    cand[slow_inv.coords.rows["2.weight"]] = True
    caps = [(slow_inv.coords.rows["2.weight"], 20)]
    want, theta_slow = _slow_greedy(slow_inv, theta, cand, count, caps)
    theta_fast = theta.clone()
    rows, losses = fast_inv.prune(theta_fast, cand, count, caps)
    assert rows.tolist() == [q for q, _ in want]
    assert losses == pytest.approx([loss for _, loss in want], rel=1e-9, abs=1e-14)
    torch.testing.assert_close(theta_fast, theta_slow)
    torch.testing.assert_close(fast_inv.diagonal_vector(), slow_inv.diagonal_vector())
    assert torch.equal(fast_inv.alive, slow_inv.alive)


def test_obs_pruner_with_layer_blocks_equals_dense_obs_on_one_layer():
    results = []
    for inverse in (DirectInverse("ggn", damping=ALPHA), BlockInverse("layer", alpha=ALPHA)):
        m = one_layer()
        mask, info = OBSPruner(inverse=inverse)(_problem(m), sparsity=0.6)
        results.append((mask, {k: v.clone() for k, v in m.state_dict().items()}, info))
    (m1, w1, i1), (m2, w2, i2) = results
    assert all(torch.equal(m1[k], m2[k]) for k in m1.names)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k])
    assert i2.predicted_increase == pytest.approx(i1.predicted_increase, rel=1e-9)


def test_bad_settings_and_models():
    with pytest.raises(ValueError, match="block"):
        BlockInverse(0)
    with pytest.raises(ValueError, match="alpha"):
        BlockInverse(4, alpha=0)
    with pytest.raises(CurvatureTooLargeError):
        BlockInverse("layer", max_entries=100).inverse(_problem(mlp()))
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).to(F64).eval()
    with pytest.raises(UnsupportedModuleError, match="restrict"):
        BlockInverse(4).inverse(_problem(bn))
