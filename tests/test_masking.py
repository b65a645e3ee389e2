"""Tests of optbrain.masking: Mask algebra, attach/detach through parametrize, optimizers."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from optbrain import masking, paramdict
from optbrain.errors import ShapeMismatchError
from optbrain.masking import Mask

FAST = settings(max_examples=30, deadline=None)


def mlp(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def random_mask(model: nn.Module, p_keep: float = 0.6, seed: int = 1, names=None) -> Mask:
    g = torch.Generator().manual_seed(seed)
    params = paramdict.named_parameters(model, names)
    if names is None:
        params = {n: v for n, v in params.items() if n.endswith("weight")}
    return Mask({n: torch.rand(v.shape, generator=g) < p_keep for n, v in params.items()})


def effective(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clean name -> the value the forward pass uses (``module.weight``)."""
    out = {}
    for name in paramdict.named_parameters(model, trainable_only=False):
        path, _, attr = name.rpartition(".")
        module = model.get_submodule(path) if path else model
        out[name] = getattr(module, attr).detach().clone()
    return out


# ------------------------------------------------------------------- strategies
shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)
layouts = st.dictionaries(st.sampled_from(["a.weight", "b.weight", "c.bias"]), shapes, min_size=1)


@st.composite
def mask_and_prune(draw):
    """A random Mask and, per name, a random set of flat indices to prune."""
    layout = draw(layouts)
    masks, prune = {}, {}
    for name, shape in layout.items():
        n = math.prod(shape)
        kept = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        masks[name] = torch.tensor(kept, dtype=torch.bool).reshape(shape)
        if draw(st.booleans()):
            prune[name] = draw(st.lists(st.integers(0, n - 1), max_size=2 * n))
    return Mask(masks), prune


# ------------------------------------------------------------------- Mask algebra
def test_ones_default_names_are_weights_and_skip_frozen_and_biases():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.RNNCell(4, 2), nn.Linear(2, 2))
    model[3].weight.requires_grad_(False)
    m = Mask.ones(model)
    assert m.names == ("0.weight", "2.weight_ih", "2.weight_hh")  # not the LayerNorm gain
    assert m.kept() == m.total() == 12 + 8 + 4 and m.pruned() == 0 and m.sparsity() == 0.0
    chosen = Mask.ones(model, names=["0.bias", "3.weight"])  # explicit names: frozen allowed
    assert chosen.names == ("0.bias", "3.weight")
    assert chosen["3.weight"].shape == (2, 2) and chosen["3.weight"].dtype == torch.bool
    with pytest.raises(KeyError, match="nope"):
        Mask.ones(model, names=["nope"])


def test_from_dict_validates_and_copies():
    src = torch.tensor([1.0, 0.0, 1.0])
    m = Mask.from_dict({"w": src})
    assert m["w"].dtype == torch.bool and m["w"].tolist() == [True, False, True]
    src.zero_()
    assert m.kept() == 2
    b = torch.tensor([True, False])
    m2 = Mask({"w": b})
    b.fill_(False)
    assert m2.kept() == 1
    with pytest.raises(ValueError, match="'w'"):
        Mask.from_dict({"w": torch.tensor([0.0, 0.5])})
    with pytest.raises(ValueError, match="'w'"):
        Mask.from_dict({"w": torch.tensor([2])})
    with pytest.raises(TypeError, match="'w'"):
        Mask.from_dict({"w": [1, 0]})


def test_mask_does_not_expose_its_tensors():
    m = Mask({"w": torch.ones(2, 3, dtype=torch.bool)})
    m["w"].fill_(False)
    m.to_dict()["w"].fill_(False)
    m.state_dict()["w"].fill_(False)
    for t in m.values():
        t.fill_(False)
    assert m.kept() == 6
    with pytest.raises(TypeError):
        m["w"] = torch.zeros(2, 3, dtype=torch.bool)  # type: ignore[index]
    with pytest.raises(TypeError):
        hash(m)


def test_mapping_protocol_and_repr():
    m = Mask({"b": torch.tensor([True, False]), "a": torch.zeros(2, 2, dtype=torch.bool)})
    assert list(m) == ["b", "a"] and len(m) == 2 and "a" in m and "z" not in m
    assert m.total() == 6 and m.kept() == 1 and m.pruned() == 5
    assert m.sparsity() == pytest.approx(5 / 6)
    assert "1/6" in repr(m)
    with pytest.raises(KeyError, match="'z'"):
        m["z"]
    assert Mask().sparsity() == 0.0 and Mask().total() == 0


