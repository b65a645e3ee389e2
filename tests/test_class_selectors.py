"""See, Luong & Manning's class-uniform and class-distribution selectors against their
definitions (brute-force rankings written out here)."""

from __future__ import annotations

import pytest
import torch

from optbrain.errors import EmptyLayerError
from optbrain.masking import Mask
from optbrain.selection import (
    ClassDistributionSelector,
    ClassUniformSelector,
    GlobalSelector,
    LayerSelector,
    split_target,
    target_count,
)

SHAPES = {"emb.weight": (6, 4), "enc.w_ih": (8, 3), "enc.w_hh": (8, 2), "out.weight": (5, 2)}
CLASSES = {"emb.weight": "embedding", "enc.w_ih": "encoder", "enc.w_hh": "encoder",
           "out.weight": "softmax"}  # fmt: skip


def weights(seed: int) -> dict[str, torch.Tensor]:
    """Classes on different scales, so a global ranking and a per-class one differ."""
    g = torch.Generator().manual_seed(seed)
    scale = {"emb.weight": 3.0, "enc.w_ih": 0.3, "enc.w_hh": 0.3, "out.weight": 1.0}
    return {
        n: scale[n] * torch.randn(s, generator=g, dtype=torch.float64) for n, s in SHAPES.items()
    }


def full_mask() -> Mask:
    return Mask({n: torch.ones(s, dtype=torch.bool) for n, s in SHAPES.items()})


def partly_pruned(seed: int) -> Mask:
    g = torch.Generator().manual_seed(seed + 100)
    return Mask({n: torch.rand(s, generator=g) < 0.8 for n, s in SHAPES.items()})


def members(cls: str) -> list[str]:
    return [n for n in SHAPES if CLASSES[n] == cls]


def flat(d, names):
    return torch.cat([torch.as_tensor(d[n]).reshape(-1) for n in names])


# --------------------------------------------------------------------------- class-uniform
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8, 0.9])
@pytest.mark.parametrize("start", ["full", "partly pruned"])
def test_class_uniform_deletes_each_classes_share_lowest_first(seed, sparsity, start):
    s = {n: 0.5 * w.square() for n, w in weights(seed).items()}
    mask = full_mask() if start == "full" else partly_pruned(seed)
    new = ClassUniformSelector(CLASSES)(s, mask, sparsity)
    classes = list(dict.fromkeys(CLASSES.values()))
    sizes = [sum(mask[n].numel() for n in members(c)) for c in classes]
    forced = [sum(int((~mask[n]).sum()) for n in members(c)) for c in classes]
    quota = split_target(forced, sizes, target_count(sparsity, mask.total()))
    assert new.pruned() == target_count(sparsity, mask.total())
    for c, q in zip(classes, quota):
        names = members(c)
        kept_before, kept_after = flat(mask, names), flat(new, names)
        assert int((~kept_after).sum()) == q  # the class's share of the total
        assert not (kept_after & ~kept_before).any()  # masks only shrink
        gone = kept_before & ~kept_after
        sc = flat(s, names)
        if gone.any() and kept_after.any():  # lowest saliency first within the class
            assert sc[gone].max() <= sc[kept_after].min()


def test_class_uniform_with_one_class_per_parameter_is_the_layer_selector():
    s = {n: 0.5 * w.square() for n, w in weights(1).items()}
    own = {n: n for n in SHAPES}
    mask = partly_pruned(1)
    assert ClassUniformSelector(own)(s, mask, 0.7) == LayerSelector()(s, mask, 0.7)


def test_class_uniform_differs_from_class_blind_when_scales_differ():
    s = {n: 0.5 * w.square() for n, w in weights(2).items()}
    uniform = ClassUniformSelector(CLASSES)(s, full_mask(), 0.5)
    blind = GlobalSelector()(s, full_mask(), 0.5)
    assert uniform != blind
    assert int((~blind["emb.weight"]).sum()) < 12  # the big embedding weights survive blind


