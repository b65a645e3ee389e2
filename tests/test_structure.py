"""Physical removal: the smaller model computes what the masked model computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optbrain import structure
from optbrain.cellgraph import UnitRemovalError
from optbrain.cells import cell_mask, cells, layer_chain
from optbrain.errors import EmptyLayerError, ShapeMismatchError
from optbrain.masking import Mask, apply_, attach, current_mask
from optbrain.models import LeCunTanh
from optbrain.models.digits import digits_cnn, digits_mlp

DT = torch.float64


def _build(fn, seed=0, dtype=DT):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = fn().to(dtype)
    g = torch.Generator().manual_seed(seed + 100)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g, dtype=dtype))
            m.running_var.copy_(torch.rand(n, generator=g, dtype=dtype) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g, dtype=dtype))
            m.bias.data.copy_(torch.randn(n, generator=g, dtype=dtype))
    return model.eval()


def _x(shape, n=32, seed=1, dtype=DT):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _kill(model, kill_in: dict[str, list[int]], kill_out: dict[str, list[int]]) -> Mask:
    """Mask that zeroes the fan-in weights (rows) / fan-out weights of the given units."""
    cs = {(c.layer, c.index): c for c in cells(model) if c.kind != "input"}
    names = [n for n, _ in model.named_parameters() if n.endswith("weight")]
    mask = Mask.ones(model, names)
    chosen_in = [cs[(layer, j)] for layer, idx in kill_in.items() for j in idx]
    chosen_out = [cs[(layer, j)] for layer, idx in kill_out.items() for j in idx]
    mask = cell_mask(mask, chosen_in, part="fan_in")
    return cell_mask(mask, chosen_out, part="fan_out")


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


CASES = {
    # name: (builder, input shape, units killed through fan-in, through fan-out, input_shape arg)
    "mlp_tanh": (
        lambda: digits_mlp((12, 8), "tanh", n_in=6, n_out=3),
        (6,),
        {"0": [1, 4], "2": [0]},
        {"0": [7], "2": [5, 6]},
    ),
    "mlp_relu": (
        lambda: digits_mlp((12, 8), "relu", n_in=6, n_out=3),
        (6,),
        {"0": [2, 3, 9]},
        {"2": [1]},
    ),
    "mlp_sigmoid": (
        lambda: digits_mlp((10,), "sigmoid", n_in=5, n_out=2),
        (5,),
        {"0": [0, 9]},
        {"0": [4]},
    ),
    "nested_bn_nobias": (
        lambda: nn.Sequential(
            nn.Sequential(nn.Linear(5, 9, bias=False), nn.BatchNorm1d(9), nn.ReLU()),
            nn.Sequential(nn.Sequential(nn.Linear(9, 6, bias=False), LeCunTanh())),
            nn.Dropout(0.2),
            nn.Linear(6, 3, bias=False),
        ),
        (5,),
        {"0.0": [3, 8], "1.0.0": [2]},
        {"0.0": [0]},
    ),
    # conv 0 feeds a padded conv: only its dead fan-out channels can go
    "digits_cnn": (digits_cnn, (1, 8, 8), {"3": [4, 9]}, {"0": [1, 6], "3": [0]}),
    "conv_conv_bn": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 5, 3),  # no padding: a constant channel gives a constant map
            nn.Tanh(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(5 * 2 * 2, 3),
        ),
        (2, 6, 6),
        {"0": [0, 4], "3": [2]},
        {"0": [5], "3": [3]},
    ),
    "conv1d": (
        lambda: nn.Sequential(
            nn.Conv1d(3, 5, 3),
            nn.Sigmoid(),
            nn.Flatten(),
            nn.Linear(5 * 5, 6),
            nn.Tanh(),
            nn.Linear(6, 2),
        ),
        (3, 7),
        {"0": [1], "3": [0]},
        {"0": [3]},
    ),
}


def _expected_params(model, kept: dict[str, int], biased: dict[str, bool]) -> int:
    """Parameter count with ``kept[path]`` units left in each hidden layer (by hand)."""
    chain = layer_chain(model)
    total, n_in = 0, chain[0].n_in
    for layer in chain:
        m = layer.module
        n_out = kept.get(layer.path, layer.n_out)
        total += n_out * n_in * m.weight[0, 0].numel()  # kernel size (1 for Linear)
        total += n_out * biased[layer.path] + 2 * n_out * len(layer.batchnorms)
        n_in = n_out * (layer.span or 1)
    return total


@pytest.mark.parametrize("name", sorted(CASES))
def test_remove_dead_units_matches_masked_model(name):
    build, shape, kill_in, kill_out = CASES[name]
    model = _build(build)
    mask = _kill(model, kill_in, kill_out)
    attach(model, mask)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _x(shape)
    with torch.no_grad():
        expected = model(x)
        res = structure.remove_dead_units(model, input_shape=shape)
        got = res.model(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    dead = {k: sorted(set(kill_in.get(k, [])) | set(kill_out.get(k, []))) for k in res.kept}
    assert res.removed == {k: v for k, v in dead.items() if v}
    assert res.folded == {k: sorted(v) for k, v in kill_in.items()}
    assert res.unfolded == {}
    assert res.params_before == _n_params(model)
    n_kept = {k: len(v) for k, v in res.kept.items()}
    widths = {layer.path: layer.n_out for layer in layer_chain(model)}
    assert n_kept == {k: widths[k] - len(v) for k, v in dead.items()}
    biased = {layer.path: layer.module.bias is not None for layer in layer_chain(res.model)}
    assert res.params_after == _n_params(res.model) == _expected_params(model, n_kept, biased)
    # a layer without bias gets one exactly when constants were folded into it
    for layer, nxt in zip(layer_chain(model)[:-1], layer_chain(model)[1:]):
        if nxt.module.bias is None:
            assert biased[nxt.path] == (layer.path in res.folded)
    # the original is untouched, still masked and still works (deepcopy shares parametrize's
    # generated classes: detaching the copy must not strip the original's properties)
    assert current_mask(model) == mask
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the returned mask fits the new model; attaching it changes nothing
    attach(res.model, res.mask)
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), expected, rtol=0, atol=1e-10)
    # nothing is dead any more: a second pass is the identity
    again = structure.remove_dead_units(res.model, input_shape=shape)
    assert again.removed == {} and again.params_after == res.params_after


@pytest.mark.parametrize(
    ("build", "shape", "input_shape"),
    [
        (lambda: digits_mlp(seed=3), (64,), None),
        (lambda: digits_mlp((40, 20), "relu", seed=3), (64,), None),
        (lambda: digits_cnn(seed=3), (1, 8, 8), (1, 8, 8)),
    ],
)
def test_digits_nets_after_weight_pruning_float32(build, shape, input_shape):
    """float32 digits nets: 80 % magnitude pruning per layer plus whole rows and columns pruned
    (dead units); outputs agree to 1e-6."""
    model = build().eval()
    weights = {n: p.detach() for n, p in model.named_parameters() if n.endswith("weight")}
    mask = Mask(
        {
            n: w.abs() > w.abs().flatten().kthvalue(int(0.8 * w.numel())).values
            for n, w in weights.items()
        }
    )
    hidden = [c for c in cells(model) if c.kind != "input"]
    mask = cell_mask(mask, hidden[::4], part="fan_in")
    mask = cell_mask(mask, hidden[1::7], part="fan_out")
    attach(model, mask)
    x = _x(shape, n=64, dtype=torch.float32)
    with torch.no_grad():
        res = structure.remove_dead_units(model, input_shape=input_shape)
        torch.testing.assert_close(res.model(x), model(x), rtol=0, atol=1e-6)
    killed = {(c.layer, c.index) for c in hidden[::4] + hidden[1::7]}
    gone = {(layer, j) for layer, idx in res.removed.items() for j in idx}
    left = {(layer, j) for layer, idx in res.unfolded.items() for j in idx}
    assert killed <= gone | left and not gone & left
    assert len(gone) >= len(killed) // 2
    assert res.params_after < res.params_before


def test_dead_units_cascade_to_a_fixed_point():
    model = _build(lambda: digits_mlp((4, 4), "tanh", n_in=3, n_out=2))
    with torch.no_grad():
        model[0].weight[[0, 1]] = 0  # units 0.0, 0.1: dead fan-in (constant, folded)
        model[4].weight[:, 0] = 0  # unit 2.0: dead fan-out
        model[2].weight[2, 2:] = 0  # unit 2.2 hears only 0.0 and 0.1: dead in round 2
        model[2].weight[[1, 3], 3] = 0  # unit 0.3 feeds only 2.0 and 2.2: dead in round 3
    x = _x((3,))
    with torch.no_grad():
        res = structure.remove_dead_units(model)
        torch.testing.assert_close(res.model(x), model(x), rtol=0, atol=1e-12)
    assert res.removed == {"0": [0, 1, 3], "2": [0, 2]}
    assert res.folded == {"0": [0, 1], "2": [2]}
    assert [m.out_features for m in res.model if isinstance(m, nn.Linear)] == [1, 2, 2]
    assert res.kept["0"].tolist() == [2] and res.kept["2"].tolist() == [1, 3]


def test_every_unit_dead_raises():
    model = _build(lambda: digits_mlp((3,), n_in=2, n_out=2))
    with torch.no_grad():
        model[2].weight.zero_()
    with pytest.raises(EmptyLayerError, match="every unit of layer '0'.*dead"):
        structure.remove_dead_units(model)


def test_folding_creates_a_bias_and_handles_zero_batchnorm_scale():
    model = _build(
        lambda: nn.Sequential(
            nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2, bias=False)
        )
    )
    with torch.no_grad():
        model[1].weight[3] = 0  # BatchNorm scale 0: unit 3 outputs tanh(beta_3)
    x = _x((4,))
    with torch.no_grad():
        res = structure.remove_dead_units(model)
        torch.testing.assert_close(res.model(x), model(x), rtol=0, atol=1e-12)
    assert res.folded == {"0": [3]}
    assert res.model[3].bias is not None and res.model[1].num_features == 4
    assert res.model[1].running_mean.shape == (4,)


def test_conv_channels_without_input_shape_stay_and_are_reported():
    model = _build(digits_cnn)
    mask = _kill(model, {"3": [2]}, {"3": [5]})
    x = _x((1, 8, 8))
    with torch.no_grad():
        res = structure.remove_dead_units(model, mask)
        masked = _build(digits_cnn)
        apply_(masked, mask)
        torch.testing.assert_close(res.model(x), masked(x), rtol=0, atol=1e-12)
    assert res.removed == {"3": [5]} and res.unfolded == {"3": [2]}
    # with input_shape it can be folded (Flatten -> Linear sees a constant block)
    res2 = structure.remove_dead_units(model, mask, input_shape=(1, 8, 8))
    assert res2.removed == {"3": [2, 5]}


def test_constant_channel_into_padded_conv_is_not_folded():
    model = _build(digits_cnn)
    mask = _kill(model, {"0": [3]}, {})
    attach(model, mask)
    x = _x((1, 8, 8))
    with torch.no_grad():
        res = structure.remove_dead_units(model, input_shape=(1, 8, 8))
        torch.testing.assert_close(res.model(x), model(x), rtol=0, atol=1e-12)
    assert res.removed == {} and res.unfolded == {"0": [3]}


def test_dead_inputs_only_on_request():
    model = _build(lambda: digits_mlp((5,), n_in=6, n_out=2))
    with torch.no_grad():
        model[0].weight[:, [1, 4]] = 0
    x = _x((6,))
    assert structure.remove_dead_units(model).removed_inputs == []
    res = structure.remove_dead_units(model, inputs=True)
    assert res.removed_inputs == [1, 4] and res.kept_inputs.tolist() == [0, 2, 3, 5]
    with torch.no_grad():
        torch.testing.assert_close(res.model(res.select_inputs(x)), model(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp_tanh", "nested_bn_nobias", "digits_cnn", "conv_conv_bn"])
def test_remove_named_cells_equals_zeroing_their_fan_out(name):
    build, shape, _, _ = CASES[name]
    model = _build(build)
    all_cells = cells(model)
    inputs = [c for c in all_cells if c.kind == "input"]
    hidden = [c for c in all_cells if c.kind != "input"]
    chosen = [inputs[0], *hidden[1::3]] if len(inputs) > 1 else hidden[1::3]
    everything = Mask.ones(model, [n for n, _ in model.named_parameters()])
    masked = _build(build)
    attach(masked, cell_mask(everything, chosen, part="fan_out"))
    x = _x(shape)
    with torch.no_grad():
        res = structure.remove(model, chosen)
        torch.testing.assert_close(res.model(res.select_inputs(x)), masked(x), rtol=0, atol=1e-10)
    assert res.removed_inputs == ([0] if len(inputs) > 1 else [])
    assert res.kept_inputs.tolist() == list(range(len(res.removed_inputs), len(inputs)))
    by_layer: dict[str, list[int]] = {}
    for c in chosen:
        if c.kind == "input":
            continue
        by_layer.setdefault(c.layer, []).append(c.index)
    assert res.removed == by_layer
    # the mapping form gives the same model
    spec = {structure.INPUTS: res.removed_inputs, **by_layer}
    res2 = structure.remove(model, spec)
    for (n1, p1), (n2, p2) in zip(res.model.state_dict().items(), res2.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_inputs_of_a_model_starting_with_flatten():
    build = lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 2))  # noqa: E731
    model = _build(build)
    x = _x((3, 4))
    masked = _build(build)
    with torch.no_grad():
        masked[1].weight[:, [0, 7]] = 0
        res = structure.remove(model, {structure.INPUTS: [0, 7]})
        assert res.flattens_input and res.model[1].in_features == 10
        torch.testing.assert_close(res.model(res.select_inputs(x)), masked(x), rtol=0, atol=1e-12)


def test_remove_slices_an_attached_mask_and_the_given_mask():
    model = _build(lambda: digits_mlp((4,), n_in=3, n_out=2))
    attach(model, Mask.ones(model).with_pruned({"0.weight": [0]}))  # entry (0, 0)
    extra = Mask.ones(model, ["2.weight"]).with_pruned({"2.weight": [5]})  # entry (1, 1)
    res = structure.remove(model, {"0": [2]}, mask=extra)
    assert res.mask["0.weight"].shape == (3, 3) and not res.mask["0.weight"][0, 0]
    assert res.mask["2.weight"].shape == (2, 3) and not res.mask["2.weight"][1, 1]
    assert res.mask.pruned() == 2
    assert res.model[2].weight[1, 1] == 0


def test_remove_bad_requests():
    model = _build(lambda: digits_mlp((4,), n_in=3, n_out=2))
    with pytest.raises(EmptyLayerError, match="every input"):
        structure.remove(model, {structure.INPUTS: [0, 1, 2]})
    with pytest.raises(EmptyLayerError, match="every unit of layer '0'"):
        structure.remove(model, {"0": range(4)})
    with pytest.raises(KeyError, match="last layer"):
        structure.remove(model, {"2": [0]})
    with pytest.raises(KeyError, match="no hidden layer '7'"):
        structure.remove(model, {"7": [0]})
    with pytest.raises(IndexError, match="out of range"):
        structure.remove(model, {"0": [4]})
    with pytest.raises(TypeError, match="Cell"):
        structure.remove(model, [("0", 1)])
    with pytest.raises(ShapeMismatchError, match=r"inputs of shape \(5,\)"):
        structure.remove_dead_units(model, input_shape=(5,))
    with pytest.raises(KeyError, match="unknown parameter"):
        structure.remove_dead_units(model, Mask({"9.weight": torch.ones(2, dtype=torch.bool)}))


class _TwoPaths(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(3, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.a(x)) + self.b(x))


def test_models_the_chain_walker_refused_are_followed_or_name_the_node():
    # two branches added: unit j of a and of b form one group, removed together
    model = _build(_TwoPaths)
    x = _x((3,))
    with torch.no_grad():
        model.out.weight[:, 1] = 0
        res = structure.remove_dead_units(model)
        torch.testing.assert_close(res.model(x), model(x), rtol=0, atol=1e-12)
    assert res.removed == {"a": [1], "b": [1]}
    assert res.model.a.out_features == res.model.b.out_features == res.model.out.in_features == 3
    # a recurrent layer's outputs reach the model output: nothing to remove, inputs are cells
    rnn = nn.Sequential(nn.Linear(3, 4), nn.GRU(4, 4))
    assert structure.remove_dead_units(rnn).removed == {}
    assert structure.remove(rnn, {structure.INPUTS: [0]}).model[0].in_features == 2
    # a grouped convolution blocks its channels, naming the node
    grouped = nn.Sequential(
        nn.Conv1d(2, 4, 1), nn.Conv1d(4, 4, 1, groups=2), nn.Flatten(), nn.Linear(8, 1)
    )
    with pytest.raises(UnitRemovalError, match=r"channel 0 of layer '0'.*groups=2.*node '_1'"):
        structure.remove(grouped, {"0": [0]}, input_shape=(2, 2))
