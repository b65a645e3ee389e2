"""Optimal Brain Surgeon: saliencies, the sequential pruner, Unit-OBS, weight decay, ghost rule.

Exactness checks use least squares with a linear model (MSE): there the Gauss–Newton matrix is the
exact, constant Hessian, so OBS predictions must equal the actual changes of E to round-off.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cases
from optbrain import pruners as presets
from optbrain.curvature import DirectInverse, GGNDiagonal, RecursiveInverse
from optbrain.errors import UnsupportedArgumentError
from optbrain.loop import iterative_prune
from optbrain.masking import Mask, attach
from optbrain.problem import Problem
from optbrain.pruners.surgeon import OBSPruner
from optbrain.saliency import OBD, OBS
from optbrain.schedule import linear
from optbrain.selection import TargetExceededError

D = torch.float64


def least_squares(n_in=6, n_out=2, n=40, seed=0, decay=0.0, useless=None):
    """A Linear model at the exact minimum of mean-MSE (+ (decay/2)‖θ‖²) on random data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g, dtype=D)
    a = torch.randn(n_in, n_out, generator=g, dtype=D)
    if useless is not None:
        a[useless] = 0
    y = x @ a + 0.3 * torch.randn(n, n_out, generator=g, dtype=D)
    model = nn.Linear(n_in, n_out).to(D)
    xa = torch.cat([x, torch.ones(n, 1, dtype=D)], 1)
    # E = (1/(n·n_out)) Σ (xaᵀθ_k − y_k)², per output k: (2/(n·n_out)) XaᵀXa θ_k + decay θ_k = rhs
    r = 2.0 / (n * n_out) * xa.T @ xa
    theta = torch.linalg.solve(
        r + decay * torch.eye(n_in + 1, dtype=D), 2.0 / (n * n_out) * xa.T @ y
    )
    with torch.no_grad():
        model.weight.copy_(theta[:n_in].T)
        model.bias.copy_(theta[n_in])
    return model, Problem(model, nn.MSELoss(), [(x[:25], y[:25]), (x[25:], y[25:])])


def flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


def exact_inverse():
    return DirectInverse("ggn", damping=0.0)


# ------------------------------------------------------------------------- exactness
def test_each_obs_step_predicts_the_actual_increase_exactly():
    model, problem = least_squares()
    inv = exact_inverse().inverse(problem)
    assert inv.info["fallbacks"] == []
    params = dict(model.named_parameters())
    for _ in range(5):
        theta = inv.gather(params)
        sal = torch.where(inv.alive, theta.square() / (2 * inv.matrix.diagonal()), torch.inf)
        sal[12:] = torch.inf  # biases are not deleted
        q = int(sal.argmin())
        before = problem.objective()
        loss, delta = inv.step_vector(theta, q)
        new = inv.scatter(theta + delta)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(new[k])
        assert flat(params)[q] == 0.0  # exactly
        assert problem.objective() - before == pytest.approx(loss, rel=1e-8, abs=1e-14)
        inv.eliminate(q)


def test_group_obs_predicts_the_actual_increase():
    model, problem = least_squares()
    inv = exact_inverse().inverse(problem)
    params = dict(model.named_parameters())
    before = problem.objective()
    loss, dw = inv.obs_step(params, [1, 4, 9])
    with torch.no_grad():
        for k, p in params.items():
            p.add_(dw[k])
    assert (flat(params)[[1, 4, 9]] == 0).all()
    assert problem.objective() - before == pytest.approx(loss, rel=1e-8)


def test_group_costs_at_least_as_much_as_each_member_and_less_than_their_sum():
    """A constrained minimum over more constraints is higher: ΔE(Q) >= ΔE({q}) for q in Q, with
    equality only when the others cost nothing; on correlated inputs ΔE(Q) != Σ ΔE({q})."""
    model, problem = least_squares()
    inv = exact_inverse().inverse(problem)
    params = dict(model.named_parameters())
    group = [1, 4, 9]
    loss, _ = inv.obs_step(params, group)
    single = [inv.obs_step(params, q)[0] for q in group]
    assert min(single) > 0
    assert loss >= max(single) * (1 + 1e-9)
    assert loss != pytest.approx(sum(single), rel=1e-3)


