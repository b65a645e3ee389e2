"""Layer-wise OBS: calibration Hessians, the exact (OBC) and blocked (SparseGPT) solvers, and the
LayerwiseOBS pruner, against brute-force least squares and naive loops in float64."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian

from optbrain import masking
from optbrain.curvature.calibration import LayerwiseHessian, calibration_hessians
from optbrain.errors import (
    CalibrationError,
    ShapeMismatchError,
    TargetUnreachableError,
    UnsupportedModuleError,
)
from optbrain.loop import iterative_prune
from optbrain.masking import Mask
from optbrain.paramdict import named_parameters
from optbrain.problem import Problem
from optbrain.pruners import PRESETS
from optbrain.pruners.layerwise import (
    LayerwiseOBS,
    blocked_obs,
    exact_obs,
    global_counts,
    greedy_rows,
    reconstruction_error,
)
from optbrain.schedule import geometric
from optbrain.selection import TargetExceededError

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated(n: int, k: int, seed: int, mix: float = 1.0) -> torch.Tensor:
    """n × k inputs with correlated columns."""
    g = gen(seed)
    A = torch.eye(k, dtype=F64) + mix * torch.randn(k, k, generator=g, dtype=F64) / k**0.5
    return torch.randn(n, k, generator=g, dtype=F64) @ A


def layer_problem(r=6, k=12, n=80, seed=0, mix=1.0):
    X = correlated(n, k, seed, mix)
    W = torch.randn(r, k, generator=gen(seed + 100), dtype=F64)
    return W, X, 2 * X.T @ X / n


def ls_refit(W: torch.Tensor, X: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Brute force: each row's kept weights re-fitted by least squares to the row's outputs."""
    out = torch.zeros_like(W)
    for i in range(W.shape[0]):
        s = kept[i]
        if s.any():
            out[i, s] = torch.linalg.lstsq(X[:, s], X @ W[i]).solution
    return out


def magnitude_prune(W: torch.Tensor, count: int | None = None, nm=None) -> torch.Tensor:
    if nm is not None:
        r, k = W.shape
        groups = W.reshape(r, -1, nm[1]).clone()
        idx = groups.abs().argsort(2)[:, :, : nm[0]]
        return groups.scatter_(2, idx, 0.0).reshape(r, k)
    flat = W.reshape(-1).clone()
    flat[flat.abs().argsort()[:count]] = 0.0
    return flat.reshape(W.shape)


