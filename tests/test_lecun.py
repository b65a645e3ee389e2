"""LeCunDiagonal: the published recursion (LeCun, Denker & Solla 1989), generalised.

Checked three ways: against a slow unit-by-unit transcription of the recursion
(``reference.lecun_recursion_slow``); against the exact Hessian / GGN diagonal where the recursion
is exact (the output layer; every weight with a single path to the outputs under MSE); and for its
invariants (the Gauss–Newton variant is never negative; unsupported modules are refused by name).
The slow transcription is itself checked against autograd where the recursion must be exact.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import hessian

import cases
import reference
from cases import LOSSES, SEQUENTIAL, assert_diag_close, make_data, make_loss, oracle, setup
from optbrain.curvature import ExactHessianDiagonal, LeCunDiagonal
from optbrain.errors import UnsupportedModuleError
from optbrain.models import LeCunTanh
from optbrain.problem import Problem

F64 = torch.float64
ACTIVATIONS = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "identity": nn.Identity,
    "lecuntanh": LeCunTanh,
}


def lecun(problem: Problem, gauss_newton: bool):
    return LeCunDiagonal(gauss_newton=gauss_newton, dtype=F64).diagonal(problem)


def _seeded(build, seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build().to(F64).eval()


def _dense(model, loss_fn, batches, gauss_newton: bool):
    fn = reference.ggn_diag if gauss_newton else reference.hessian_diag
    return fn(model, loss_fn, batches)


# --------------------------------------------------------------------------- the slow reference


@pytest.mark.parametrize("loss", LOSSES)
def test_reference_boundary_is_the_loss_hessian_diagonal(loss):
    g = torch.Generator().manual_seed(0)
    loss_fn = make_loss(loss)
    for d in (1, 3, 5):
        out = 2 * torch.randn(d, generator=g, dtype=F64)
        y = torch.randint(0, d, ()) if loss.startswith("ce") else torch.randn(d, dtype=F64)
        h = hessian(lambda o, y=y: loss_fn(o[None], y[None]))(out)
        got = reference.loss_hessian_diag_closed_form(loss_fn, out, y)
        torch.testing.assert_close(got, torch.diagonal(h), rtol=1e-12, atol=1e-15)


def _single_path_nets():
    """Nets in which every weight reaches each output unit through at most one unit per layer
    (up to the last hidden layer): under MSE (diagonal loss Hessian) the recursion is exact."""
    nets = {}
    for name, act in ACTIVATIONS.items():
        nets[f"1hidden-{name}"] = (
            lambda act=act: nn.Sequential(nn.Linear(3, 4), act(), nn.Linear(4, 2)),
            (3,),
            2,
        )
    nets["1hidden-tanh-out"] = (
        lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Sigmoid()),
        (3,),
        2,
    )
    nets["linear"] = (lambda: nn.Sequential(nn.Linear(4, 3)), (4,), 3)
    nets["linear-tanh"] = (lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh()), (4,), 3)
    nets["conv-last"] = (  # shared weights, stride, padding: each output sees w once
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Flatten()),
        (2, 5, 5),
        27,
    )
    nets["conv-tanh-last"] = (
        lambda: nn.Sequential(nn.Conv2d(1, 2, 2, stride=1, padding=1), nn.Tanh(), nn.Flatten()),
        (1, 3, 3),
        32,
    )
    return nets


def _pooling_nets():
    """Linear → tanh → Unflatten → (non-overlapping pool or one-channel tiling conv) → Flatten:
    each hidden unit feeds one output, so the first Linear's diagonal is exact under MSE."""
    head = (nn.Linear(3, 2 * 4 * 4), nn.Tanh(), nn.Unflatten(1, (2, 4, 4)))
    return {
        "avgpool": (lambda: nn.Sequential(*head, nn.AvgPool2d(2), nn.Flatten()), (3,), 8),
        "maxpool": (lambda: nn.Sequential(*head, nn.MaxPool2d(2), nn.Flatten()), (3,), 8),
        "conv-tiling": (
            lambda: nn.Sequential(*head, nn.Conv2d(2, 1, 2, stride=2, padding=1), nn.Flatten()),
            (3,),
            9,
        ),
    }


SINGLE_PATH = _single_path_nets()
POOLING = _pooling_nets()


def _build(table, name, loss, seed=0):
    build, in_shape, n_out = table[name]
    model = _seeded(build, seed)
    return model, make_loss(loss), make_data(in_shape, n_out, loss, seed=seed)


