"""The structured sweep's memory economies must not change a single result.

The sweep (``curvature/backprop.py``) runs tanh/sigmoid in place on the fresh output of the
layer before them, squares a layer input in place once nothing later reads it, hands tanh the
square of its output in LeCun's Gauss–Newton recursion, and releases each forward value once it
has passed it. These tests check that the caller's data, the parameters and every estimate are
exactly what they are without those economies, on models built to defeat them (views, layers
that return their input, in-place activations, a subclass with its own forward).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import reference
from cases import assert_diag_close, make_data, make_loss
from optbrain.curvature import (
    EmpiricalFisherDiagonal,
    ExactHessianDiagonal,
    GGNDiagonal,
    LeCunDiagonal,
    rules,
)
from optbrain.curvature.backprop import _forward
from optbrain.curvature.chain import build_chain
from optbrain.curvature.rules import fusion
from optbrain.errors import UnsupportedModuleError
from optbrain.problem import Problem

F64 = torch.float64


def _seeded(build, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build().to(F64)


# models whose layer inputs alias the data, each other or a value read later in the sweep
ALIASING = {
    "identity_first": (lambda: nn.Sequential(
        nn.Identity(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)
    ), (4,)),
    "dropout_first_identity_after_tanh": (lambda: nn.Sequential(
        nn.Dropout(0.2), nn.Linear(4, 5), nn.Tanh(), nn.Identity(), nn.Linear(5, 3)
    ), (4,)),
    "flatten_first_sigmoid": (lambda: nn.Sequential(
        nn.Flatten(), nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 3)
    ), (2, 3)),
    "tanh_dropout_flatten": (lambda: nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(5, 3), nn.Tanh()
    ), (4,)),
    "identity_between_linears": (lambda: nn.Sequential(
        nn.Linear(4, 5), nn.Identity(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)
    ), (4,)),
    "conv_no_bias": (lambda: nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(2, 3, 2, bias=False), nn.Sigmoid(), nn.Flatten(), nn.Linear(3, 3),
    ), (1, 4, 4)),
    "relu_maxpool": (lambda: nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 3),
    ), (1, 4, 4)),
}  # fmt: skip


def _problem(name: str, loss: str = "mse_mean"):
    build, shape = ALIASING[name]
    model = _seeded(build).train()  # the sweep's eval mode must make dropout the identity
    data = make_data(shape, 3, loss, sizes=(5, 3), seed=1)
    return model, make_loss(loss), data


@pytest.mark.parametrize("loss", ["mse_mean", "ce_sum"])
@pytest.mark.parametrize("name", list(ALIASING))
def test_data_parameters_and_estimates_are_untouched_by_the_economies(name, loss):
    model, loss_fn, data = _problem(name, loss)
    data_before = [(x.clone(), y.clone()) for x, y in data]
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    problem = Problem(model, loss_fn, data)
    with reference.eval_mode(model):
        want = {
            "ggn": reference.ggn_diag(model, loss_fn, data),
            "hessian": reference.hessian_diag(model, loss_fn, data),
            "ef": reference.empirical_fisher_diag(model, loss_fn, data),
            "lecun_gn": reference.lecun_recursion_slow(model, loss_fn, data, True),
            "lecun": reference.lecun_recursion_slow(model, loss_fn, data, False),
        }
    got = {
        "ggn": GGNDiagonal(method="backprop").diagonal(problem),
        "hessian": ExactHessianDiagonal(method="backprop").diagonal(problem),
        "ef": EmpiricalFisherDiagonal(method="backprop").diagonal(problem),
        "lecun_gn": LeCunDiagonal(gauss_newton=True).diagonal(problem),
        "lecun": LeCunDiagonal(gauss_newton=False).diagonal(problem),
    }
    for key in want:
        assert_diag_close(got[key], want[key], rtol=1e-10)
    for (x, y), (x0, y0) in zip(data, data_before):
        assert torch.equal(x, x0) and torch.equal(y, y0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state_before[k]), k
    assert model.training  # modes restored


@pytest.mark.parametrize(
    "act",
    [
        nn.ELU(inplace=True),
        nn.SELU(inplace=True),
        nn.CELU(0.7, inplace=True),
        nn.LeakyReLU(0.1, inplace=True),
        nn.Hardtanh(-0.5, 0.5, inplace=True),
        nn.ReLU6(inplace=True),
        nn.ReLU(inplace=True),
    ],
    ids=lambda a: type(a).__name__,
)
def test_inplace_activations_give_the_results_of_their_out_of_place_twins(act):
    """An activation built with ``inplace=True`` used to overwrite the pre-activation that its
    derivatives are taken at (wrong GGN and LeCun diagonals for ELU/SELU/CELU) and made the
    structured Hessian fail inside ``torch.func``."""
    twin = type(act).__new__(type(act))
    twin.__dict__.update(act.__dict__)
    twin.inplace = False

    def build(a):
        return lambda: nn.Sequential(nn.Linear(4, 6), a, nn.Linear(6, 3))

    loss_fn = make_loss("mse_mean")
    data = make_data((4,), 3, "mse_mean", sizes=(7,), seed=2)
    for x, _ in data:
        x.mul_(3.0)  # reach the negative branches
    results = []
    for a in (act, twin):
        problem = Problem(_seeded(build(a), seed=3), loss_fn, data)
        results.append(
            [
                GGNDiagonal(method="backprop").diagonal(problem),
                ExactHessianDiagonal(method="backprop").diagonal(problem),
                LeCunDiagonal(gauss_newton=True).diagonal(problem),
                LeCunDiagonal(gauss_newton=False).diagonal(problem),
            ]
        )
    for mine, theirs in zip(*results):
        for k in theirs:
            assert torch.equal(mine[k], theirs[k]), k
    assert act.inplace  # the module itself is left as built


def test_tanh_gets_the_square_of_its_output_in_the_gauss_newton_recursion(monkeypatch):
    """The Linear layer after a tanh squares the tanh output in place and the tanh rule scales
    by (1 − y²)² from that square; the result is the published recursion's."""
    rule = rules.rule_for(nn.Tanh())
    calls = []
    original = rule._from_square

    def spy(t, y2):
        calls.append(tuple(y2.shape))
        return original(t, y2)

    monkeypatch.setattr(rule, "_from_square", spy)
    model = _seeded(lambda: nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)
    ))  # fmt: skip
    loss_fn = make_loss("ce_mean")
    data = make_data((4,), 3, "ce_mean", sizes=(5, 4), seed=4)
    got = LeCunDiagonal(gauss_newton=True).diagonal(Problem(model, loss_fn, data))
    assert sorted(calls) == [(4, 5), (4, 6), (5, 5), (5, 6)]  # both tanh layers, both batches
    want = reference.lecun_recursion_slow(model, loss_fn, data, True)
    assert_diag_close(got, want, rtol=1e-10)
    calls.clear()  # the full recursion needs y itself (f'' = −2y(1 − y²))
    LeCunDiagonal(gauss_newton=False).diagonal(Problem(model, loss_fn, data))
    assert calls == []