# ----------------------------------------------------------------------------- solvers
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_exact_solver_equals_least_squares_refit_of_its_mask(nm):
    W, X, H = layer_problem()
    target = 31
    sol = exact_obs(W, H, None if nm else target, nm=nm, damping=0.0)
    deleted = ~sol.kept
    assert int(deleted.sum()) == (W.numel() // 2 if nm else target)
    assert torch.all(sol.weight[deleted] == 0)
    torch.testing.assert_close(sol.weight, ls_refit(W, X, sol.kept), rtol=1e-9, atol=1e-9)
    # the reported error is (1/n)‖ΔW X‖²
    direct = float(((W - sol.weight) @ X.T).square().sum()) / X.shape[0]
    assert reconstruction_error(sol.weight - W, H) == pytest.approx(direct, rel=1e-10)


def naive_greedy_row(w: torch.Tensor, H: torch.Tensor, steps: int):
    """Textbook loop: at every step invert H over the surviving set, delete the smallest
    w_j²/(2[H_S⁻¹]_jj), re-fit the survivors by least squares."""
    w = w.clone()
    alive = list(range(len(w)))
    order, losses = [], []
    for _ in range(steps):
        Hinv = torch.linalg.inv(H[alive][:, alive])
        s = w[alive].square() / (2 * Hinv.diagonal())
        j = int(s.argmin())
        q = alive[j]
        w[alive] = w[alive] - Hinv[:, j] * w[q] / Hinv[j, j]
        w[q] = 0.0
        order.append(q)
        losses.append(float(s[j]))
        alive.pop(j)
    return w, order, losses


def test_greedy_rows_equals_naive_loop():
    W, X, H = layer_problem(r=4, k=9, n=60, seed=3)
    counts = torch.tensor([9, 5, 1, 7])
    sol = greedy_rows(W, torch.linalg.inv(H), counts, chunk_bytes=2 * 9 * 9 * 8)  # 2-row chunks
    for i in range(4):
        c = int(counts[i])
        w, order, losses = naive_greedy_row(W[i], H, c)
        assert sol.order[i, :c].tolist() == order
        assert torch.all(sol.order[i, c:] == -1)
        torch.testing.assert_close(
            sol.trace[i, :c], torch.tensor(losses, dtype=F64), rtol=1e-8, atol=1e-12
        )
        torch.testing.assert_close(sol.weight[i], w, rtol=1e-8, atol=1e-10)
        assert int((~sol.kept[i]).sum()) == c


def test_greedy_rows_never_picks_a_deleted_column_when_scores_overflow():
    # float32 weights of 1e20: every w²/[H⁻¹]_jj is +inf; each step must still delete a new column
    k = 5
    W = torch.full((2, k), 1e20, dtype=torch.float32)
    sol = greedy_rows(W, torch.eye(k), torch.tensor([k, 3]))
    assert sorted(sol.order[0].tolist()) == list(range(k))
    assert sorted(sol.order[1, :3].tolist()) == [0, 1, 2] and sol.order[1, 3:].tolist() == [-1] * 2
    assert int((~sol.kept[0]).sum()) == k and int((~sol.kept[1]).sum()) == 3
    assert torch.all(sol.weight[~sol.kept] == 0)


def test_greedy_rows_raises_when_fewer_deletions_are_possible_than_asked():
    W, _, H = layer_problem(r=2, k=8, seed=4)
    Hinv = torch.linalg.inv(H)
    with pytest.raises(TargetUnreachableError, match="row 1.*9 deletions.*8"):
        greedy_rows(W, Hinv, torch.tensor([2, 9]))
    with pytest.raises(TargetUnreachableError, match="row 0.*3 deletions.*2"):
        greedy_rows(W, Hinv, torch.tensor([3, 2]), nm=(1, 4))  # 1 of every 4: at most 2


def test_global_counts_minimise_the_summed_losses():
    g = gen(5)
    inc = torch.rand(3, 4, generator=g, dtype=F64).cumsum(1)  # non-decreasing per row
    for target in range(0, 13):
        counts = global_counts(inc, target)
        assert int(counts.sum()) == target
        cost = float(sum(inc[r, : int(counts[r])].sum() for r in range(3)))
        best = min(
            float(sum(inc[r, : c[r]].sum() for r in range(3)))
            for c in itertools.product(range(5), repeat=3)
            if sum(c) == target
        )
        assert cost == pytest.approx(best, rel=1e-12)
    # a row's steps are taken as a prefix: a cheap later step does not make its costly first
    # step cheap (OBC's losses need not be monotone; the global step uses their running maximum)
    trace = torch.tensor([[5.0, 0.1], [1.0, 2.0]], dtype=F64)
    assert global_counts(trace, 1).tolist() == [0, 1]
    assert global_counts(trace, 3).tolist() == [1, 2]
    # forced (already deleted) steps are always taken, even with huge losses
    counts = global_counts(torch.full((2, 3), 1e9, dtype=F64), 2, torch.tensor([2, 0]))
    assert counts.tolist() == [2, 0]


def naive_sequential(W: torch.Tensor, H: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """SparseGPT's column order without Cholesky or blocks: for each deleted column i (left to
    right) set w_i = 0 and re-fit the columns right of i by least squares, columns left of i
    fixed."""
    W = W.clone()
    k = W.shape[1]
    for r in range(W.shape[0]):
        for i in range(k):
            if kept[r, i]:
                continue
            right = torch.arange(i + 1, k)
            d = torch.zeros(k, dtype=F64)
            d[i] = -W[r, i]
            if len(right):
                d[right] = -torch.linalg.solve(H[right][:, right], H[right, i] * d[i])
            W[r] += d
            W[r, i] = 0.0
    return W


@pytest.mark.parametrize("blocksize,nm", [(4, None), (5, None), (128, None), (8, (2, 4))])
def test_blocked_solver_equals_naive_sequential_least_squares(blocksize, nm):
    W, X, H = layer_problem(r=5, k=12, n=90, seed=1)
    sol = blocked_obs(W, H, None if nm else 30, nm=nm, damping=0.0, blocksize=blocksize)
    assert int((~sol.kept).sum()) == 30
    assert torch.all(sol.weight[~sol.kept] == 0)
    torch.testing.assert_close(sol.weight, naive_sequential(W, H, sol.kept), rtol=1e-9, atol=1e-9)
    # columns are not revisited: never better than the least-squares re-fit of the same mask
    refit = reconstruction_error(ls_refit(W, X, sol.kept) - W, H)
    assert reconstruction_error(sol.weight - W, H) >= refit * (1 - 1e-9)


def test_blocked_solver_is_the_least_squares_refit_when_deletions_lead():
    """Deleting only leading columns leaves every kept column right of every deletion, so the
    column sweep re-fits all of them: the brute-force least-squares solution."""
    W, X, H = layer_problem(r=4, k=10, n=70, seed=2)
    kept = torch.ones_like(W, dtype=torch.bool)
    for r, lead in enumerate([3, 1, 4, 2]):
        kept[r, :lead] = False
    sol = blocked_obs(W, H, 10, kept=kept, damping=0.0, blocksize=4)
    assert torch.equal(sol.kept, kept)
    torch.testing.assert_close(sol.weight, ls_refit(W, X, kept), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("solver", ["exact", "blocked"])
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_reconstruction_error_below_magnitude_pruning(solver, nm):
    W, X, H = layer_problem(r=16, k=64, n=400, seed=7, mix=1.0)
    count = W.numel() // 2
    fn = exact_obs if solver == "exact" else blocked_obs
    kw = {} if solver == "exact" else {"blocksize": 32}
    sol = fn(W, H, None if nm else count, nm=nm, **kw)
    ours = reconstruction_error(sol.weight - W, H)
    mag = reconstruction_error(magnitude_prune(W, count, nm) - W, H)
    assert ours < 0.9 * mag


@pytest.mark.parametrize("solver", [exact_obs, blocked_obs])
def test_nm_masks_have_exactly_n_zeros_per_group(solver):
    W, _, H = layer_problem(r=7, k=24, n=100, seed=4)
    for n, m in [(2, 4), (1, 3), (5, 8)]:
        sol = solver(W, H, nm=(n, m))
        per_group = (~sol.kept).reshape(7, -1, m).sum(2)
        assert torch.all(per_group == n)
        assert torch.all(sol.weight[~sol.kept] == 0)
    with pytest.raises(ShapeMismatchError, match="multiple of M = 5"):
        solver(W, H, nm=(2, 5))
    for bad in [(4, 4), (0, 4), (2,), "2:4", (2.0, 4)]:
        with pytest.raises(ValueError, match="nm must be"):
            solver(W, H, nm=bad)


@pytest.mark.parametrize("solver", [exact_obs, blocked_obs])
def test_already_deleted_entries_stay_deleted(solver):
    W, _, H = layer_problem(r=5, k=12, seed=6)
    kept = torch.rand(W.shape, generator=gen(1)) > 0.3
    W = torch.where(kept, W, 0.0)
    sol = solver(W, H, 40, kept=kept)
    assert not bool((sol.kept & ~kept).any())
    assert int((~sol.kept).sum()) == 40
    with pytest.raises(TargetExceededError):
        solver(W, H, int((~kept).sum()) - 1, kept=kept)


@pytest.mark.parametrize("solver", [exact_obs, blocked_obs])
def test_dead_inputs_are_zeroed_without_nan(solver):
    W, X, _ = layer_problem(r=4, k=8, n=50, seed=8)
    X[:, [2, 5]] = 0.0
    H = 2 * X.T @ X / X.shape[0]
    sol = solver(W, H, 8, damping=0.0)
    assert torch.isfinite(sol.weight).all()
    assert torch.all(sol.weight[:, [2, 5]] == 0)
    assert torch.all(~sol.kept[:, [2, 5]])  # free deletions come first
    # zeroing weights on dead inputs changes no calibration output
    assert reconstruction_error(sol.weight - W, H) == pytest.approx(
        float(((W - sol.weight) @ X.T).square().sum()) / 50, rel=1e-9, abs=1e-12
    )


@pytest.mark.parametrize("solver", [exact_obs, blocked_obs])
def test_singular_hessian_without_damping_falls_back_to_more_damping(solver, caplog):
    W, X, _ = layer_problem(r=3, k=12, n=5, seed=9)  # 5 rows < 12 inputs: H has rank 5
    H = 2 * X.T @ X / 5
    with caplog.at_level("WARNING"):
        sol = solver(W, H, 18, damping=0.0)
    assert sol.damping > 0 and "not positive definite" in caplog.text
    assert torch.isfinite(sol.weight).all() and int((~sol.kept).sum()) == 18


# ----------------------------------------------------------------------------- calibration Hessians
def conv_hessian_oracle(conv: nn.Module, xs: list[torch.Tensor], group: int) -> torch.Tensor:
    """H of one group from the definition: the Hessian of (1/n) Σ (conv output of one output
    channel)² over samples and positions, with respect to that channel's kernel."""
    w0 = conv.weight.detach()[group * (conv.out_channels // conv.groups)]
    fn = F.conv2d if isinstance(conv, nn.Conv2d) else F.conv1d
    cin = conv.in_channels // conv.groups
    x = torch.cat(xs)[:, group * cin : (group + 1) * cin]

    def sq(w):
        y = fn(x, w[None], None, conv.stride, conv.padding, conv.dilation)
        return y.square().sum() / y.numel()

    return hessian(sq)(w0).reshape(w0.numel(), w0.numel())


@pytest.mark.parametrize(
    "conv,shape",
    [
        (nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2), (7, 6)),
        (nn.Conv2d(3, 2, 3, padding="same"), (5, 5)),
        (nn.Conv1d(4, 4, 3, stride=2, padding=1, dilation=2, groups=2), (9,)),
    ],
)
def test_conv_hessian_equals_definition(conv, shape):
    conv = conv.double()
    model = nn.Sequential(conv, nn.Flatten())
    xs = [torch.randn(b, conv.in_channels, *shape, generator=gen(b), dtype=F64) for b in (3, 5)]
    hs = calibration_hessians(model, xs)
    h = hs["0"]
    assert h.H.shape[0] == conv.groups and h.weight == "0.weight"
    for g in range(conv.groups):
        torch.testing.assert_close(h.H[g], conv_hessian_oracle(conv, xs, g), rtol=1e-10, atol=1e-12)


def test_linear_hessian_is_running_mean_over_rows_and_positions():
    model = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    xs = [torch.randn(b, 4, 5, generator=gen(b), dtype=F64) for b in (2, 7, 1)]  # extra dim
    X = torch.cat(xs).reshape(-1, 5)
    hs = calibration_hessians(model, [(x, None) for x in xs], ["0", "2"])
    torch.testing.assert_close(hs["0"].H[0], 2 * X.T @ X / X.shape[0], rtol=1e-12, atol=1e-14)
    assert hs["0"].n == X.shape[0]
    with torch.no_grad():
        Z = torch.tanh(model[0](X))
    torch.testing.assert_close(hs["2"].H[0], 2 * Z.T @ Z / Z.shape[0], rtol=1e-12, atol=1e-14)


class Boom(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("boom")
        return x


def test_hooks_removed_and_modes_restored_even_on_error():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), Boom(), nn.Linear(3, 1)).double()
    model.train()
    xs = [torch.randn(4, 3, dtype=F64) for _ in range(3)]
    with pytest.raises(RuntimeError, match="boom"):
        calibration_hessians(model, xs)
    assert all(not m._forward_hooks for m in model.modules())
    assert all(m.training for m in model.modules())
    calibration_hessians(model, xs)  # third call onwards works
    assert all(not m._forward_hooks for m in model.modules())
    assert all(m.training for m in model.modules())


def test_bad_calibration_is_named():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1)).double()
    with torch.no_grad():
        model[0].bias.fill_(-10.0)  # ReLU kills everything: layer "2" sees only zeros
    x = torch.rand(8, 3, dtype=F64)
    with pytest.raises(CalibrationError, match="'2'.*all zero"):
        calibration_hessians(model, [x])
    with pytest.raises(CalibrationError, match="no calibration input reached layer '0'"):
        calibration_hessians(model, [])
    with pytest.raises(CalibrationError, match="NaN"):
        calibration_hessians(model, [torch.full((2, 3), float("nan"), dtype=F64)])
    with pytest.raises(UnsupportedModuleError, match="'1'"):
        calibration_hessians(model, [x], ["1"])


# ----------------------------------------------------------------------------- the pruner
def mlp_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3))
    model = model.double()
    X = correlated(120, 8, seed + 1)
    Y = torch.randint(0, 3, (120,), generator=gen(seed))
    return Problem(model, nn.CrossEntropyLoss(), [(X[:50], Y[:50]), (X[50:], Y[50:])]), X