def test_equality():
    a = Mask({"x": torch.tensor([True, False]), "y": torch.tensor([True])})
    b = Mask({"y": torch.tensor([1]), "x": torch.tensor([1, 0])})
    assert a == b
    assert a != Mask({"x": torch.tensor([True, True]), "y": torch.tensor([True])})
    assert a != Mask({"x": torch.tensor([True, False])})
    assert a != Mask({"x": torch.tensor([[True, False]]), "y": torch.tensor([True])})
    assert a != {"x": torch.tensor([True, False]), "y": torch.tensor([True])}


@FAST
@given(mask_and_prune())
def test_with_pruned_exact_counts(case):
    mask, prune = case
    new = mask.with_pruned(prune)
    expected_pruned = 0
    for name in mask:
        old = mask[name].reshape(-1)
        removed = {i for i in prune.get(name, []) if old[i]}
        expected_pruned += int((~old).sum()) + len(removed)
        # untouched entries keep their state, listed ones are pruned
        flat = new[name].reshape(-1)
        for i in range(old.numel()):
            assert bool(flat[i]) == (bool(old[i]) and i not in set(prune.get(name, [])))
    assert new.pruned() == expected_pruned
    assert new.kept() + new.pruned() == new.total() == mask.total()
    assert new.sparsity() == pytest.approx(expected_pruned / mask.total())
    assert new.is_subset_of(mask)
    assert new.names == mask.names


@FAST
@given(mask_and_prune())
def test_with_pruned_flags_equal_indices_and_masks_only_shrink(case):
    mask, prune = case
    flags = {}
    for name, idx in prune.items():
        f = torch.zeros(mask[name].numel(), dtype=torch.bool)
        f[list(idx)] = True
        flags[name] = f.reshape(mask[name].shape)
    assert mask.with_pruned(flags) == mask.with_pruned(prune)
    assert mask.with_pruned({n: torch.tensor(i, dtype=torch.long) for n, i in prune.items()}) == (
        mask.with_pruned(prune)
    )
    # pruning again (same or other entries) never revives anything; the source is unchanged
    before = mask.to_dict()
    twice = mask.with_pruned(prune).with_pruned(prune)
    assert twice == mask.with_pruned(prune)
    assert Mask(before) == mask
    assert twice.is_subset_of(mask)


@FAST
@given(mask_and_prune(), st.integers(0, 2**16))
def test_intersect_is_logical_and(case, seed):
    a, _ = case
    g = torch.Generator().manual_seed(seed)
    b = Mask({n: torch.rand(a[n].shape, generator=g) < 0.5 for n in a})
    c = a.intersect(b)
    for n in a:
        assert torch.equal(c[n], a[n] & b[n])
    assert c == b.intersect(a) == (a & b)
    assert c.is_subset_of(a) and c.is_subset_of(b)
    assert a.is_subset_of(a)
    assert a.is_subset_of(b) == all(bool((~a[n] | b[n]).all()) for n in a)
    assert a.intersect(a) == a


def test_subset_strictness():
    full = Mask({"w": torch.ones(3, dtype=torch.bool)})
    some = full.with_pruned({"w": [1]})
    assert some.is_subset_of(full) and not full.is_subset_of(some)


def test_layout_mismatch_errors():
    a = Mask({"w": torch.ones(2, 3, dtype=torch.bool)})
    with pytest.raises(KeyError, match="only in other \\['v'\\]"):
        a.intersect(Mask({"w": torch.ones(2, 3, dtype=torch.bool), "v": torch.ones(1)}))
    with pytest.raises(ShapeMismatchError, match="'w'.*\\(2, 3\\).*\\(3, 2\\)"):
        a.intersect(Mask({"w": torch.ones(3, 2, dtype=torch.bool)}))
    with pytest.raises(ShapeMismatchError, match="'w'"):
        a.is_subset_of(Mask({"w": torch.ones(6, dtype=torch.bool)}))
    with pytest.raises(KeyError):
        a.is_subset_of(Mask())


def test_with_pruned_errors():
    m = Mask({"w": torch.ones(2, 3, dtype=torch.bool)})
    with pytest.raises(KeyError, match="'v'"):
        m.with_pruned({"v": [0]})
    with pytest.raises(IndexError, match="'w'.*0\\.\\.5"):
        m.with_pruned({"w": [6]})
    with pytest.raises(IndexError, match="'w'"):
        m.with_pruned({"w": [-1]})
    with pytest.raises(ShapeMismatchError, match="'w'"):
        m.with_pruned({"w": torch.zeros(6, dtype=torch.bool)})
    with pytest.raises(TypeError, match="'w'"):
        m.with_pruned({"w": torch.tensor([0.0])})
    assert m.with_pruned({"w": []}) == m
    assert m.with_pruned({"w": range(3)}).kept() == 3