@pytest.mark.parametrize("gauss_newton", [False, True])
@pytest.mark.parametrize("loss", ["mse_mean", "mse_sum"])
@pytest.mark.parametrize("net", list(SINGLE_PATH))
def test_reference_recursion_is_exact_on_single_path_nets(net, loss, gauss_newton):
    model, loss_fn, data = _build(SINGLE_PATH, net, loss)
    slow = reference.lecun_recursion_slow(model, loss_fn, data, gauss_newton)
    assert_diag_close(slow, _dense(model, loss_fn, data, gauss_newton), rtol=1e-10)


@pytest.mark.parametrize("gauss_newton", [False, True])
@pytest.mark.parametrize("net", list(POOLING))
def test_reference_pooling_and_conv_backward_rules(net, gauss_newton):
    model, loss_fn, data = _build(POOLING, net, "mse_mean")
    slow = reference.lecun_recursion_slow(model, loss_fn, data, gauss_newton)
    dense = _dense(model, loss_fn, data, gauss_newton)
    first = {k: dense[k] for k in ("0.weight", "0.bias")}
    assert_diag_close({k: slow[k] for k in first}, first, rtol=1e-10)


# --------------------------------------------------------------------------- LeCunDiagonal


@pytest.mark.parametrize("gauss_newton", [False, True], ids=["full", "gn"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("case", SEQUENTIAL)
def test_lecun_equals_the_slow_recursion(case, loss, gauss_newton):
    s = setup(case, loss)
    got = lecun(s.problem(), gauss_newton)
    want = reference.lecun_recursion_slow(s.model, s.loss_fn, s.batches, gauss_newton)
    assert_diag_close(got, want, rtol=1e-10)


def _last_linear(case: str) -> tuple[int, bool]:
    """Index of the last Linear and whether only Identity modules follow it."""
    model = cases.make_model(case)
    last = max(i for i, m in enumerate(model) if isinstance(m, nn.Linear))
    return last, all(isinstance(m, nn.Identity) for m in list(model)[last + 1 :])


# W_ij of the last Linear reaches output i only: exact under MSE, and under CE too unless an
# activation follows it (then the off-diagonal entries of the CE Hessian enter).
_LAST_LAYER_GRID = [
    pytest.param(c, loss, id=f"{c}-{loss}")
    for c in SEQUENTIAL
    for loss in LOSSES
    if loss.startswith("mse") or _last_linear(c)[1]
]


@pytest.mark.parametrize("gauss_newton", [False, True], ids=["full", "gn"])
@pytest.mark.parametrize("case,loss", _LAST_LAYER_GRID)
def test_lecun_is_exact_on_the_last_linear_layer(case, loss, gauss_newton):
    last, _ = _last_linear(case)
    s = setup(case, loss)
    got = lecun(s.problem(), gauss_newton)
    want = oracle(case, loss, "ggn" if gauss_newton else "hessian")
    keys = [f"{last}.weight", f"{last}.bias"]
    assert_diag_close({k: got[k] for k in keys}, {k: want[k] for k in keys})


@pytest.mark.parametrize("gauss_newton", [False, True], ids=["full", "gn"])
@pytest.mark.parametrize("loss", ["mse_mean", "mse_sum"])
@pytest.mark.parametrize("net", list(SINGLE_PATH))
def test_lecun_is_exact_on_single_path_nets_under_mse(net, loss, gauss_newton):
    model, loss_fn, data = _build(SINGLE_PATH, net, loss)
    got = lecun(Problem(model, loss_fn, data), gauss_newton)
    assert_diag_close(got, _dense(model, loss_fn, data, gauss_newton))


@pytest.mark.parametrize("gauss_newton", [False, True], ids=["full", "gn"])
@pytest.mark.parametrize("loss", ["ce_mean", "ce_sum"])
def test_lecun_is_exact_for_a_linear_model_under_cross_entropy(loss, gauss_newton):
    model, loss_fn, data = _build(SINGLE_PATH, "linear", loss)
    got = lecun(Problem(model, loss_fn, data), gauss_newton)
    assert_diag_close(got, _dense(model, loss_fn, data, gauss_newton))


@pytest.mark.parametrize("gauss_newton", [False, True], ids=["full", "gn"])
@pytest.mark.parametrize("net", list(POOLING))
def test_lecun_pooling_and_conv_backward_are_exact_on_single_paths(net, gauss_newton):
    model, loss_fn, data = _build(POOLING, net, "mse_mean")
    try:
        got = lecun(Problem(model, loss_fn, data), gauss_newton)
    except UnsupportedModuleError as exc:
        if "Unflatten" in str(exc):
            pytest.skip("nn.Unflatten is not in the LeCun registry")
        raise
    dense = _dense(model, loss_fn, data, gauss_newton)
    first = {k: dense[k] for k in ("0.weight", "0.bias")}
    assert_diag_close({k: got[k] for k in first}, first)
    slow = reference.lecun_recursion_slow(model, loss_fn, data, gauss_newton)
    assert_diag_close(got, slow, rtol=1e-10)


# --------------------------------------------------------------------------- random nets

_net_spec = st.fixed_dictionaries(
    {
        "widths": st.lists(st.integers(1, 5), min_size=1, max_size=3),
        "acts": st.lists(st.sampled_from(list(ACTIVATIONS)), min_size=3, max_size=3),
        "out_act": st.sampled_from([None, "tanh", "sigmoid"]),
        "n_in": st.integers(1, 4),
        "n_out": st.integers(1, 4),
        "loss": st.sampled_from(LOSSES),
        "scale": st.sampled_from([0.5, 1.0, 2.5]),
        "seed": st.integers(0, 2**16),
    }
)


def _random_net(spec):
    def build():
        layers, prev = [], spec["n_in"]
        for width, act in zip(spec["widths"], spec["acts"]):
            layers += [nn.Linear(prev, width), ACTIVATIONS[act]()]
            prev = width
        layers.append(nn.Linear(prev, spec["n_out"]))
        if spec["out_act"]:
            layers.append(ACTIVATIONS[spec["out_act"]]())
        return nn.Sequential(*layers)

    model = _seeded(build, spec["seed"])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(spec["scale"])
    loss = spec["loss"]
    data = make_data((spec["n_in"],), spec["n_out"], loss, sizes=(3, 2), seed=spec["seed"])
    return model, make_loss(loss), data


@given(_net_spec)
def test_gauss_newton_variant_is_never_negative(spec):
    model, loss_fn, data = _random_net(spec)
    got = lecun(Problem(model, loss_fn, data), True)
    for k, v in got.items():
        assert (v >= 0).all(), f"{k}: {v}"


@given(_net_spec, st.booleans())
def test_lecun_equals_the_slow_recursion_on_random_nets(spec, gauss_newton):
    model, loss_fn, data = _random_net(spec)
    got = lecun(Problem(model, loss_fn, data), gauss_newton)
    want = reference.lecun_recursion_slow(model, loss_fn, data, gauss_newton)
    assert_diag_close(got, want, rtol=1e-10)


# --------------------------------------------------------------------------- unsupported modules


class Cumulative(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, 1)  # a function LeCun's recursion has no rule for


def _unsupported():
    return {
        "custom": (
            nn.Sequential(nn.Linear(3, 4), Cumulative(), nn.Linear(4, 2)),
            (3,),
            2,
            ["cumsum"],
        ),
        "groupnorm": (  # a torch module with parameters and no rule
            nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4), nn.Linear(4, 2)),
            (3,),
            2,
            ["GroupNorm"],
        ),
    }