@pytest.mark.parametrize("method", ["exact", "blocked"])
def test_pruner_prunes_in_place_and_reports_layer_errors(method):
    problem, X = mlp_problem()
    model = problem.model
    W0 = model[0].weight.detach().clone()
    pruner = LayerwiseOBS(method=method, damping=0.0, blocksize=4)
    mask, info = pruner(problem, sparsity=0.5)
    assert set(mask.names) == {"0.weight", "2.weight", "4.weight"}
    for name in mask.names:
        m = mask[name]
        assert int((~m).sum()) == round(0.5 * m.numel())
        w = dict(model.named_parameters())[name].detach()
        assert torch.all(w[~m] == 0)
    assert info.pruned == mask.pruned() and info.newly_pruned == mask.pruned()
    assert info.predicted_increase == pytest.approx(sum(pruner.last_errors.values()))
    # the first layer's error is the reconstruction error on the calibration inputs
    direct = float(((W0 - model[0].weight.detach()) @ X.T).square().sum()) / X.shape[0]
    assert pruner.last_errors["0.weight"] == pytest.approx(direct, rel=1e-9)
    assert pruner.last_layers["0.weight"]["method"] == method
    if method == "exact":  # the first layer's surviving weights are the least-squares re-fit
        torch.testing.assert_close(
            model[0].weight.detach(), ls_refit(W0, X, mask["0.weight"]), rtol=1e-8, atol=1e-8
        )
    # next call from the attached mask: masks only shrink, targets are totals
    masking.attach(model, mask)
    again, info2 = pruner(problem, sparsity=0.75)
    assert again.is_subset_of(mask) and info2.newly_pruned == again.pruned() - mask.pruned()
    with pytest.raises(TargetExceededError):
        pruner(problem, sparsity=0.2)