def test_state_dict_round_trip_through_torch_save():
    m = Mask({"a.weight": torch.rand(3, 4) < 0.5, "b.bias": torch.tensor([True, False])})
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert all(type(t) is torch.Tensor and t.dtype == torch.bool for t in state.values())
    assert Mask.from_state_dict(state) == m
    assert Mask.from_state_dict(state, device="cpu") == m


# ------------------------------------------------------------------- validate
def test_validate_errors_name_the_parameter():
    model = mlp()
    with pytest.raises(ShapeMismatchError, match=r"'2\.weight'.*\(6, 3\).*\(3, 6\)"):
        masking.validate(model, {"2.weight": torch.ones(6, 3, dtype=torch.bool)})
    with pytest.raises(KeyError, match=r"'9\.weight'.*0\.weight"):
        masking.validate(model, {"9.weight": torch.ones(1, dtype=torch.bool)})
    masking.validate(model, Mask.ones(model))
    with pytest.raises(ShapeMismatchError, match=r"'0\.weight'"):
        masking.attach(model, {"0.weight": torch.ones(4, 6, dtype=torch.bool)})
    with pytest.raises(KeyError, match="9.weight"):
        masking.attach(model, {"9.weight": torch.ones(1, dtype=torch.bool)})


def test_failed_attach_changes_nothing():
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    bad = {"0.weight": torch.zeros(6, 4, dtype=torch.bool), "2.weight": torch.ones(1, 1)}
    with pytest.raises(ShapeMismatchError):
        masking.attach(model, bad)
    assert not parametrize.is_parametrized(model[0])
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


# ------------------------------------------------------------------- attach
def test_attach_masks_forward_and_keeps_clean_names():
    model = mlp()
    clean_before = list(paramdict.named_parameters(model))
    p0 = model[0].weight
    original = p0.detach().clone()
    mask = random_mask(model)
    returned = masking.attach(model, mask)
    assert returned == mask
    # same clean names; while attached PyTorch lists a parametrized weight after the bias
    assert sorted(paramdict.named_parameters(model)) == sorted(clean_before)
    raw = dict(model.named_parameters())
    assert raw["0.parametrizations.weight.original"] is p0  # the optimizer's parameter survives
    assert "0.parametrizations.weight.0.mask" in dict(model.named_buffers())
    assert "0.parametrizations.weight.0.mask" in model.state_dict()
    w = model[0].weight
    assert isinstance(w, torch.Tensor) and not isinstance(w, nn.Parameter)
    assert torch.equal(w, original * mask["0.weight"])
    assert torch.equal(p0.detach(), original * mask["0.weight"])  # stored original zeroed too
    x = torch.randn(5, 4, dtype=torch.float64)
    ref = mlp()
    masking.apply_(ref, mask)
    assert torch.equal(model(x), ref(x))
    assert masking.current_mask(model) == mask


def test_pruned_entries_have_zero_gradient_and_cannot_be_revived_by_writes():
    model = mlp()
    mask = random_mask(model)
    masking.attach(model, mask)
    p = model[0].parametrizations.weight.original
    model(torch.randn(7, 4, dtype=torch.float64)).pow(2).sum().backward()
    assert torch.all(p.grad[~mask["0.weight"]] == 0)
    assert torch.any(p.grad[mask["0.weight"]] != 0)
    with torch.no_grad():
        p.fill_(3.0)
    w = model[0].weight
    assert torch.all(w[~mask["0.weight"]] == 0) and torch.all(w[mask["0.weight"]] == 3.0)


@FAST
@given(st.integers(0, 2**16), st.integers(0, 2**16))
def test_attach_is_idempotent_and_intersects(seed_a, seed_b):
    model = mlp()
    a = random_mask(model, seed=seed_a)
    b = random_mask(model, seed=seed_b)
    masking.attach(model, a)
    once = copy.deepcopy(model.state_dict())
    assert masking.attach(model, a) == a  # same mask again: no change
    assert masking.attach(model, Mask.ones(model)) == a  # superset: no change
    superset = Mask({n: a[n] | b[n] for n in a})
    masking.attach(model, superset)
    assert model.state_dict().keys() == once.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in once.items())
    assert masking.current_mask(model) == a
    assert masking.attach(model, b) == a & b  # a different mask: the intersection
    assert masking.current_mask(model) == a & b
    for i in (0, 2):
        chain = model[i].parametrizations.weight
        assert len(chain) == 1  # never stacked
        assert torch.all(model[i].weight[~(a & b)[f"{i}.weight"]] == 0)