def test_pruner_predicted_increase_is_exact_and_deleted_weights_are_zero():
    model, problem = least_squares()
    bias_before = model.bias.detach().clone()
    before = problem.objective()
    mask, info = OBSPruner(exact_inverse())(problem, sparsity=5)
    assert info.newly_pruned == 5 and mask.pruned() == 5 and set(mask.names) == {"weight"}
    assert (model.weight[~mask["weight"]] == 0).all()
    assert problem.objective() - before == pytest.approx(info.predicted_increase, rel=1e-8)
    assert not torch.equal(model.bias, bias_before)  # biases compensate
    # one call of 5 deletions == 5 calls of one (the point stays at the constrained minimum)
    model2, problem2 = least_squares()
    m = None
    total = 0.0
    for k in range(1, 6):
        before2 = problem2.objective()
        m, inf2 = OBSPruner(exact_inverse())(problem2, m, sparsity=k)
        assert problem2.objective() - before2 == pytest.approx(inf2.predicted_increase, rel=1e-8)
        total += inf2.predicted_increase
    assert m == mask
    assert total == pytest.approx(info.predicted_increase, rel=1e-8)
    torch.testing.assert_close(model2.weight, model.weight)


def test_refresh_recomputes_the_inverse_away_from_a_quadratic():
    """On a tanh net, refresh=2 equals separate calls of 2 deletions each (each call computes a
    fresh H⁻¹ at the current weights) and differs from one inverse for all 6 deletions."""
    model, problem = teacher_mlp()
    mask, info = OBSPruner(refresh=2)(problem, sparsity=6)
    model2, problem2 = teacher_mlp()
    m, total = None, 0.0
    for k in (2, 4, 6):
        m, step = OBSPruner()(problem2, m, sparsity=k)
        total += step.predicted_increase
    assert mask == m
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert info.predicted_increase == pytest.approx(total, rel=1e-9)
    model3, problem3 = teacher_mlp()
    _, once = OBSPruner()(problem3, sparsity=6)
    assert once.predicted_increase != pytest.approx(total, rel=1e-6)
    assert not torch.allclose(model3[0].weight, model[0].weight, rtol=1e-6, atol=1e-9)


def test_refresh_gives_the_same_result_on_a_quadratic():
    model, problem = least_squares()
    mask, info = OBSPruner(exact_inverse())(problem, sparsity=0.5)
    model2, problem2 = least_squares()
    mask2, info2 = OBSPruner(exact_inverse(), refresh=2)(problem2, sparsity=0.5)
    assert mask2 == mask
    torch.testing.assert_close(model2.weight, model.weight, rtol=1e-9, atol=1e-12)
    assert info2.predicted_increase == pytest.approx(info.predicted_increase, rel=1e-9)


# ------------------------------------------------------------------------- saliencies
def test_obs_saliency_is_at_most_obd_saliency():
    for _model, problem in (least_squares(), least_squares(n_in=3, n_out=4, seed=2)):
        obs = OBS(exact_inverse())(problem)
        obd = OBD(GGNDiagonal(dtype=D))(problem)
        for k in obs:
            assert (obs[k] <= obd[k] * (1 + 1e-12)).all()
        assert (flat(obs) < 0.99 * flat(obd)).any()  # the off-diagonal terms matter here
    s = cases.setup("mlp_tanh", "ce_mean")
    alpha = 1e-4
    obs = OBS(RecursiveInverse(alpha))(s.problem())
    obd = OBD(GGNDiagonal(dtype=D), weight_decay=alpha / 2)(s.problem())  # ½(h + α)w²
    for k in obs:
        assert (obs[k] <= obd[k] * (1 + 1e-9) + 1e-15).all()