def test_pruner_bad_input():
    problem, _ = mlp_problem()
    with pytest.raises(ValueError, match="out of range"):
        LayerwiseOBS()(problem, sparsity=1.5)
    with pytest.raises(UnsupportedModuleError, match=r"0\.bias"):
        LayerwiseOBS()(problem, Mask.ones(problem.model, ["0.weight", "0.bias"]), 0.5)
    with pytest.raises(ValueError, match="N/M = 0.5"):
        LayerwiseOBS(nm=(2, 4))(problem, sparsity=0.3)
    before = copy.deepcopy(problem.model.state_dict())
    with pytest.raises(ShapeMismatchError, match="layer '2' has 12 input columns"):
        LayerwiseOBS(nm=(1, 8))(problem)  # layer '0' (8 columns) fits, layer '2' does not
    for k, v in problem.model.state_dict().items():
        assert torch.equal(v, before[k])  # checked before any layer was changed
    for kw in ({"method": "fast"}, {"damping": -1.0}, {"blocksize": 0}, {"nm": (3, 2)}):
        with pytest.raises(ValueError):
            LayerwiseOBS(**kw)


def test_pruner_nm_on_conv_net_and_scores():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 3)
    ).double()
    x = torch.randn(40, 2, 3, 3, generator=gen(2), dtype=F64)
    problem = Problem(model, nn.CrossEntropyLoss(), (x, torch.zeros(40, dtype=torch.long)))
    other = Problem(copy.deepcopy(model), problem.loss_fn, problem.data)
    unstructured, _ = LayerwiseOBS(method="exact")(other, sparsity=0.5)  # groups: one H each
    assert [int((~unstructured[n]).sum()) for n in ("0.weight", "3.weight")] == [18, 54]
    pruner = LayerwiseOBS(nm=(1, 3), method="blocked")
    mask, info = pruner(problem, sparsity=None)
    for name in mask.names:
        rows = mask[name].reshape(mask[name].shape[0], -1)
        assert torch.all((~rows).reshape(rows.shape[0], -1, 3).sum(2) == 1)
    assert info.sparsity == pytest.approx(1 / 3)
    # scores: w²/(2[H⁻¹]_jj) of the Linear layer from its inputs by hand
    s = LayerwiseOBS(damping=0.0).scores(problem, mask)
    with torch.no_grad():
        Z = model[:3](x)
    Hinv = torch.linalg.inv(2 * Z.T @ Z / 40)
    expect = model[3].weight.detach().square() / (2 * Hinv.diagonal())
    torch.testing.assert_close(s["3.weight"], expect, rtol=1e-8, atol=1e-12)
    assert s["0.weight"].shape == model[0].weight.shape