@pytest.mark.parametrize("name", ["custom", "groupnorm"])
def test_unsupported_modules_are_refused_by_name(name):
    model, in_shape, n_out, type_names = _unsupported()[name]
    model = model.to(F64).eval()
    problem = Problem(model, nn.MSELoss(), make_data(in_shape, n_out, "mse_mean"))
    est = LeCunDiagonal(gauss_newton=True, dtype=F64)  # constructing it is fine
    with pytest.raises(UnsupportedModuleError) as info:
        est.diagonal(problem)
    msg = str(info.value)
    assert any(t in msg for t in type_names), f"message does not name the module: {msg!r}"
    assert "GGNDiagonal" in msg, f"message does not point to a generic estimator: {msg!r}"


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv1d(2, 4, 2, padding="same"),  # asymmetric "same" padding
        lambda: nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2, groups=2),
        lambda: nn.Conv2d(2, 4, (2, 3), padding="same", dilation=(2, 1)),
        lambda: nn.Conv2d(2, 4, 3, stride=(2, 1), padding=(1, 0)),
    ],
)
def test_lecun_equals_exact_hessian_for_one_conv_layer_under_mse(conv):
    """One conv layer under MSE: the output Hessian is (2/d)·I, so the per-connection sum over a
    shared kernel weight (LeCun's rule) is the exact diagonal (no cross-position terms)."""
    torch.manual_seed(0)
    layer = conv().double()
    model = nn.Sequential(layer, nn.Flatten()).double()
    shape = (6, 2, 7) if isinstance(layer, nn.Conv1d) else (6, 2, 5, 6)
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        y = torch.randn_like(model(x))
    problem = Problem(model, nn.MSELoss(), [(x[:4], y[:4]), (x[4:], y[4:])])
    got = LeCunDiagonal(gauss_newton=False, dtype=torch.float64).diagonal(problem)
    want = ExactHessianDiagonal(method="hvp", dtype=torch.float64).diagonal(problem)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12)