class DoubledTanh(nn.Tanh):
    def forward(self, x):
        return 2 * torch.tanh(x)


def test_the_forward_runs_in_place_only_stock_activations_on_fresh_outputs():
    x = torch.randn(5, 4, dtype=F64)
    stock = _seeded(lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Identity(), nn.Sigmoid()))
    xs, _ = _forward(build_chain(stock, "test"), x)
    assert xs[2] is xs[1]  # tanh overwrote the Linear output it alone reads
    assert xs[4] is not xs[3]  # sigmoid's input is Identity's, which returns its input as is
    with torch.no_grad():
        assert torch.equal(xs[-1], stock(x))
    own = _seeded(lambda: nn.Sequential(nn.Linear(4, 3), DoubledTanh()))
    xs, _ = _forward(build_chain(own, "test"), x)
    assert xs[2] is not xs[1]
    with torch.no_grad():
        assert torch.equal(xs[-1], own(x))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("classes", [2, 10, 16, 17, 100])
def test_class_probabilities_equal_torch_softmax(classes, dtype):
    """The cross-entropy boundaries take p from ``losses._probabilities``, which composes the
    softmax for few classes on CPU (faster there); it must be torch's softmax to rounding, for
    extreme and infinite logits too."""
    from optbrain.curvature.losses import _probabilities

    g = torch.Generator().manual_seed(classes)
    out = torch.randn(50, classes, generator=g, dtype=dtype) * 30
    out[0] = 1e4
    out[1, 0] = -float("inf")
    out[2, -1] = 8e3
    got, want = _probabilities(out), torch.softmax(out, dim=1)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert torch.allclose(got.sum(1), torch.ones(50, dtype=dtype), atol=10 * tol)