def test_attach_partial_names_and_plain_dict():
    model = mlp()
    masking.attach(model, {"2.weight": torch.ones(3, 6)})
    assert masking.current_mask(model).names == ("2.weight",)
    masking.attach(model, {"0.weight": torch.zeros(6, 4, dtype=torch.bool)})
    cur = masking.current_mask(model)
    assert cur.names == ("0.weight", "2.weight")
    assert cur.pruned() == 24
    full = masking.current_mask(model, include_unmasked=True)
    assert set(full.names) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert full.pruned() == 24 and full["0.bias"].all()
    assert masking.current_mask(mlp()) == Mask()


def test_conv_weight_and_linear_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    model = model.double()
    mask = Mask.ones(model, names=["0.weight", "3.bias"]).with_pruned(
        {"0.weight": list(range(0, 54, 2)), "3.bias": [1, 3]}
    )
    ref = copy.deepcopy(model)
    masking.attach(model, mask)
    masking.apply_(ref, mask)
    assert not parametrize.is_parametrized(ref)
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    assert torch.equal(model(x), ref(x))
    assert torch.all(model[3].bias[[1, 3]] == 0) and torch.all(model[3].bias[[0, 2, 4]] != 0)
    assert int((model[0].weight == 0).sum()) == 27
    assert sorted(paramdict.named_parameters(model)) == sorted(paramdict.named_parameters(ref))
    assert masking.current_mask(model) == mask


def test_tied_parameter_is_masked_in_every_use():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    torch.manual_seed(0)
    model = Tied()
    names = list(paramdict.named_parameters(model))
    assert names == ["a.weight", "a.bias", "b.bias"]
    mask = Mask.ones(model).with_pruned({"a.weight": [0, 5, 10, 15]})
    masking.attach(model, mask)
    assert sorted(paramdict.named_parameters(model)) == sorted(names)
    for m in (model.a, model.b):
        assert torch.all(m.weight.diagonal() == 0) and int((m.weight == 0).sum()) == 4
    assert masking.current_mask(model) == mask
    masking.attach(model, mask.with_pruned({"a.weight": [1]}))
    assert model.a.parametrizations.weight[0].mask.sum() == 11
    assert model.b.parametrizations.weight[0].mask.sum() == 11
    with pytest.raises(KeyError, match="b.weight"):
        masking.attach(model, {"b.weight": torch.ones(4, 4)})
    masking.detach(model)
    assert model.a.weight is model.b.weight and int((model.a.weight == 0).sum()) == 5
    assert list(paramdict.named_parameters(model)) == names


def test_foreign_parametrization_is_refused_and_ignored():
    class Double(nn.Module):
        def forward(self, X):
            return 2 * X

    model = mlp()
    parametrize.register_parametrization(model[0], "weight", Double())
    with pytest.raises(ValueError, match="Double"):
        masking.attach(model, Mask.ones(model))
    assert not parametrize.is_parametrized(model[2])  # nothing attached before the error
    assert masking.current_mask(model) == Mask()
    assert masking.detach(model) == Mask()
    assert len(model[0].parametrizations.weight) == 1


def test_mask_buffer_follows_module_conversions():
    model = mlp()
    masking.attach(model, random_mask(model))
    model.float()
    assert model[0].parametrizations.weight[0].mask.dtype == torch.bool
    assert model[0].weight.dtype == torch.float32
    model.to("meta")
    assert model[0].parametrizations.weight[0].mask.device.type == "meta"


# ------------------------------------------------------------------- optimizers
OPTIMIZERS = {
    "sgd_momentum_wd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "adam_wd": lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=1e-1),
}


