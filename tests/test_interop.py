"""Interoperability with plain PyTorch: ``torch.nn.utils.prune`` and ``state_dict`` round trips."""

from __future__ import annotations

import io

import pytest
import torch
from torch.nn.utils import prune

import cases
from optbrain import masking
from optbrain.curvature import GGNDiagonal
from optbrain.masking import Mask
from optbrain.problem import Problem
from optbrain.pruners import PRESETS, obd
from optbrain.saliency import OBD
from optbrain.selection import GlobalSelector

F64 = torch.float64
CASES = ["mlp_tanh", "conv_max"]


def saliency_of(case: str):
    s = cases.setup(case, "ce_mean")
    problem = Problem(s.model, s.loss_fn, s.batches)
    sal = OBD(GGNDiagonal(dtype=F64))(problem)
    mask = Mask.ones(s.model)
    return s, {k: sal[k] for k in mask.names}, mask


def torch_prune(model, sal: dict, amount):
    """``prune.global_unstructured`` with L1 on the saliencies; returns {name: kept mask}."""
    sites = {}
    for name in sal:
        path, _, attr = name.rpartition(".")
        sites[name] = (model.get_submodule(path), attr)
    prune.global_unstructured(
        list(sites.values()),
        pruning_method=prune.L1Unstructured,
        importance_scores={site: sal[name] for name, site in sites.items()},
        amount=amount,
    )
    return {name: getattr(m, attr + "_mask").bool() for name, (m, attr) in sites.items()}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("amount", [1, 17, 0.3, 0.5])
def test_saliency_as_importance_scores_gives_the_same_pruned_set(case, amount):
    s, sal, mask = saliency_of(case)
    flat = torch.cat([v.reshape(-1) for v in sal.values()])
    assert flat.unique().numel() == flat.numel()  # no ties: both orders are unambiguous
    assert bool((flat >= 0).all())  # L1 ranks |score|: same order for non-negative saliencies
    ours = GlobalSelector()(sal, mask, amount)
    theirs = torch_prune(s.model, sal, amount)
    assert ours == Mask(theirs)


@pytest.mark.parametrize("case", CASES)
def test_torch_increments_match_optbrain_totals(case):
    """torch's ``amount`` on a second call is an increment over the kept entries; optbrain's
    sparsity is a total: the same pruned sets, with the same saliencies."""
    s, sal, mask = saliency_of(case)
    first = GlobalSelector()(sal, mask, 10)
    second = GlobalSelector()(sal, first, 25)
    assert Mask(torch_prune(s.model, sal, 10)) == first
    assert Mask(torch_prune(s.model, sal, 15)) == second


def pruned_model(case: str, preset: str = "obd"):
    s = cases.setup(case, "ce_mean")
    problem = Problem(s.model, s.loss_fn, s.batches)
    pruner = PRESETS[preset]() if preset != "obd" else obd(GGNDiagonal(dtype=F64))
    mask, _ = pruner(problem, sparsity=0.4)
    masking.attach(s.model, mask)
    mask, _ = pruner(problem, sparsity=0.7)
    masking.attach(s.model, mask)
    return s, mask


def fresh(case: str):
    return cases.make_model(case, seed=99)  # another initialisation


def round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def outputs(model, s):
    x = torch.cat([b[0] for b in s.batches])
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("case", CASES)
def test_masked_state_dict_loads_into_a_fresh_model_with_ones_attached(case):
    s, mask = pruned_model(case)
    state = round_trip(s.model.state_dict())
    target = fresh(case)
    assert not torch.equal(outputs(target, s), outputs(s.model, s))
    masking.attach(target, Mask.ones(target))
    target.load_state_dict(state)  # strict: same keys, masks included
    assert masking.current_mask(target) == mask
    assert torch.equal(outputs(target, s), outputs(s.model, s))
    for name in mask.names:
        path, _, attr = name.rpartition(".")
        assert not getattr(target.get_submodule(path), attr)[~mask[name]].any()


@pytest.mark.parametrize("case", CASES)
def test_baked_state_dict_loads_into_a_plain_fresh_model(case):
    s, mask = pruned_model(case, "magnitude")
    expected = outputs(s.model, s)
    plain_keys = list(fresh(case).state_dict())
    removed = masking.detach(s.model, bake=True)
    assert removed == mask
    state = round_trip(s.model.state_dict())
    assert list(state) == plain_keys
    target = fresh(case)
    target.load_state_dict(state)  # strict
    assert torch.equal(outputs(target, s), expected)
    for name in mask.names:
        assert not state[name][~mask[name]].any()
        assert int((state[name] == 0).sum()) >= int((~mask[name]).sum())