FUSABLE = {
    "mlp_tanh": (lambda: nn.Sequential(
        nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7), nn.Sigmoid(), nn.Linear(7, 4)
    ), (6,)),
    "cnn": (lambda: nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(4, 4, 3, stride=2, padding=(1, 0), dilation=(1, 2), groups=2), nn.Sigmoid(),
        nn.Flatten(), nn.Linear(8, 4),
    ), (2, 8, 12)),
}  # fmt: skip


@pytest.mark.skipif(
    fusion._LINEAR_POINTWISE is None or not torch.backends.mkldnn.is_available(),
    reason="this torch build has no oneDNN fused kernels",
)
@pytest.mark.filterwarnings("ignore:TF32 acceleration")
@pytest.mark.parametrize("loss", ["mse_mean", "ce_mean"])
@pytest.mark.parametrize("name", list(FUSABLE))
def test_fused_layer_and_activation_kernels_change_nothing_but_rounding(name, loss, monkeypatch):
    """In float32 on CPU a Linear/Conv2d followed by tanh or sigmoid runs as one oneDNN kernel;
    every structured estimate must equal the unfused one to float32 rounding, and the fused
    kernels must actually be used."""
    build, shape = FUSABLE[name]
    model = _seeded(build).float()
    data = [(x.float(), y.float() if y.is_floating_point() else y) for x, y in
            make_data(shape, 4, loss, sizes=(6, 5), seed=5)]  # fmt: skip
    problem = Problem(model, make_loss(loss), data)
    used = []
    for attr in ("_LINEAR_POINTWISE", "_CONV_POINTWISE"):
        op = getattr(fusion, attr)
        monkeypatch.setattr(fusion, attr, lambda *a, _op=op, _n=attr: used.append(_n) or _op(*a))
    estimators = [
        LeCunDiagonal(gauss_newton=True),
        LeCunDiagonal(gauss_newton=False),
        GGNDiagonal(method="backprop"),
        ExactHessianDiagonal(method="backprop"),
    ]
    fused = [e.diagonal(problem) for e in estimators]
    assert len(used) >= 2 * len(estimators) * len(data)  # both layer kinds, every batch
    with torch.backends.mkldnn.flags(enabled=False):
        used.clear()
        plain = [e.diagonal(problem) for e in estimators]
        assert used == []
    for a, b in zip(fused, plain):
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=2e-5, atol=1e-6 * b[k].abs().max())
    x = data[0][0]
    xs, _ = _forward(build_chain(model, "test"), x)
    with torch.no_grad():
        torch.testing.assert_close(xs[-1], model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_forward_hooks_are_called_and_what_they_keep_is_left_alone(dtype):
    """A hooked module is called as it is (not fused, not run in place), and a tensor a hook
    kept is never overwritten by the sweep (found by review: a Linear output kept by a hook
    came back as tanh(·)²)."""
    model = _seeded(lambda: nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)
    )).to(dtype)  # fmt: skip
    kept, calls = [], []  # (copy at capture time, the tensor the hook holds)
    model[0].register_forward_hook(lambda m, i, o: kept.append((o.clone(), o)))
    model[1].register_forward_hook(lambda m, i, o: calls.append("tanh"))
    model[3].register_forward_pre_hook(lambda m, i: kept.append((i[0].clone(), i[0])))
    data = [(x.to(dtype), y) for x, y in make_data((4,), 3, "ce_mean", sizes=(5, 4), seed=6)]
    problem = Problem(model, make_loss("ce_mean"), data)
    for est in (LeCunDiagonal(gauss_newton=True), GGNDiagonal(method="backprop")):
        kept.clear()
        calls.clear()
        est.diagonal(problem)
        assert len(calls) >= len(data)  # the hooked tanh ran for every batch
        assert len(kept) >= 2 * len(data)
        for snapshot, held in kept:
            assert torch.equal(snapshot, held)
    from torch.nn.modules.module import register_module_forward_hook

    seen = []
    handle = register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        got = LeCunDiagonal().diagonal(Problem(model, make_loss("ce_mean"), data))
    finally:
        handle.remove()
    assert seen.count("Tanh") >= 2 * len(data) and seen.count("Linear") >= 3 * len(data)
    model._forward_hooks.clear()
    for m in model:
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    want = LeCunDiagonal().diagonal(Problem(model, make_loss("ce_mean"), data))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=0)