def test_with_diagonal_curvature_obs_equals_obd():
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(30, 5, generator=g, dtype=D))
    x = q * torch.tensor([1.0, 3.0, 0.5, 2.0, 7.0], dtype=D)  # orthogonal columns: XᵀX diagonal
    y = torch.randn(30, 1, generator=g, dtype=D)
    model = nn.Linear(5, 1, bias=False).to(D)
    problem = Problem(model, nn.MSELoss(), (x, y))
    obs = OBS(exact_inverse())(problem)["weight"]
    obd = OBD(GGNDiagonal(dtype=D))(problem)["weight"]
    torch.testing.assert_close(obs, obd, rtol=1e-10, atol=0)
    assert torch.equal(obs.argsort(), obd.argsort())


def test_obs_saliency_leaves_out_entries_of_an_attached_mask():
    model, problem = least_squares()
    attach(model, Mask.ones(model).with_pruned({"weight": [0, 3]}))
    s = OBS(exact_inverse())(problem)
    assert s["weight"].reshape(-1)[[0, 3]].eq(0).all() and (s["weight"].reshape(-1)[1:3] > 0).all()
    assert set(s) == {"weight", "bias"}


def test_weight_decay_saliency_is_the_change_of_the_unregularised_error():
    lam = 0.3
    model, problem = least_squares(decay=lam)
    pr = OBSPruner(DirectInverse("ggn", damping=lam), weight_decay=lam)
    m = None
    for k in range(1, 5):
        before = problem.objective()
        m, info = pr(problem, m, sparsity=k)
        assert problem.objective() - before == pytest.approx(info.predicted_increase, rel=1e-8)
    model2, problem2 = least_squares(decay=lam)
    before = problem2.objective()
    m2, info2 = pr(problem2, sparsity=4)  # four steps in one call: still exact
    assert m2 == m
    assert problem2.objective() - before == pytest.approx(info2.predicted_increase, rel=1e-8)
    # the saliency used for ranking is not the plain OBS one
    z = OBS(DirectInverse(damping=lam), weight_decay=lam)(problem2)
    plain = OBS(DirectInverse(damping=lam))(problem2)
    assert not torch.allclose(z["weight"], plain["weight"])


def test_weight_decay_needs_a_matching_inverse():
    with pytest.raises(ValueError, match="R \\+ 0.1"):
        OBSPruner(RecursiveInverse(1e-6), weight_decay=0.1)
    with pytest.raises(ValueError):
        OBS(weight_decay=-1.0)
    assert OBSPruner(weight_decay=0.1).inverse.regularizer == 0.1


# ------------------------------------------------------------------------- Unit-OBS, ghost rule
def test_unit_obs_removes_a_planted_useless_input_of_a_linear_model():
    model, problem = least_squares(n_in=5, n_out=2, useless=2)
    before = problem.objective()
    mask, info = presets.unit_obs(exact_inverse())(problem, units=1)
    kept_cols = mask["weight"].all(0)
    assert kept_cols.tolist() == [True, True, False, True, True]
    assert info.newly_pruned == 2 and (model.weight[:, 2] == 0).all()
    assert problem.objective() - before == pytest.approx(info.predicted_increase, rel=1e-8)
    # sparsity counts weights: 3 weights need two inputs (2 weights each)
    model, problem = least_squares(n_in=5, n_out=2, useless=2)
    mask, info = OBSPruner(exact_inverse(), groups="unit")(problem, sparsity=3)
    assert info.newly_pruned == 4 and not mask["weight"][:, 2].any()


def teacher_mlp():
    """4-3-1 tanh net whose input 2 barely matters, output layer least-squares fitted."""
    g = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).to(D)
    x = torch.randn(120, 4, generator=g, dtype=D)
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(3, 4, generator=g, dtype=D))
        model[0].weight[:, 2] = 0.02 * torch.randn(3, generator=g, dtype=D)
        model[0].bias.copy_(0.1 * torch.randn(3, generator=g, dtype=D))
        model[2].weight.copy_(torch.tensor([[1.5, -2.0, 1.0]], dtype=D))
        model[2].bias.zero_()  # (not from the global RNG: the data must not depend on it)
        y = model(x) + 0.05 * torch.randn(120, 1, generator=g, dtype=D)
        h = torch.cat([model[1](model[0](x)), torch.ones(120, 1, dtype=D)], 1)
        sol = torch.linalg.lstsq(h, y).solution
        model[2].weight.copy_(sol[:3].T)
        model[2].bias.copy_(sol[3])
    return model, Problem(model, nn.MSELoss(), (x, y))