def two_layer_problem(bias=0.0):
    """Linear(5→2) → ReLU → Linear(2→5): two layers of 10 weights each."""
    model = nn.Sequential(nn.Linear(5, 2), nn.ReLU(), nn.Linear(2, 5)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen(11), dtype=F64))
        model[0].bias.fill_(bias)
    X = correlated(40, 5, 12)
    return Problem(model, nn.MSELoss(), (X, torch.zeros(40, 5, dtype=F64)))


@pytest.mark.parametrize("method", ["exact", "blocked"])
def test_pruner_honours_integer_counts_exactly(method):
    for count in (1, 7, 13, 19):
        problem = two_layer_problem(bias=1.0)
        mask, info = LayerwiseOBS(method=method, blocksize=1)(problem, sparsity=count)
        assert mask.pruned() == count and info.newly_pruned == count
        per_layer = sorted(int((~mask[n]).sum()) for n in mask.names)
        assert per_layer == sorted([count // 2, count - count // 2])  # split by size


@pytest.mark.parametrize("method", ["exact", "blocked"])
def test_pruner_reaches_a_global_target_from_an_uneven_mask(method):
    problem = two_layer_problem(bias=1.0)
    model = problem.model
    start = Mask.ones(model, ["0.weight", "2.weight"])
    start = start.with_pruned({"0.weight": torch.arange(8)})  # 8 of 10, layer 2 untouched
    with torch.no_grad():
        model[0].weight.mul_(start["0.weight"])
    mask, info = LayerwiseOBS(method=method)(problem, start, sparsity=0.5)  # 10 in all: reachable
    assert mask.is_subset_of(start) and mask.pruned() == 10
    assert int((~mask["0.weight"]).sum()) == 8 and int((~mask["2.weight"]).sum()) == 2
    assert torch.all(model[2].weight[~mask["2.weight"]] == 0)
    with pytest.raises(TargetExceededError, match="7 pruned entries.*8 already pruned"):
        LayerwiseOBS(method=method)(problem, start, sparsity=7)


def test_pruner_restores_the_weights_when_a_layer_fails():
    problem = two_layer_problem(bias=-100.0)  # layer '2' sees only zeros after the ReLU
    model = problem.model
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CalibrationError, match="'2'.*all zero"):
        LayerwiseOBS()(problem, sparsity=0.5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    def interrupt(done, total):  # a KeyboardInterrupt after the first layer is written
        if done == 1:
            raise KeyboardInterrupt

    problem = two_layer_problem(bias=1.0)
    before = copy.deepcopy(problem.model.state_dict())
    with pytest.raises(KeyboardInterrupt):
        LayerwiseOBS(progress=interrupt)(problem, sparsity=0.5)
    for k, v in problem.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_iterative_prune_short_run_and_preset():
    problem, _ = mlp_problem(seed=2)
    model = problem.model
    pruner = PRESETS["layerwise_obs"](method="auto")
    assert isinstance(pruner, LayerwiseOBS) and "LayerwiseOBS(method='auto'" in repr(pruner)

    def make_problem(m):
        return Problem(m, problem.loss_fn, problem.data)

    history = iterative_prune(model, pruner, geometric(0.5), rounds=2, make_problem=make_problem)
    assert [r.round for r in history.records] == [0, 1, 2]
    assert history.records[2].sparsity == pytest.approx(0.75, abs=0.01)
    for r in history.records[1:]:
        assert r.predicted_increase > 0 and math.isfinite(r.actual_increase)
    mask = masking.current_mask(model)
    stored = named_parameters(model, trainable_only=False)
    for name in mask.names:
        assert torch.all(stored[name].detach()[~mask[name]] == 0)
    assert pruner.state_dict() == {}


def test_layerwise_hessian_estimator_reads_problem_inputs():
    problem, X = mlp_problem()
    hs = LayerwiseHessian().hessians(problem, ["0"])
    torch.testing.assert_close(hs["0"].H[0], 2 * X.T @ X / 120, rtol=1e-12, atol=1e-14)


def test_sequential_and_parallel_calibration_agree_on_the_first_layer():
    p1, _ = mlp_problem()
    p2 = Problem(copy.deepcopy(p1.model), p1.loss_fn, p1.data)
    m1, _ = LayerwiseOBS(sequential=True)(p1, sparsity=0.5)
    m2, _ = LayerwiseOBS(sequential=False)(p2, sparsity=0.5)
    assert torch.equal(m1["0.weight"], m2["0.weight"])
    assert not torch.equal(p1.model[2].weight, p2.model[2].weight)  # later layers see other inputs


def test_layerwise_obs_leaves_attention_projections_out():
    """nn.MultiheadAttention reads out_proj's weight without calling it: no hook can calibrate
    it, so the default mask does not name it (the pruner runs; the attention weights are listed
    as left out)."""
    import optbrain as ob

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            a, _ = self.attn(x, x, x, need_weights=False)
            return self.fc(a.mean(1))

    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(16, 4, 8), torch.randint(0, 3, (16,))
    pruner = ob.layerwise_obs()
    assert list(pruner.default_mask(model).names) == ["fc.weight"]
    mask, info = pruner(ob.Problem(model, nn.CrossEntropyLoss(), (x, y)), sparsity=0.5)
    assert mask.sparsity() == 0.5 and "attn.out_proj.weight" in info.excluded
