"""Selectors: exact counts, nested and idempotent masks, deterministic ties, input validation."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from optbrain.masking import Mask
from optbrain.selection import (
    GlobalSelector,
    LayerSelector,
    TargetExceededError,
    ThresholdSelector,
    split_target,
    target_count,
)

SHAPES = {"a.weight": (3, 4), "b.weight": (5,), "c.weight": (2, 1, 3)}
TOTAL = sum(math.prod(s) for s in SHAPES.values())  # 23


def full_mask(shapes=SHAPES) -> Mask:
    return Mask({n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()})


def scores(seed: int, shapes=SHAPES, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Distinct random saliencies (continuous draws: ties have probability 0)."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s, generator=g, dtype=dtype) for n, s in shapes.items()}


def flat(d, names=None):
    names = list(SHAPES) if names is None else names
    return torch.cat([torch.as_tensor(d[n]).reshape(-1) for n in names])


def random_mask(seed: int, p_keep: float = 0.7) -> Mask:
    g = torch.Generator().manual_seed(seed)
    return Mask({n: torch.rand(s, generator=g) < p_keep for n, s in SHAPES.items()})


fractions = st.floats(0.0, 1.0, exclude_max=True, allow_nan=False)
seeds = st.integers(0, 10_000)
SELECTORS = {"global": GlobalSelector, "layer": LayerSelector}


# --------------------------------------------------------------------------- target_count
@given(fractions, st.integers(0, 1000))
def test_target_count_of_a_fraction_is_rounded_product(s, total):
    assert target_count(s, total) == round(s * total)


@pytest.mark.parametrize(
    "bad, exc, msg",
    [
        (1.0, ValueError, r"\[0, 1\)"),
        (-0.1, ValueError, r"\[0, 1\)"),
        (float("nan"), ValueError, "out of range"),
        (float("inf"), ValueError, "out of range"),
        ("0.5", TypeError, "float in"),
        (True, TypeError, "float in"),
        (None, ValueError, "needs a sparsity"),
        (TOTAL + 1, ValueError, f"{TOTAL} entries"),
        (TOTAL, ValueError, "as the fraction 1.0 is"),  # the same bound as the fraction
        (-1, ValueError, "out of range"),
    ],
)
@pytest.mark.parametrize("selector", ["global", "layer", "target_count"])
def test_bad_sparsity_values_raise_clear_errors(bad, exc, msg, selector):
    with pytest.raises(exc, match=msg):
        if selector == "target_count":
            target_count(bad, TOTAL)
        else:
            SELECTORS[selector]()(scores(0), full_mask(), bad)


# --------------------------------------------------------------------------- GlobalSelector
@given(fractions, seeds)
def test_global_prunes_exactly_round_s_n_lowest_entries(s, seed):
    sal = scores(seed)
    new = GlobalSelector()(sal, full_mask(), s)
    kept = flat(new)
    assert int((~kept).sum()) == round(s * TOTAL)
    v = flat(sal)
    if kept.any() and (~kept).any():  # every pruned saliency is below every kept one
        assert float(v[~kept].max()) < float(v[kept].min())


@given(st.integers(0, TOTAL - 1), seeds)
def test_global_int_target_is_a_count(n, seed):
    new = GlobalSelector()(scores(seed), full_mask(), n)
    assert new.pruned() == n
    assert set(new.names) == set(SHAPES)
    for name, shape in SHAPES.items():
        assert new[name].shape == shape and new[name].dtype == torch.bool


@given(st.lists(fractions, min_size=2, max_size=6), seeds, st.sampled_from(["global", "layer"]))
def test_masks_are_nested_across_increasing_targets(targets, seed, kind):
    sal = scores(seed)
    sel = SELECTORS[kind]()
    mask = full_mask()
    for t in sorted(targets):
        new = sel(sal, mask, t)
        assert new.is_subset_of(mask)
        # pruning to t from scratch or step by step gives the same mask (fixed saliencies)
        assert new == sel(sal, full_mask(), t)
        mask = new


@given(fractions, seeds, st.sampled_from(["global", "layer"]))
def test_same_target_twice_changes_nothing(s, seed, kind):
    sel = SELECTORS[kind]()
    once = sel(scores(seed), full_mask(), s)
    # even with other saliencies, the second call has nothing left to do
    assert sel(scores(seed + 1), once, s) == once


@given(st.integers(0, TOTAL - 1))
def test_ties_prune_the_lowest_positions_first(n):
    equal = {k: torch.ones(s) for k, s in SHAPES.items()}
    new = GlobalSelector()(equal, full_mask(), n)
    kept = flat(new)
    assert not kept[:n].any() and kept[n:].all()
    assert GlobalSelector()(equal, full_mask(), n) == new  # reproducible


def test_ties_follow_mask_name_order_not_saliency_dict_order():
    names = ["c.weight", "a.weight", "b.weight"]
    mask = full_mask({n: SHAPES[n] for n in names})
    equal = {k: torch.zeros(s) for k, s in SHAPES.items()}  # different insertion order
    new = GlobalSelector()(equal, mask, 7)
    kept = flat(new, names)
    assert not kept[:7].any() and kept[7:].all()


def test_ties_with_distinct_groups_are_broken_by_position():
    sal = {n: torch.zeros(s) for n, s in SHAPES.items()}
    sal["b.weight"][:] = -1.0  # the 5 lowest
    sal["a.weight"].view(-1)[[2, 5, 9]] = -0.5  # next 3, in position order
    new = GlobalSelector()(sal, full_mask(), 7)
    assert not new["b.weight"].any()
    assert (~new["a.weight"]).view(-1).nonzero().view(-1).tolist() == [2, 5]
    assert new["c.weight"].all()


@given(seeds, seeds, fractions)
def test_pruned_entries_are_never_selected_again(mask_seed, sal_seed, extra):
    mask = random_mask(mask_seed)
    already = mask.pruned()
    sal = scores(sal_seed)
    for n in SHAPES:  # make the pruned entries the most attractive ones
        sal[n] = torch.where(mask[n], sal[n], torch.full_like(sal[n], -1.0))
    target = already + round(extra * (TOTAL - already))
    new = GlobalSelector()(sal, mask, target)
    assert new.is_subset_of(mask)
    assert new.pruned() == target
    newly = flat(mask) & ~flat(new)
    assert int(newly.sum()) == target - already
    still = flat(new)
    if newly.any() and still.any():
        v = flat(sal)
        assert float(v[newly].max()) < float(v[still].min())


def test_inf_saliencies_are_selectable():
    sal = {n: torch.full(s, float("inf")) for n, s in SHAPES.items()}
    assert GlobalSelector()(sal, full_mask(), TOTAL - 1).pruned() == TOTAL - 1
    sal["b.weight"][:] = -float("inf")
    assert not GlobalSelector()(sal, full_mask(), 5)["b.weight"].any()


@pytest.mark.parametrize("kind", ["global", "layer"])
def test_asking_for_less_than_already_pruned_raises(kind):
    sel = SELECTORS[kind]()
    pruned = sel(scores(0), full_mask(), 0.5)
    with pytest.raises(TargetExceededError, match="already pruned"):
        sel(scores(0), pruned, 0.2)
    with pytest.raises(ValueError):  # also a ValueError
        sel(scores(0), pruned, 1)
    assert issubclass(TargetExceededError, ValueError)


def test_float64_and_float32_saliencies_give_the_same_selection():
    s64 = scores(3, dtype=torch.float64)
    s32 = {k: v.float() for k, v in s64.items()}
    assert GlobalSelector()(s64, full_mask(), 9) == GlobalSelector()(s32, full_mask(), 9)


# --------------------------------------------------------------------------- LayerSelector
@given(fractions, seeds)
def test_layer_selector_prunes_the_same_fraction_of_every_parameter(s, seed):
    sal = scores(seed)
    new = LayerSelector()(sal, full_mask(), s)
    for n, shape in SHAPES.items():
        size = math.prod(shape)
        pruned = int((~new[n]).sum())
        assert abs(pruned - s * size) <= 1.0, (n, pruned, s * size)
    # the exact rule: the global count, split by size with cumulative rounding, adds up exactly
    assert new.pruned() == target_count(s, TOTAL)
    assert [int((~new[n]).sum()) for n in SHAPES] == split_target(
        [0] * len(SHAPES), [math.prod(v) for v in SHAPES.values()], target_count(s, TOTAL)
    )
    for n in SHAPES:
        k, v = new[n].reshape(-1), sal[n].reshape(-1)
        if k.any() and (~k).any():  # lowest within the parameter
            assert float(v[~k].max()) < float(v[k].min())


def test_layer_selector_follows_a_global_step_that_over_pruned_one_parameter():
    sal = scores(0)
    first = full_mask().with_pruned({"b.weight": [0, 1, 2, 3]})  # 4 of 5: more than its share
    new = LayerSelector()(sal, first, 12)
    assert new.is_subset_of(first) and new.pruned() == 12
    assert int((~new["b.weight"]).sum()) == 4  # keeps its deletions, the others make up the rest
    with pytest.raises(TargetExceededError, match="below the 4 already"):
        LayerSelector()(sal, first, 3)


@given(st.integers(0, TOTAL - 1), seeds)
def test_layer_selector_int_target(n, seed):
    new = LayerSelector()(scores(seed), full_mask(), n)
    for name, shape in SHAPES.items():
        size = math.prod(shape)
        assert abs(int((~new[name]).sum()) - n / TOTAL * size) <= 1.0
    assert new.pruned() == n


def test_layer_selector_ignores_other_parameters_saliency_scale():
    sal = scores(1)
    sal["a.weight"] = sal["a.weight"] * 1e6  # a global selector would spare a.weight entirely
    new = LayerSelector()(sal, full_mask(), 11)  # 11 = entries outside a.weight
    assert int((~new["a.weight"]).sum()) == round(11 / TOTAL * 12)
    assert GlobalSelector()(sal, full_mask(), 11)["a.weight"].all()


# --------------------------------------------------------------------------- ThresholdSelector
@given(seeds, seeds, st.floats(-0.5, 1.5))
def test_threshold_prunes_exactly_the_kept_entries_below_it(mask_seed, sal_seed, thr):
    mask = random_mask(mask_seed)
    sal = scores(sal_seed)
    new = ThresholdSelector(thr)(sal, mask)
    for n in SHAPES:
        expected = mask[n] & ~(sal[n] < thr)
        assert torch.equal(new[n], expected), n


@given(seeds, st.floats(0.0, 1.0), fractions)
def test_threshold_capped_by_sparsity_takes_the_lowest(sal_seed, thr, cap):
    sal = scores(sal_seed)
    new = ThresholdSelector(thr)(sal, full_mask(), cap)
    below = int((flat(sal) < thr).sum())
    assert new.pruned() == min(below, round(cap * TOTAL))
    assert ThresholdSelector(thr)(sal, full_mask()).is_subset_of(new)


def test_threshold_boundary_is_strict():
    sal = {n: torch.full(s, 0.25) for n, s in SHAPES.items()}
    assert ThresholdSelector(0.25)(sal, full_mask()).pruned() == 0
    assert ThresholdSelector(0.2500001)(sal, full_mask()).pruned() == TOTAL


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("sel", [GlobalSelector(), LayerSelector(), ThresholdSelector(0.5)])
def test_nan_saliency_raises(sel):
    sal = scores(0)
    sal["b.weight"][2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sel(sal, full_mask(), 0.3)


@pytest.mark.parametrize("sel", [GlobalSelector(), LayerSelector(), ThresholdSelector(0.5)])
def test_missing_or_misshaped_saliency_raises(sel):
    sal = scores(0)
    del sal["c.weight"]
    with pytest.raises(KeyError, match="c.weight"):
        sel(sal, full_mask(), 0.3)
    sal = scores(0)
    sal["a.weight"] = sal["a.weight"].reshape(-1)
    with pytest.raises(ValueError, match="shape"):
        sel(sal, full_mask(), 0.3)


def test_selection_does_not_modify_inputs():
    sal = scores(5)
    before = {k: v.clone() for k, v in sal.items()}
    mask = random_mask(2)
    mask_before = mask.to_dict() if hasattr(mask, "to_dict") else dict(mask)
    GlobalSelector()(sal, mask, 0.6)
    LayerSelector()(sal, full_mask(), 0.6)
    for k in sal:
        assert torch.equal(sal[k], before[k])
    assert mask == Mask(mask_before)


def test_numpy_and_tensor_numbers_are_accepted_as_targets():
    import numpy as np

    from optbrain.selection import target_count

    assert target_count(np.int64(5), 100) == 5
    assert target_count(np.float32(0.5), 100) == 50
    assert target_count(torch.tensor(0.25), 100) == 25
    with pytest.raises(ValueError, match="needs a sparsity"):
        target_count(None, 100)


def test_split_target_adds_up_exactly_within_bounds():
    assert split_target([0, 0], [10, 10], 7) == [4, 3] and split_target([0, 0], [10, 10], 1) == [
        0,
        1,
    ]
    assert split_target([0, 0, 0], [3, 3, 3], 4) == [1, 2, 1]
    assert split_target([8, 0], [10, 10], 10) == [8, 2]  # the forced part takes more than its share
    rng = random.Random(0)
    for _ in range(300):
        sizes = [rng.randint(0, 12) for _ in range(rng.randint(1, 5))]
        forced = [rng.randint(0, s) for s in sizes]
        for target in range(sum(forced), sum(sizes) + 1):
            q = split_target(forced, sizes, target)
            assert sum(q) == target
            assert all(f <= x <= s for f, x, s in zip(forced, q, sizes))
    with pytest.raises(TargetExceededError, match="below the 3 already"):
        split_target([3, 0], [5, 5], 2)
    with pytest.raises(ValueError, match="exceeds the 10"):
        split_target([0, 0], [5, 5], 11)
