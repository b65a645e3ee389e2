"""The safeguards of issue #12: OBS's update kept only where it lowers the measured objective, no
layer emptied unless allowed, and clear errors for targets that cannot be reached."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import cases
from optbrain.curvature.inverse import AutoInverse
from optbrain.errors import EmptyLayerError
from optbrain.masking import Mask
from optbrain.problem import Problem
from optbrain.pruners import OBSPruner, layerwise_obs, magnitude, obd, obs, ocd
from optbrain.pruners.surgeon import SCALES
from optbrain.selection import GlobalSelector, LayerSelector, split_target

D = torch.float64


def saturated(seed: int, scale: float = 3.0, n: int = 40):
    """A 3-6-2 tanh net with large weights (saturated units, far from a quadratic) and targets
    near its outputs: OBS's quadratic model does not hold over a large deletion."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).to(D)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=D) * scale)
    x = torch.randn(n, 3, generator=g, dtype=D)
    with torch.no_grad():
        y = model(x) + 0.1 * torch.randn(n, 2, generator=g, dtype=D)
    return model, Problem(model, nn.MSELoss(), (x, y))


def zeroed_objective(model: nn.Module, problem: Problem, theta: dict, mask: Mask) -> float:
    """E at the original weights with the entries ``mask`` deletes set to 0 (no compensation)."""
    with torch.no_grad():
        for k, v in model.named_parameters():
            v.copy_(theta[k] * (mask[k].to(D) if k in mask else 1.0))
    return problem.objective()