def _as_linear(layer: nn.Module, in_shape: tuple[int, ...]) -> nn.Linear:
    """A Linear layer computing flatten(layer(x)) from flatten(x): its matrix is the Jacobian."""
    x = torch.zeros(1, *in_shape, dtype=torch.float64)
    jac = torch.func.jacrev(lambda v: layer(v.reshape(1, *in_shape)).reshape(-1))(x.reshape(-1))
    bias = layer(x).reshape(-1).detach()
    lin = nn.Linear(jac.shape[1], jac.shape[0]).double()
    with torch.no_grad():
        lin.weight.copy_(jac)
        lin.bias.copy_(bias)
    return lin


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("gauss_newton", [True, False])
@pytest.mark.parametrize(
    "middle",
    [
        lambda: nn.Conv1d(3, 2, 2, padding="same"),  # uneven "same" padding, not the first layer
        lambda: nn.Conv1d(3, 2, 4, padding="same", dilation=1),
        lambda: nn.AvgPool1d(2),
        lambda: nn.AvgPool1d(3, stride=2, padding=1),
    ],
)
def test_lecun_through_a_middle_layer_equals_the_same_net_with_its_linear_equivalent(
    middle, gauss_newton
):
    """LeCun's recursion sends Σ_k w_ki²·∂²E/∂a_k² back through a linear layer; a conv or pooling
    layer in the middle must do exactly what its dense (Jacobian) matrix does as a Linear layer."""
    torch.manual_seed(1)
    first, mid = nn.Conv1d(2, 3, 3).double(), middle().double()
    mid_shape = (3, 7)  # output of `first` for inputs of length 9
    out_len = mid(torch.zeros(1, *mid_shape, dtype=torch.float64)).numel()
    last = nn.Linear(out_len, 2).double()
    model = nn.Sequential(first, nn.Tanh(), mid, nn.Flatten(), last)
    twin = nn.Sequential(
        copy.deepcopy(first),
        nn.Tanh(),
        nn.Flatten(),
        _as_linear(mid, mid_shape),
        copy.deepcopy(last),
    )
    x = torch.randn(6, 2, 9, dtype=torch.float64)
    with torch.no_grad():
        y = torch.randn(6, 2, dtype=torch.float64)
        torch.testing.assert_close(model(x), twin(x))
    est = LeCunDiagonal(gauss_newton=gauss_newton, dtype=torch.float64)
    got = est.diagonal(Problem(model, nn.MSELoss(), [(x[:4], y[:4]), (x[4:], y[4:])]))
    want = est.diagonal(Problem(twin, nn.MSELoss(), [(x[:4], y[:4]), (x[4:], y[4:])]))
    for a, b in (("0", "0"), ("4", "4")):
        for attr in ("weight", "bias"):
            torch.testing.assert_close(
                got[f"{a}.{attr}"], want[f"{b}.{attr}"], rtol=1e-10, atol=1e-12
            )


@pytest.mark.parametrize("gauss_newton", [True, False])
def test_tied_weights_sum_over_their_connections(gauss_newton):
    """One matrix used to encode and (transposed) to decode: LeCun's shared-weight rule sums the
    connection terms of both uses (the slow transcription over the same graph)."""
    import reference_graph
    from optbrain.curvature.paths import graph_of

    s = cases.setup("tied", "mse_mean")
    got = LeCunDiagonal(gauss_newton=gauss_newton).diagonal(s.problem())
    slow = reference_graph.lecun_graph_slow(
        graph_of(s.model).module, s.model, s.loss_fn, s.batches, gauss_newton
    )
    cases.assert_diag_close(got, slow)


@pytest.mark.parametrize("act", [nn.SiLU, nn.Mish])
def test_activations_without_a_forward_mode_second_derivative(act):
    """SiLU and Mish have no forward-over-forward derivative in PyTorch: f'' comes from reverse
    mode; the full recursion and the exact Hessian diagonal are exact."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), act(), nn.Linear(6, 3)).double()
    lf, batches = nn.CrossEntropyLoss(), [(x, y)]
    problem = Problem(model, lf, batches)
    assert_diag_close(
        ExactHessianDiagonal().diagonal(problem), reference.hessian_diag(model, lf, batches)
    )
    full = LeCunDiagonal(gauss_newton=False).diagonal(problem)
    if act is nn.SiLU:  # closed-form f', f'' in the slow transcription
        want = reference.lecun_recursion_slow(model, lf, batches, gauss_newton=False)
        assert_diag_close(full, want)