def _twice(shared: bool):
    """Linear → Tanh → the same Linear again (one module listed twice), or two copies."""
    first = _seeded(lambda: nn.Linear(4, 4), seed=7)
    second = first if shared else copy.deepcopy(first)
    return nn.Sequential(first, nn.Tanh(), second)


def test_a_module_listed_twice_is_run_twice_and_its_weights_sum_both_uses():
    """``named_children`` hides a repeated module: the chain used to drop its second use, so
    GGNDiagonal() and LeCunDiagonal() described a one-layer net (found in this session)."""
    loss_fn = make_loss("mse_mean")
    data = make_data((4,), 4, "mse_mean", sizes=(6, 3), seed=8)
    tied, untied = _twice(True), _twice(False)
    with reference.eval_mode(tied):
        want = reference.ggn_diag(tied, loss_fn, data)
    assert_diag_close(GGNDiagonal().diagonal(Problem(tied, loss_fn, data)), want, rtol=1e-10)
    with pytest.raises(UnsupportedModuleError, match="tied parameters"):
        GGNDiagonal(method="backprop").diagonal(Problem(tied, loss_fn, data))
    # LeCun's rule for a shared weight: the sum of its connections' diagonals
    got = LeCunDiagonal().diagonal(Problem(tied, loss_fn, data))
    apart = LeCunDiagonal().diagonal(Problem(untied, loss_fn, data))
    for attr in ("weight", "bias"):
        torch.testing.assert_close(got[f"0.{attr}"], apart[f"0.{attr}"] + apart[f"2.{attr}"])


def test_a_failing_fused_kernel_falls_back_to_the_stock_forward(monkeypatch):
    """The oneDNN ops are private: if a torch release changed them, the sweep must fall back."""
    build, shape = FUSABLE["mlp_tanh"]
    model = _seeded(build).float()
    data = [(x.float(), y.float()) for x, y in make_data(shape, 4, "mse_mean", sizes=(6,))]
    problem = Problem(model, make_loss("mse_mean"), data)

    def broken(*args):
        raise TypeError("_linear_pointwise() got an unexpected argument")

    want = LeCunDiagonal().diagonal(problem)
    monkeypatch.setattr(fusion, "_LINEAR_POINTWISE", broken)
    got = LeCunDiagonal().diagonal(problem)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=2e-5, atol=1e-6 * want[k].abs().max())
