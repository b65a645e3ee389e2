"""Pruner: saliency + selector + update; PruneInfo bookkeeping; the presets on an MLP and a CNN."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import cases
import reference
from optbrain import masking
from optbrain.curvature import ExactHessianDiagonal, GGNDiagonal
from optbrain.masking import Mask
from optbrain.problem import Problem
from optbrain.pruners import METHODS as ob_methods
from optbrain.pruners import PRESETS, PruneInfo, Pruner, magnitude, obd
from optbrain.saliency import OBD, Magnitude
from optbrain.selection import LayerSelector, TargetExceededError

F64 = torch.float64
WEIGHTS = {"mlp_tanh": ["0.weight", "2.weight", "4.weight"], "conv_max": ["0.weight", "5.weight"]}
PRESET_ARGS = {
    "obd": {},
    "magnitude": {},
    "random": {"seed": 3},
    "snip": {"batches": None},
    "obs": {},
    "unit_obs": {},
    "ocd": {},
    "layerwise_obs": {},
    "gamma_obd": {"weight_decay": 0.01},
    "gamma_obs": {"weight_decay": 0.01},
    "esp": {},
    "ebd": {},
    "validation_obd": {},  # + the validation data, given in the test
}
# presets whose selection is weight by weight and whose update only zeroes (the others move the
# kept weights or delete whole cells: tests/test_obs.py, test_ocd.py, test_layerwise.py)
ZEROING_PRESETS = ["obd", "magnitude", "random", "snip"]


def setup(case="mlp_tanh", loss="ce_mean"):
    s = cases.setup(case, loss)
    return s, Problem(s.model, s.loss_fn, s.batches)


def stored(model) -> dict[str, torch.Tensor]:
    """Clean name -> the stored parameter values (the ``original`` when a mask is attached)."""
    from optbrain.paramdict import named_parameters

    return {k: p.detach().clone() for k, p in named_parameters(model, trainable_only=False).items()}


def effective(model) -> dict[str, torch.Tensor]:
    out = {}
    for name in stored(model):
        path, _, attr = name.rpartition(".")
        out[name] = getattr(model.get_submodule(path), attr).detach().clone()
    return out


def manual_prediction(scores, old: Mask, new: Mask) -> tuple[float, float, int]:
    """Sum, max and count of the saliencies of the entries that went from kept to pruned."""
    vals = torch.cat([scores[n].detach().double()[old[n] & ~new[n]].reshape(-1) for n in old.names])
    if vals.numel() == 0:
        return 0.0, 0.0, 0
    return float(vals.sum()), float(vals.max()), vals.numel()


def diagonal_quadratic(correlated: bool = False):
    """nn.Linear + MSE at its exact least-squares minimum; H diagonal unless ``correlated``."""
    n, d, c = 12, 4, 3
    g = torch.Generator().manual_seed(11)
    z = torch.randn(n, d + 1, generator=g, dtype=F64)
    if correlated:
        x = z[:, :d] @ (torch.eye(d, dtype=F64) + 0.9) + 0.5
    else:
        z[:, 0] = 1.0
        x = torch.linalg.qr(z)[0][:, 1:] * torch.tensor([0.5, 1.0, 2.0, 3.5], dtype=F64) * n**0.5
    y = x @ torch.randn(d, c, generator=g, dtype=F64) + 0.4 * torch.randn(
        n, c, generator=g, dtype=F64
    )
    xa = torch.cat([x, torch.ones(n, 1, dtype=F64)], 1)
    theta = torch.linalg.lstsq(xa, y).solution
    model = nn.Linear(d, c).to(F64).eval()
    with torch.no_grad():
        model.weight.copy_(theta[:d].T)
        model.bias.copy_(theta[d])
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    return model, nn.MSELoss(), batches


# --------------------------------------------------------------------------- basic contract
def test_pruner_returns_mask_without_attaching_and_zeroes_deleted_weights():
    s, problem = setup()
    before = stored(s.model)
    mask, info = obd()(problem, sparsity=0.5)
    assert isinstance(mask, Mask) and isinstance(info, PruneInfo)
    assert list(mask.names) == WEIGHTS["mlp_tanh"]  # default: every parameter named *weight
    assert len(masking.current_mask(s.model)) == 0
    assert not any(parametrize.is_parametrized(m) for m in s.model.modules())
    after = stored(s.model)
    assert list(after) == list(before)
    for k in before:
        if k in mask:
            assert torch.equal(after[k], torch.where(mask[k], before[k], 0.0)), k
        else:
            assert torch.equal(after[k], before[k]), k  # biases untouched
    assert info.pruned == round(0.5 * mask.total()) == mask.pruned()
    assert info.newly_pruned == info.pruned
    assert info.total == mask.total() == sum(before[k].numel() for k in mask.names)
    assert info.sparsity == pytest.approx(info.pruned / info.total)
    assert info.per_parameter == {k: (int(mask[k].sum()), mask[k].numel()) for k in mask.names}
    json.dumps(info.to_dict())  # plain data


def test_predicted_increase_is_the_sum_of_the_deleted_saliencies():
    s, problem = setup()
    pruner = obd(GGNDiagonal(dtype=F64), steps=None)  # one step: the paper's OBD
    old = Mask.ones(s.model)
    sal = pruner.scores(problem)
    mask, info = pruner(problem, sparsity=0.4)
    total, biggest, count = manual_prediction(sal, old, mask)
    assert count == info.newly_pruned > 0
    assert info.predicted_increase == pytest.approx(total, rel=1e-12)
    assert info.max_deleted_saliency == pytest.approx(biggest, rel=1e-12)
    # second step from the attached mask: only the newly deleted entries count
    masking.attach(s.model, mask)
    sal2 = pruner.scores(problem)
    mask2, info2 = pruner(problem, sparsity=0.7)
    total2, biggest2, count2 = manual_prediction(sal2, mask, mask2)
    assert count2 == info2.newly_pruned == info2.pruned - info.pruned > 0
    assert info2.predicted_increase == pytest.approx(total2, rel=1e-12)
    assert info2.max_deleted_saliency == pytest.approx(biggest2, rel=1e-12)
    # an unchanged target deletes nothing and predicts nothing
    masking.attach(s.model, mask2)
    mask3, info3 = pruner(problem, sparsity=0.7)
    assert mask3 == mask2
    assert (info3.newly_pruned, info3.predicted_increase, info3.max_deleted_saliency) == (0, 0, 0)


@pytest.mark.parametrize("k", [1, 2, 6])
def test_predicted_increase_equals_actual_on_a_diagonal_quadratic(k):
    model, loss_fn, batches = diagonal_quadratic()
    problem = Problem(model, loss_fn, batches)
    e0 = problem.objective()
    _, info = obd(ExactHessianDiagonal(dtype=F64))(problem, sparsity=k)
    assert info.newly_pruned == k
    actual = problem.objective() - e0
    assert actual > 1e-6
    assert info.predicted_increase == pytest.approx(actual, rel=1e-9)


def test_predicted_increase_single_deletion_exact_even_with_correlated_inputs():
    """One deletion at a quadratic minimum is exact for any H; several are not (cross terms)."""
    model, loss_fn, batches = diagonal_quadratic(correlated=True)
    saved = copy.deepcopy(model.state_dict())
    problem = Problem(model, loss_fn, batches)
    e0 = problem.objective()
    _, info = obd(ExactHessianDiagonal(dtype=F64))(problem, sparsity=1)
    assert info.predicted_increase == pytest.approx(problem.objective() - e0, rel=1e-9)
    model.load_state_dict(saved)
    _, info = obd(ExactHessianDiagonal(dtype=F64))(problem, sparsity=6)
    assert (
        abs(info.predicted_increase - (problem.objective() - e0)) > 1e-3 * info.predicted_increase
    )


def test_obd_preset_prunes_the_lowest_half_h_w_squared_of_an_independent_oracle():
    s, problem = setup("mlp_tanh", "ce_mean")
    ggn = cases.oracle("mlp_tanh", "ce_mean", "ggn")
    w = reference.params_of(s.model)
    sal = {k: 0.5 * ggn[k] * w[k] ** 2 for k in WEIGHTS["mlp_tanh"]}
    flat = torch.cat([v.reshape(-1) for v in sal.values()])
    n = 40
    threshold = flat.sort().values[n - 1]
    mask, _ = obd(steps=None)(problem, sparsity=n)  # one step: the paper's OBD
    for k, v in sal.items():
        assert torch.equal(~mask[k], v <= threshold), k


def test_magnitude_preset_prunes_smallest_abs_weights_globally():
    s, problem = setup("conv_max")
    w = {k: p.detach().abs() for k, p in s.model.named_parameters() if k.endswith("weight")}
    flat = torch.cat([v.reshape(-1) for v in w.values()])
    threshold = flat.sort().values[29]
    mask, _ = magnitude()(problem, sparsity=30)
    for k, v in w.items():
        assert torch.equal(~mask[k], v <= threshold), k


# --------------------------------------------------------------------------- re-pruning
@pytest.mark.parametrize("preset", list(PRESETS))
def test_pruned_weights_stay_zero_when_re_pruning_after_training(preset):
    s, problem = setup("mlp_tanh", "mse_mean")
    extra = {"validation": s.merged()} if ob_methods[preset].needs_validation else {}
    pruner = PRESETS[preset](**PRESET_ARGS[preset], **extra)
    mask1, _ = pruner(problem, sparsity=0.3)
    masking.attach(s.model, mask1)
    opt = torch.optim.SGD(s.model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    s.model.train()
    for _ in range(3):
        for x, y in s.batches:
            opt.zero_grad()
            s.loss_fn(s.model(x), y).backward()
            opt.step()
    s.model.eval()
    mask2, info = pruner(problem, sparsity=0.6)  # mask=None: starts from the attached mask
    assert mask2.is_subset_of(mask1)
    assert info.newly_pruned == mask2.pruned() - mask1.pruned() == info.pruned - mask1.pruned()
    for values in (stored(s.model), effective(s.model)):
        for k in mask2.names:
            assert not values[k][~mask1[k]].any(), k  # old deletions
    st = stored(s.model)
    for k in mask2.names:
        assert not st[k][~mask2[k]].any(), k  # new deletions zeroed in the stored weights
    masking.attach(s.model, mask2)
    assert masking.current_mask(s.model) == mask2


def test_explicit_mask_overrides_the_attached_one_and_bad_targets_raise():
    s, problem = setup()
    pruner = magnitude()
    mask, _ = pruner(problem, sparsity=0.5)
    masking.attach(s.model, mask)
    with pytest.raises(TargetExceededError):
        pruner(problem, sparsity=0.2)
    fresh = Mask.ones(s.model)
    smaller, info = pruner(problem, mask=fresh, sparsity=0.2)
    assert info.pruned == round(0.2 * fresh.total())
    with pytest.raises(ValueError):
        pruner(problem, sparsity=1.0)


def test_problem_params_must_include_the_masked_parameters():
    s = cases.setup("mlp_tanh", "ce_mean")
    problem = Problem(s.model, s.loss_fn, s.batches, ["0.weight"])
    with pytest.raises(KeyError, match="2.weight"):
        magnitude()(problem, sparsity=0.5)
    mask, info = magnitude()(problem, mask=Mask.ones(s.model, ["0.weight"]), sparsity=0.5)
    assert list(mask.names) == ["0.weight"] and info.total == 24


# --------------------------------------------------------------------------- presets
@pytest.mark.parametrize("case", ["mlp_tanh", "conv_max"])
@pytest.mark.parametrize("preset", ZEROING_PRESETS)
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_presets_run_on_mlp_and_cnn(case, preset, scope):
    s, problem = setup(case, "ce_mean")
    pruner = PRESETS[preset](scope=scope, **PRESET_ARGS[preset])
    before = stored(s.model)
    mask, info = pruner(problem, sparsity=0.5)
    assert list(mask.names) == WEIGHTS[case]
    after = stored(s.model)
    for k in mask.names:
        assert torch.equal(after[k], torch.where(mask[k], before[k], 0.0))
        if scope == "layer":
            assert abs(int((~mask[k]).sum()) - 0.5 * mask[k].numel()) <= 1, k
    if scope == "global":
        assert info.pruned == round(0.5 * info.total)
    assert info.predicted_increase >= 0.0
    assert info.max_deleted_saliency >= 0.0
    masking.attach(s.model, mask)
    assert torch.isfinite(torch.tensor(problem.objective()))
    mask2, info2 = pruner(problem, sparsity=0.75)
    assert mask2.is_subset_of(mask) and info2.newly_pruned > 0


def test_preset_configuration_is_passed_through():
    p = obd(GGNDiagonal(dtype=F64), weight_decay=0.1, scope="layer")
    assert isinstance(p.saliency, OBD) and p.saliency.weight_decay == 0.1
    assert isinstance(p.selector, LayerSelector)
    assert isinstance(obd().saliency.curvature, GGNDiagonal)
    assert PRESETS["random"](seed=5).saliency.seed == 5
    assert PRESETS["snip"](batches=None).saliency.batches is None
    assert set(PRESET_ARGS) == set(PRESETS)
    with pytest.raises(ValueError, match="scope"):
        magnitude(scope="unit")
    assert "OBD" in repr(p) and "LayerSelector" in repr(p)


# --------------------------------------------------------------------------- scores
def test_scores_return_saliencies_without_changing_weights():
    s, problem = setup()
    pruner = Pruner(Magnitude())
    before = copy.deepcopy(s.model.state_dict())
    sal = pruner.scores(problem)
    assert list(sal) == WEIGHTS["mlp_tanh"]
    for k in sal:
        torch.testing.assert_close(sal[k], 0.5 * before[k] ** 2, rtol=0, atol=0)
    after = s.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # with a mask attached: the mask's names, pruned entries score 0 (their stored value is 0)
    mask, _ = pruner(problem, sparsity=0.5)
    masking.attach(s.model, Mask({k: v for k, v in mask.items() if k != "4.weight"}))
    sal = pruner.scores(problem)
    assert list(sal) == ["0.weight", "2.weight"]
    assert all(not sal[k][~mask[k]].any() for k in sal)
    sal_all = pruner.scores(problem, Mask.ones(s.model))
    assert list(sal_all) == WEIGHTS["mlp_tanh"]