def test_class_uniform_refuses_a_parameter_without_class_and_an_emptied_parameter():
    s = {n: 0.5 * w.square() for n, w in weights(0).items()}
    partial = {k: v for k, v in CLASSES.items() if k != "out.weight"}
    with pytest.raises(KeyError, match="out.weight"):
        ClassUniformSelector(partial)(s, full_mask(), 0.5)
    total = full_mask().total()
    with pytest.raises(EmptyLayerError, match="class"):
        ClassUniformSelector(CLASSES, min_kept=1)(s, full_mask(), total - 1)


# --------------------------------------------------------------------------- class-distribution
def brute_force_distribution(s, mask, spread, sparsity):
    """Delete the kept entries of lowest s_k/ν_c until the target count (the definition)."""
    names = list(SHAPES)
    ratio = torch.cat([s[n].reshape(-1) / spread[CLASSES[n]] for n in names])
    kept = flat(mask, names)
    need = target_count(sparsity, mask.total()) - int((~kept).sum())
    ratio = torch.where(kept, ratio, torch.inf)
    gone = torch.zeros_like(kept)
    gone[torch.sort(ratio, stable=True).indices[:need]] = True
    return kept & ~gone


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sparsity", [0.4, 0.8, 0.95])
def test_class_distribution_is_a_threshold_proportional_to_the_class_spread(seed, sparsity):
    s = {n: 0.5 * w.square() for n, w in weights(seed).items()}
    spread = {"embedding": 2.0, "encoder": 0.05, "softmax": 0.7}
    mask = partly_pruned(seed)
    new = ClassDistributionSelector(CLASSES, spread)(s, mask, sparsity)
    expected = brute_force_distribution(s, mask, spread, sparsity)
    assert torch.equal(flat(new, list(SHAPES)), expected)


@pytest.mark.parametrize("seed", range(3))
def test_for_magnitude_is_see_et_al_rule_abs_w_below_lambda_sigma(seed):
    """|w| < λσ_c with σ_c the class's weight standard deviation (computed here with numpy)."""
    w = weights(seed)
    sigma = {}
    for c in set(CLASSES.values()):
        vals = torch.cat([w[n].reshape(-1) for n in members(c)]).numpy()
        sigma[c] = float(vals.std(ddof=1))
    s = {n: 0.5 * v.square() for n, v in w.items()}
    new = ClassDistributionSelector.for_magnitude(w, CLASSES)(s, full_mask(), 0.6)
    r = torch.cat([w[n].abs().reshape(-1) / sigma[CLASSES[n]] for n in SHAPES])
    kept = flat(new, list(SHAPES))
    assert int((~kept).sum()) == target_count(0.6, full_mask().total())
    assert r[~kept].max() <= r[kept].min()  # one λ separates deleted from kept in every class


def test_class_distribution_default_spread_is_the_std_of_the_kept_saliencies():
    s = {n: 0.5 * w.square() for n, w in weights(3).items()}
    mask = partly_pruned(3)
    spread = {}
    for c in set(CLASSES.values()):
        vals = torch.cat([s[n].reshape(-1)[mask[n].reshape(-1)] for n in members(c)])
        spread[c] = float(vals.std())
    got = ClassDistributionSelector(CLASSES)(s, mask, 0.7)
    assert got == ClassDistributionSelector(CLASSES, spread)(s, mask, 0.7)


def test_class_distribution_with_one_class_is_the_global_selector():
    s = {n: 0.5 * w.square() for n, w in weights(0).items()}
    one = {n: "all" for n in SHAPES}
    assert ClassDistributionSelector(one, {"all": 3.0})(s, full_mask(), 0.8) == GlobalSelector()(
        s, full_mask(), 0.8
    )


def test_class_distribution_refuses_bad_spreads():
    with pytest.raises(ValueError, match="spreads"):
        ClassDistributionSelector(CLASSES, {"embedding": 0.0, "encoder": 1.0, "softmax": 1.0})
    s = {n: 0.5 * w.square() for n, w in weights(0).items()}
    with pytest.raises(KeyError, match="spread"):
        ClassDistributionSelector(CLASSES, {"embedding": 1.0})(s, full_mask(), 0.5)