def test_unit_obs_removes_the_useless_input_of_an_mlp_and_its_dead_fan_in():
    model, problem = teacher_mlp()
    pr = presets.unit_obs()
    scores = pr.scores(problem)
    inputs = scores["0.weight"][0]
    assert int(inputs.argmin()) == 2 and inputs[2] < 0.1 * inputs[[0, 1, 3]].min()
    mask, info = pr(problem, units=1)
    assert mask["0.weight"].all(0).tolist() == [True, True, False, True]
    assert mask["2.weight"].all() and info.newly_pruned == 3
    # removing a hidden unit prunes its fan-out and its (now dead) fan-in weights
    mask2, info2 = pr(problem, mask, units=2)  # a total, like sparsity
    assert info2.cells_removed == 2 and info2.cells_total == 4 + 3
    gone = [j for j in range(3) if not mask2["2.weight"][0, j]]
    assert len(gone) == 1 and not mask2["0.weight"][gone[0]].any()
    assert info2.newly_pruned == 1 + 3  # one output weight, three remaining input weights
    assert (model[0].weight[gone[0]] == 0).all() and model[2].weight[0, gone[0]] == 0


def test_ghost_rule_deletes_a_ghost_unit_jointly_and_protects_last_outputs():
    def setup():
        model, problem = teacher_mlp()
        mask = Mask.ones(model).with_pruned({"0.weight": [1, 2, 3]})  # unit 0 keeps input 0 only
        with torch.no_grad():
            model[0].weight[0, 0] = 1e-6  # ... a negligible one: the first deletion candidate
            model[0].weight.view(-1)[[1, 2, 3]] = 0
        return model, problem, mask

    model, problem, mask = setup()
    plain, info = OBSPruner()(problem, mask, sparsity=4)
    assert info.newly_pruned == 1 and not plain["0.weight"][0, 0] and plain["2.weight"].all()
    model, problem, mask = setup()
    ghost, info = OBSPruner(ghost_rule=True)(problem, mask, sparsity=4)
    assert not ghost["0.weight"][0, 0] and not ghost["2.weight"][0, 0]  # unit 0 gone entirely
    assert info.newly_pruned == 2 and model[2].weight[0, 0] == 0

    model, problem, mask = setup()
    with torch.no_grad():
        model[0].weight[0, 0] = 1.0
        model[2].weight[0, 1] = 1e-7  # the smallest weight is an output weight ...
    only_out = mask.with_pruned({"2.weight": [0, 2]})  # ... and unit 1's last one
    plain, _ = OBSPruner()(problem, only_out, sparsity=6)
    assert not plain["2.weight"][0, 1]
    protected, _ = OBSPruner(ghost_rule=True)(problem, only_out, sparsity=6)
    assert protected["2.weight"][0, 1]


# ------------------------------------------------------------------------- integration
def test_obs_inside_iterative_prune_with_checkpoint_resume(tmp_path):
    def run(rounds, folder):
        s = cases.setup("mlp_tanh", "ce_mean", seed=1)
        h = iterative_prune(
            s.model,
            presets.obs(),
            linear(0.5, 2),
            rounds=rounds,
            make_problem=lambda m: Problem(m, s.loss_fn, s.batches),
            checkpoint_dir=folder,
            config={"method": "obs"},
        )
        return s.model, h

    m_full, h_full = run(2, tmp_path / "a")
    run(1, tmp_path / "b")
    m_res, h_res = run(2, tmp_path / "b")
    assert [r.sparsity for r in h_full.records] == [0.0, 17 / 69, 34 / 69]  # 69 weights
    for a, b in zip(h_full.records, h_res.records):
        assert a.sparsity == b.sparsity
        assert a.predicted_increase == pytest.approx(b.predicted_increase, rel=1e-9)
    for (k, p), q in zip(m_full.state_dict().items(), m_res.state_dict().values()):
        torch.testing.assert_close(p, q, msg=k)
    for r in h_full.records[1:]:  # random weights, not a minimum: no exactness to expect
        assert r.predicted_increase >= 0 and abs(r.actual_increase) < 0.1