@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
@pytest.mark.parametrize("optimizer_before_attach", [False, True])
def test_pruned_weights_stay_zero_through_training(make_opt, optimizer_before_attach):
    model = mlp(dtype=torch.float32)
    mask = random_mask(model, p_keep=0.5, seed=3).with_pruned({"2.weight": [0]})
    opt = make_opt(model.parameters()) if optimizer_before_attach else None
    if optimizer_before_attach:  # momentum / Adam state built up on the dense weights first
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
    masking.attach(model, mask)
    if opt is None:
        opt = make_opt(model.parameters())
    start = effective(model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randn(32, 3, generator=g)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        now = effective(model)
        for name in mask:
            assert torch.all(now[name][~mask[name]] == 0), name
    end = effective(model)
    for name in mask:
        assert torch.all(end[name][mask[name]] != start[name][mask[name]]), name
    assert not torch.equal(end["0.bias"], start["0.bias"])
    assert masking.current_mask(model) == mask


# ------------------------------------------------------------------- detach
def test_detach_bake_restores_keys_and_masked_values():
    model = mlp()
    keys = list(model.state_dict())
    params_before = [p for _, p in model.named_parameters()]
    mask = random_mask(model)
    masking.attach(model, mask)
    with torch.no_grad():  # something writes to the stored originals after attaching
        model[0].parametrizations.weight.original.fill_(1.5)
    masked = effective(model)
    assert masking.detach(model, bake=True) == mask
    assert list(model.state_dict()) == keys
    assert type(model[0]) is nn.Linear and not parametrize.is_parametrized(model)
    assert [p for _, p in model.named_parameters()] == params_before  # same objects
    for name, value in model.named_parameters():
        assert torch.equal(value.detach(), masked[name])
    assert torch.all(model[0].weight[~mask["0.weight"]] == 0)
    assert masking.current_mask(model) == Mask()


def test_detach_without_bake_keeps_stored_originals():
    model = mlp()
    keys = list(model.state_dict())
    mask = random_mask(model)
    masking.attach(model, mask)
    with torch.no_grad():
        model[0].parametrizations.weight.original.fill_(1.5)
    stored = model[2].parametrizations.weight.original.detach().clone()
    masking.detach(model, bake=False)
    assert list(model.state_dict()) == keys
    assert torch.all(model[0].weight == 1.5)
    assert torch.equal(model[2].weight.detach(), stored)


def test_apply_zeroes_without_attaching():
    model = mlp()
    before = model[0].weight.detach().clone()
    mask = random_mask(model)
    masking.apply_(model, mask)
    assert not parametrize.is_parametrized(model)
    assert torch.equal(model[0].weight.detach(), before * mask["0.weight"])
    with pytest.raises(ShapeMismatchError, match="0.weight"):
        masking.apply_(model, {"0.weight": torch.ones(4, 6)})


# ------------------------------------------------------------------- state_dict round trip
def test_model_state_dict_round_trips_with_mask_attached():
    model = mlp()
    mask = random_mask(model)
    masking.attach(model, mask)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 4, dtype=torch.float64)).sum().backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    fresh = mlp(seed=7)
    masking.attach(fresh, mask)
    fresh.load_state_dict(state)
    x = torch.randn(5, 4, dtype=torch.float64)
    assert torch.equal(fresh(x), model(x))
    assert masking.current_mask(fresh) == mask

    # a fresh model with an all-kept mask gets the saved mask from the state dict
    other = mlp(seed=8)
    masking.attach(other, Mask.ones(other))
    other.load_state_dict(state)
    assert masking.current_mask(other) == mask
    assert torch.equal(other(x), model(x))


def test_detach_restores_parameter_order_when_weight_and_bias_are_masked():
    model = mlp()
    keys = list(model.state_dict())
    names = list(paramdict.named_parameters(model))
    masking.attach(model, Mask.ones(model, names=["0.weight", "2.weight"]))
    masking.attach(model, Mask.ones(model, names=["2.bias", "0.bias"]).with_pruned({"2.bias": [1]}))
    masking.attach(model, Mask.ones(model, names=["0.weight"]).with_pruned({"0.weight": [0]}))
    assert masking.current_mask(model).pruned() == 2
    masking.detach(model)
    assert list(model.state_dict()) == keys
    assert list(paramdict.named_parameters(model)) == names
    assert model[2].bias[1] == 0 and model[0].weight[0, 0] == 0


def test_detach_on_a_deep_copy_leaves_the_original_masked():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    mask = Mask.ones(model).with_pruned({"0.weight": [0, 5]})
    masking.attach(model, mask)
    twin = copy.deepcopy(model)
    masking.detach(twin, bake=True)
    assert masking.current_mask(model) == mask  # the original keeps its mask and weight property
    assert model[0].weight.shape == (4, 3) and not model[0].weight.reshape(-1)[[0, 5]].any()
    assert not masking.current_mask(twin)