def original(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# --------------------------------------------------------------------------- OBS safeguard
@pytest.mark.parametrize("seed", range(8))
def test_safeguarded_obs_never_ends_above_plain_zeroing(seed):
    model, problem = saturated(seed)
    theta = original(model)
    mask, info = OBSPruner(safeguard=True)(problem, sparsity=0.5)
    guarded = problem.objective()
    assert guarded == pytest.approx(info.objective_after, rel=1e-12)
    assert guarded <= zeroed_objective(model, problem, theta, mask) * (1 + 1e-12)
    (step,) = info.sub_steps
    assert step["extra"]["update_scale"] in (1.0, 0.0, *SCALES)


def test_the_unguarded_update_is_worse_than_zeroing_on_this_case():
    """What the safeguard is for (seed 1): the paper's update ends above plain zeroing."""
    model, problem = saturated(1)
    theta = original(model)
    mask, _ = OBSPruner()(problem, sparsity=0.5)
    assert problem.objective() > 1.2 * zeroed_objective(model, problem, theta, mask)


def test_the_update_length_is_the_best_of_the_line_search():
    """Same greedy path with and without the safeguard; the guarded weights are the best of
    z + t(u − z), t in {1, ½, ¼, ⅛, 0}, u the updated and z the zeroed weights."""
    model, problem = saturated(5)
    theta = original(model)
    mask_u, _ = OBSPruner()(problem, sparsity=0.5)
    updated = original(model)
    with torch.no_grad():
        for k, v in model.named_parameters():
            v.copy_(theta[k])
    mask_g, info = OBSPruner(safeguard=True)(problem, sparsity=0.5)
    assert mask_g == mask_u
    zeroed = {k: theta[k] * (mask_u[k].to(D) if k in mask_u else 1.0) for k in theta}
    energies = {}
    for t in (1.0, 0.5, 0.25, 0.125, 0.0):  # the documented line search
        with torch.no_grad():
            for k, v in model.named_parameters():
                v.copy_(zeroed[k] + t * (updated[k] - zeroed[k]))
        energies[t] = problem.objective()
    best = min(energies, key=energies.get)
    assert info.sub_steps[0]["extra"]["update_scale"] == best == 0.5  # shortened, not dropped
    assert info.objective_after == pytest.approx(energies[best], rel=1e-12)


def test_a_shortened_update_raises_the_damping_tenfold_levenberg_marquardt():
    """Each sub-step records the damping its inverse used: ten times the previous one after a
    shortened update, a tenth of it (not below the pruner's own) after a whole one."""
    model, problem = saturated(1)
    pruner = OBSPruner(AutoInverse(alpha=1e-4), safeguard=True, steps=3)
    _, info = pruner(problem, sparsity=0.6)
    extras = [d["extra"] for d in info.sub_steps]
    assert len(extras) == 3 and extras[0]["damping"] == 1e-4
    for before, after in zip(extras, extras[1:]):
        if before["update_scale"] < 1:
            expected = 10 * before["damping"]
        else:
            expected = max(1e-4, before["damping"] / 10)
        assert after["damping"] == pytest.approx(expected)
    assert any(e["update_scale"] < 1 for e in extras[:-1])
    assert pruner.inverse.alpha == 1e-4  # the pruner's own estimator is not changed


def test_the_obs_preset_is_safeguarded_and_sub_stepped():
    pr = obs()
    assert pr.safeguard and pr.steps is not None and pr.min_kept == 1
    assert "safeguard=True" in repr(pr)


# --------------------------------------------------------------------------- no layer emptied
def weak_middle_layer():
    """mlp_tanh (MSE) with the middle layer's weights scaled to 1e-4: every ranking puts all of
    them first."""
    s = cases.setup("mlp_tanh", "mse_mean")
    with torch.no_grad():
        s.model[2].weight.mul_(1e-4)
    return s, Problem(s.model, s.loss_fn, s.batches)


def plain_setup():
    s = cases.setup("mlp_tanh", "mse_mean")
    return s, Problem(s.model, s.loss_fn, s.batches)


@pytest.mark.parametrize(
    "make, build, sparsity, layer",
    [
        (lambda **k: obd(steps=None, **k), plain_setup, 0.9, "0.weight"),  # OBD empties layer 0
        (lambda **k: magnitude(**k), weak_middle_layer, 32, "2.weight"),
        (lambda **k: obs(steps=None, **k), weak_middle_layer, 32, "2.weight"),
    ],
)
def test_no_layer_loses_every_weight_unless_allowed(make, build, sparsity, layer):
    s, problem = build()
    mask, _ = make()(problem, sparsity=sparsity)
    assert all(int(mask[k].sum()) >= 1 for k in mask.names)
    assert int(mask[layer].sum()) == 1
    s, problem = build()
    allowed, _ = make(min_kept=0)(problem, sparsity=sparsity)
    assert int(allowed[layer].sum()) == 0


@pytest.mark.parametrize(
    "make", [lambda: obd(), lambda: magnitude(scope="layer"), lambda: obs(), layerwise_obs]
)
def test_a_target_that_would_empty_a_layer_is_a_clear_error(make):
    s, problem = weak_middle_layer()
    before = original(s.model)
    total = Mask.ones(s.model).total()
    with pytest.raises(EmptyLayerError, match=r"at most \d+ .*min_kept=0"):
        make()(problem, sparsity=total - 1)
    after = original(s.model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights untouched


def test_cell_pruning_never_removes_a_layers_last_unit():
    s = cases.setup("mlp_tanh", "mse_mean")
    problem = Problem(s.model, s.loss_fn, s.batches)
    pruner = ocd(kinds=("unit",))
    n_units = len(pruner.saliency.cells(s.model))
    with pytest.raises(EmptyLayerError):
        pruner(problem, sparsity=n_units - 1)


@given(
    st.lists(st.tuples(st.integers(0, 6), st.integers(1, 12)), min_size=1, max_size=5),
    st.integers(0, 3),
    st.data(),
)
def test_split_target_respects_min_kept_and_adds_up(parts, keep, data):
    sizes = [s for _, s in parts]
    forced = [min(f, s) for f, s in parts]
    caps = [max(s - keep, f) for f, s in zip(forced, sizes)]
    target = data.draw(st.integers(sum(forced), sum(caps)))
    out = split_target(forced, sizes, target, keep)
    assert sum(out) == target
    for q, f, s in zip(out, forced, sizes):
        assert f <= q <= max(s - keep, f)
    if sum(caps) < sum(sizes):
        with pytest.raises(EmptyLayerError):
            split_target(forced, sizes, sum(caps) + 1, keep)


def test_split_target_moves_a_capped_share_to_the_others():
    """The last part's proportional share (2 of 10) exceeds its cap (2 − 1): the first part
    takes the difference, so the counts still add up."""
    assert split_target([0, 0], [10, 2], 10, 1) == [9, 1]
    assert split_target([0, 0], [2, 10], 10, 1) == [1, 9]


def test_selectors_keep_the_largest_saliencies_of_a_guarded_layer():
    sal = {"a": torch.tensor([0.1, 0.2, 0.3]), "b": torch.tensor([5.0, 6.0])}
    mask = Mask({k: torch.ones_like(v, dtype=torch.bool) for k, v in sal.items()})
    new = GlobalSelector(min_kept=1)(sal, mask, 3)
    assert new["a"].tolist() == [False, False, True] and new["b"].tolist() == [False, True]
    new = LayerSelector(min_kept=2)(sal, mask, 1)
    assert new["a"].tolist() == [False, True, True] and new["b"].all()
    with pytest.raises(EmptyLayerError, match="at most 3"):
        GlobalSelector(min_kept=1)(sal, mask, 4)
    with pytest.raises(ValueError, match="min_kept"):
        GlobalSelector(min_kept=-1)