def test_state_repr_presets_and_bad_targets():
    pr = presets.PRESETS["obs"](ghost_rule=True)
    assert isinstance(pr, OBSPruner) and pr.ghost_rule and pr.state_dict() == {}
    pr.load_state_dict({})
    with pytest.raises(ValueError):
        pr.load_state_dict({"x": 1})
    assert presets.PRESETS["unit_obs"]().groups == "unit"
    assert "OBSPruner(inverse=AutoInverse(" in repr(pr)
    for bad in (dict(groups="layer"), dict(refresh=0), dict(groups="unit", ghost_rule=True)):
        with pytest.raises(ValueError):
            OBSPruner(**bad)

    model, problem = least_squares()
    mask, _ = OBSPruner()(problem, sparsity=4)
    with pytest.raises(TargetExceededError):
        OBSPruner()(problem, mask, sparsity=2)
    with pytest.raises(ValueError):
        OBSPruner()(problem, mask, sparsity=1.5)
    with pytest.raises(UnsupportedArgumentError, match="unit_obs"):
        OBSPruner()(problem, units=1)
    weights = model.weight.detach().clone()
    with pytest.raises(ValueError, match="units 6 out of range"):  # 6 input cells only
        OBSPruner(groups="unit")(problem, mask, units=6)
    assert torch.equal(model.weight, weights)  # restored on error


def test_float32_model_keeps_its_dtype_and_exact_zeros():
    s = cases.setup("mlp_relu", "mse_mean")
    s.model.float()
    batches = [(x.float(), y.float()) for x, y in s.batches]
    problem = Problem(s.model, s.loss_fn, batches)
    mask, info = presets.obs()(problem, sparsity=0.3)
    for k in mask.names:
        p = dict(s.model.named_parameters())[k]
        assert p.dtype == torch.float32 and (p[~mask[k]] == 0).all()
    assert info.newly_pruned == round(0.3 * mask.total())


def test_cli_task_prune_with_obs(tmp_path):
    from optbrain.tasks import prune

    result = prune(
        "tests/fixtures_task.py:task", method="obs", sparsity=0.5, rounds=2, retrain_epochs=0,
        out_dir=tmp_path,
    )  # fmt: skip
    last = result.history.records[-1]
    assert last.sparsity == pytest.approx(0.5, abs=0.01)
    assert last.predicted_increase >= 0 and result.model_path.exists()


def test_unit_obs_on_a_cnn_removes_whole_channels():
    s = cases.setup(
        "conv_max", "ce_mean"
    )  # Conv2d(1, 2) → ReLU → MaxPool → Flatten → Linear(18, 3)
    problem = Problem(s.model, s.loss_fn, s.batches)
    mask, info = presets.unit_obs(RecursiveInverse(1e-3))(problem, units=1)
    assert mask["0.weight"].reshape(2, -1).all(1).tolist() == [True, False]  # channel 1 went
    assert not mask["5.weight"][:, 9:].any() and mask["5.weight"][:, :9].all()  # its 9 columns
    assert info.newly_pruned == 3 * 9 + 9  # fan-out columns and the 3×3 kernel
    for k in mask.names:
        assert (dict(s.model.named_parameters())[k][~mask[k]] == 0).all()


# ------------------------------------------------------------------------- review fixes
def test_restricted_params_with_unit_mode_and_ghost_rule():
    """Cells' fan-ins name biases that a restricted Problem.params leaves out: held fixed."""
    model, problem = teacher_mlp()
    restricted = Problem(model, problem.loss_fn, problem.data, params=["0.weight", "2.weight"])
    biases = [model[0].bias.detach().clone(), model[2].bias.detach().clone()]
    mask, info = presets.unit_obs(exact_inverse())(restricted, units=1)
    assert mask["0.weight"].all(0).tolist() == [True, True, False, True]
    assert info.newly_pruned == 3
    assert torch.equal(model[0].bias, biases[0]) and torch.equal(model[2].bias, biases[1])

    model, problem = teacher_mlp()
    restricted = Problem(model, problem.loss_fn, problem.data, params=["0.weight", "2.weight"])
    mask = Mask.ones(model).with_pruned({"0.weight": [1, 2, 3]})  # unit 0 keeps input 0 only
    with torch.no_grad():
        model[0].weight[0, 0] = 1e-6
        model[0].weight.view(-1)[[1, 2, 3]] = 0
        model[0].bias[0] = 0  # unit 0 outputs ~0: removing it is cheap without the output bias
    ghost, info = OBSPruner(ghost_rule=True)(restricted, mask, sparsity=4)
    assert not ghost["0.weight"][0, 0] and not ghost["2.weight"][0, 0]  # unit 0 gone entirely
    assert info.newly_pruned == 2 and model[2].weight[0, 0] == 0
    s = OBSPruner(ghost_rule=True).scores(restricted, ghost)
    assert set(s) == {"0.weight", "2.weight"} and torch.isfinite(s["0.weight"]).all()


def deep_net(seed=7):
    """2-2-2-1 tanh net on random data (least-squares output layer)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1)
    ).to(D)
    x = torch.randn(60, 2, generator=g, dtype=D)
    with torch.no_grad():
        for m in model[::2]:
            m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=D))
        y = model(x) + 0.05 * torch.randn(60, 1, generator=g, dtype=D)
    return model, Problem(model, nn.MSELoss(), (x, y))


def ghosts(model, mask):
    """Hidden units with an alive fan-in weight and no alive fan-out weight."""
    layers = [n for n in ("0.weight", "2.weight", "4.weight")]
    out = []
    for a, b in zip(layers, layers[1:]):
        for j in range(mask[a].shape[0]):
            if mask[a][j].any() and not mask[b][:, j].any():
                out.append((a, j))
    return out


def test_ghost_rule_protection_wins_over_a_ghost_group_of_the_next_layer():
    """W2[0,0] is the last fan-out of layer-1 unit 0 and the last fan-in of layer-2 unit 0: deleting
    it (alone or with layer-2 unit 0's fan-out) would leave layer-1 unit 0 a ghost."""
    model, problem = deep_net()
    mask = Mask.ones(model).with_pruned({"2.weight": [1, 2]})  # W2[0,1] and W2[1,0]
    with torch.no_grad():
        model[2].weight.view(-1)[[1, 2]] = 0
    pr = OBSPruner(exact_inverse(), ghost_rule=True)
    s = pr.scores(problem, mask)
    assert s["2.weight"][0, 0] == torch.inf
    assert s["2.weight"][1, 1] == torch.inf  # also last fan-out and last fan-in
    for k in range(3, 8):
        model, problem = deep_net()
        with torch.no_grad():
            model[2].weight.view(-1)[[1, 2]] = 0
        new, _ = pr(problem, mask, sparsity=k)
        assert ghosts(model, new) == [], k


def test_ghost_rule_lets_a_unit_without_fan_in_lose_its_last_output():
    """A hidden unit whose fan-in is fully pruned on entry computes a constant: its last output
    weight is not protected (else it could block the target forever)."""
    model, problem = teacher_mlp()
    mask = Mask.ones(model).with_pruned({"0.weight": [0, 1, 2, 3]})  # unit 0 has no input left
    with torch.no_grad():
        model[0].weight[0] = 0
        model[2].weight[0, 0] = 1e-8  # the cheapest deletion
    s = OBSPruner(exact_inverse(), ghost_rule=True).scores(problem, mask)
    assert torch.isfinite(s["2.weight"][0, 0])
    assert torch.isinf(s["2.weight"][0, 1:]).all()  # units 1, 2 still have inputs: protected
    new, info = OBSPruner(exact_inverse(), ghost_rule=True)(problem, mask, sparsity=5)
    assert not new["2.weight"][0, 0] and info.newly_pruned == 1


def test_ghost_rule_ignores_batchnorm_weights_in_the_mask():
    """BatchNorm weights in the default mask are not input connections of a unit."""
    g = torch.Generator().manual_seed(11)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2), nn.Tanh(), nn.Linear(2, 1)).to(D)
    x = torch.randn(50, 3, generator=g, dtype=D)
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(2, 3, generator=g, dtype=D))
        model[1].running_var.fill_(2.0)
        y = model.eval()(x) + 0.05 * torch.randn(50, 1, generator=g, dtype=D)
        model[0].weight.view(-1)[[0, 1]] = 0
        model[0].weight[0, 2] = 1e-6  # unit 0's last input: a ghost trigger
    problem = Problem(model, nn.MSELoss(), (x, y))
    names = ["0.weight", "1.weight", "3.weight"]  # a BatchNorm gain, chosen explicitly
    mask = Mask.ones(model, names).with_pruned({"0.weight": [0, 1]})
    new, info = OBSPruner(RecursiveInverse(1e-4), ghost_rule=True)(problem, mask, sparsity=3)
    assert not new["0.weight"][0, 2] and not new["3.weight"][0, 0]
    assert info.newly_pruned == 2


def test_weight_decay_with_a_damping_fallback_is_refused():
    """ζ_q assumes H = R + λI exactly; a fallback to more damping would make it silently wrong."""
    from optbrain.errors import SingularCurvatureError

    s = cases.setup("mlp_tanh", "mse_mean")  # random weights: the exact Hessian is indefinite
    lam = 1e-6
    inv = DirectInverse("hessian", damping=lam).inverse(s.problem())
    assert inv.info["fallbacks"] and inv.info["damping"] > lam
    with pytest.raises(SingularCurvatureError, match="weight_decay"):
        OBS(DirectInverse("hessian", damping=lam), weight_decay=lam)(s.problem())
    weights = [p.detach().clone() for p in s.model.parameters()]
    with pytest.raises(SingularCurvatureError, match="weight_decay"):
        OBSPruner(DirectInverse("hessian", damping=lam), weight_decay=lam)(s.problem(), sparsity=3)
    assert all(torch.equal(a, b) for a, b in zip(weights, s.model.parameters()))


def test_weight_decay_of_a_sum_reduced_loss_is_divided_by_the_number_of_samples():
    """Trained full-batch on Σ_n ℓ_n with PyTorch's weight_decay=λ, the net sits at a minimum of
    E + (λ/(2N))‖θ‖² (E the library's per-sample mean): weight_decay=λ/N is exact, λ is not."""
    n, n_out, lam = 40, 2, 2.0
    # least_squares: minimum of mean-MSE + (d/2)‖θ‖²; mean-MSE = E_sum / n_out
    model, mean_problem = least_squares(n=n, n_out=n_out, decay=lam / (n * n_out))
    sum_loss = nn.MSELoss(reduction="sum")
    x = torch.cat([b[0] for b in mean_problem.data])
    y = torch.cat([b[1] for b in mean_problem.data])
    model.zero_grad()
    sum_loss(model(x), y).backward()  # PyTorch's stationarity: ∇Σℓ + λθ = 0
    for p in model.parameters():
        torch.testing.assert_close(
            p.grad + lam * p.detach(), torch.zeros_like(p), atol=1e-10, rtol=0
        )
    model.zero_grad()

    def predicted_and_actual(decay):
        m, _ = least_squares(n=n, n_out=n_out, decay=lam / (n * n_out))
        problem = Problem(m, sum_loss, mean_problem.data)
        before = problem.objective()
        _, info = OBSPruner(weight_decay=decay)(problem, sparsity=3)
        return info.predicted_increase, problem.objective() - before

    pred, actual = predicted_and_actual(lam / n)
    assert pred == pytest.approx(actual, rel=1e-6)
    pred, actual = predicted_and_actual(lam)
    assert pred != pytest.approx(actual, rel=0.1)
