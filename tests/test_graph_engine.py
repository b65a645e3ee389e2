"""The graph engine: every structured estimator on custom modules (residual, concatenating,
embedding, normalisation, attention, parameters read by ``forward``) equals float64 oracles, and
LeCun's recursion equals a slow dense-Jacobian transcription over the same graph."""

from __future__ import annotations

import copy
import logging
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import reference
import reference_graph
from cases import assert_diag_close
from optbrain import Mask, Problem, attach
from optbrain.curvature import (
    EmpiricalFisherDiagonal,
    ExactHessianDiagonal,
    GGNDiagonal,
    HutchinsonDiagonal,
    LeCunDiagonal,
    MCFisherDiagonal,
    backprop,
    explain,
)
from optbrain.curvature.graph import sweep
from optbrain.curvature.paths import graph_of
from optbrain.errors import UnsupportedModuleError

D = torch.float64


# --------------------------------------------------------------------------- models
class ResMLP(nn.Module):
    """Residual additions, a parameter read by forward, slices, cat, functional activations."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.act = nn.Tanh()
        self.shift = nn.Parameter(0.1 * torch.randn(6))

    def forward(self, x):
        h = torch.tanh(self.l1(x)) + self.shift
        h = h + self.act(self.l2(h))
        h = torch.cat([h[:, :2], h[:, 2:] * 0.5], dim=1)
        return self.l3(F.relu(h) - 0.3 * torch.sigmoid(h))


class InPlace(nn.Module):
    """In-place updates in a custom forward (evaluated out of place by the engine)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.inplace = True  # the oracles (autograd) run the out-of-place twin

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        if self.inplace:
            h += torch.sigmoid(self.l2(h))
            h = h.mul_(0.5)
        else:
            h = (h + torch.sigmoid(self.l2(h))) * 0.5
        return self.l3(F.relu(h, inplace=self.inplace))


class ResCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 2, 3, padding=1)
        self.c2 = nn.Conv2d(2, 2, 3, padding="same")
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = h + torch.sigmoid(self.c2(h))
        return self.fc(self.pool(h).flatten(1))


class Concat(nn.Module):
    """Two branches concatenated; a gated unit through chunk (a tuple-valued node)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 5)
        self.gate = nn.Linear(8, 6)
        self.out = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.cat([torch.tanh(self.a(x)), self.b(x)], -1)
        u, v = self.gate(h).chunk(2, dim=-1)
        return self.out(u * torch.sigmoid(v))


class EmbedMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 4, padding_idx=0)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.emb(x)).mean(1))


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.ln, self.l2 = nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 5)
        self.bn, self.out = nn.BatchNorm1d(5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.ln(self.l1(x)))
        h = h + F.relu(self.bn(self.l2(h)))
        return self.out(h)


class Sequence(nn.Module):
    """Per-position Linear on (N, T, F), samples merged with positions by a reshape, the last
    position selected."""

    def __init__(self):
        super().__init__()
        self.inp, self.mix, self.out = nn.Linear(2, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.shift = nn.Parameter(0.1 * torch.randn(4))

    def forward(self, x):
        h = torch.tanh(self.inp(x))  # N × T × 4
        flat = self.mix(h.reshape(-1, 4)) * self.shift  # (N·T) × 4: samples merged with positions
        h = h + torch.sigmoid(flat.reshape(h.shape))
        return self.out(h[:, -1])


class Block(nn.Module):
    """A transformer block: token and positional embedding, attention (batch_first either
    way, a causal mask), LayerNorm, a GELU MLP, mean pooling."""

    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.emb = nn.Embedding(7, 8)
        self.pos = nn.Parameter(0.1 * torch.randn(4, 8))
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.ln, self.ff, self.out = nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.register_buffer("mask", torch.triu(torch.ones(4, 4, dtype=torch.bool), 1))

    def forward(self, x):
        h = self.emb(x) + self.pos
        q = h if self.attn.batch_first else h.transpose(0, 1)
        a, _ = self.attn(q, q, q, attn_mask=self.mask, need_weights=False)
        a = a if self.attn.batch_first else a.transpose(0, 1)
        h = self.ln(h + a)
        h = h + F.gelu(self.ff(h))
        return self.out(h.mean(1))


class BlockLM(Block):
    """The block as a sequence model: logits for every position, (N, classes, T)."""

    def forward(self, x):
        h = self.emb(x) + self.pos
        a, _ = self.attn(h, h, h, attn_mask=self.mask, need_weights=False)
        h = self.ln(h + a)
        return self.out(h + torch.tanh(self.ff(h))).transpose(1, 2)


class GlueZoo(nn.Module):
    """Shape functions with fast rules: permute, transpose, t, expand, sum (with and without
    keepdim), masked_fill with a broadcast mask, indexing with None / Ellipsis / ints, squeeze,
    unsqueeze, view, movedim (generic rule)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 6), nn.Linear(3, 3), nn.Linear(6, 3)
        self.register_buffer("mask", torch.tensor([True, False, False, True, False, False]))

    def forward(self, x):
        h = torch.tanh(self.a(x)).view(-1, 2, 3)  # N × 2 × 3
        p = h[:, None].permute(0, 2, 3, 1).squeeze(-1)  # a permutation that is not its inverse
        p = p.permute(0, 2, 1).transpose(1, 2)
        s = p.sum(-1, keepdim=True).expand(-1, 2, 3) * 0.1 + p.sum(1)[:, None, :]
        s = torch.sigmoid(self.b(s)).flatten(1).masked_fill(self.mask, 0.0)
        u = s[..., None][:, :, 0].unsqueeze(1).squeeze(1)
        v = torch.movedim(u.view(-1, 2, 3), 1, 2).reshape(-1, 6)
        return self.out(v + u.t().t())


class OwnWeights(nn.Module):
    """Parameters used through F.linear and @ in a custom forward."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 4) / 2)
        self.b = nn.Parameter(0.1 * torch.randn(5))
        self.v = nn.Parameter(torch.randn(5, 3) / 2)

    def forward(self, x):
        return torch.tanh(F.linear(x, self.w, self.b)) @ self.v


CASES = {
    "res_mlp": (ResMLP, (4,), "float"),
    "res_cnn": (ResCNN, (1, 4, 4), "float"),
    "concat": (Concat, (4,), "float"),
    "embed": (EmbedMean, (5,), "index6"),
    "norms": (Norms, (4,), "float"),
    "sequence": (Sequence, (3, 2), "float"),
    "block": (lambda: Block(True), (4,), "index7"),
    "block_tf": (lambda: Block(False), (4,), "index7"),
    "own_weights": (OwnWeights, (4,), "float"),
    "block_lm": (BlockLM, (4,), "index7"),
    "glue_zoo": (GlueZoo, (4,), "float"),
    "in_place": (InPlace, (4,), "float"),
}


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def make(case: str, loss: str, sizes=(5, 3)):
    build, shape, kind = CASES[case]
    with torch.random.fork_rng():
        torch.manual_seed(_seed("model", case))
        model = build().to(D).eval()
        if any(isinstance(m, nn.BatchNorm1d) for m in model.modules()):
            for m in model.modules():
                if isinstance(m, nn.BatchNorm1d):
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.data.normal_()
                    m.bias.data.normal_()
    g = torch.Generator().manual_seed(_seed("data", case, loss))
    n = sum(sizes)
    if kind.startswith("index"):
        x = torch.randint(0, int(kind[5:]), (n, *shape), generator=g)
    else:
        x = torch.randn(n, *shape, generator=g, dtype=D)
    with torch.no_grad():
        out_shape = model(x[:1]).shape[1:]
    if loss.startswith("ce"):
        y = torch.randint(0, 3, (n, *out_shape[1:]), generator=g)  # a class per position
        loss_fn = nn.CrossEntropyLoss(reduction=loss[3:])
    else:
        y = torch.randn(n, *out_shape, generator=g, dtype=D)
        loss_fn = nn.MSELoss(reduction=loss[4:])
    batches, i = [], 0
    for b in sizes:
        batches.append((x[i : i + b], y[i : i + b]))
        i += b
    return model, loss_fn, batches


LOSSES = ("ce_mean", "mse_sum")


def twin(model: nn.Module) -> nn.Module:
    """The model itself, or for in-place forwards an out-of-place copy autograd can handle."""
    if not getattr(model, "inplace", False):
        return model
    out = copy.deepcopy(model)
    out.inplace = False
    return out


# --------------------------------------------------------------------------- oracles
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_ggn_and_empirical_fisher_equal_the_oracles_on_graphs(case, loss):
    model, loss_fn, batches = make(case, loss)
    problem = Problem(model, loss_fn, batches)
    assert GGNDiagonal().path(problem).engine == "graph"
    assert_diag_close(
        GGNDiagonal(method="backprop").diagonal(problem),
        reference.ggn_diag(twin(model), loss_fn, batches),
    )
    assert_diag_close(
        EmpiricalFisherDiagonal(method="backprop").diagonal(problem),
        reference.empirical_fisher_diag(twin(model), loss_fn, batches),
    )


@pytest.mark.parametrize("gauss_newton", [True, False])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_lecun_on_a_graph_equals_the_slow_transcription(case, loss, gauss_newton):
    model, loss_fn, batches = make(case, loss)
    problem = Problem(model, loss_fn, batches)
    est = LeCunDiagonal(gauss_newton=gauss_newton)
    assert est.path(problem).engine == "graph"
    oracle = twin(model)
    slow = reference_graph.lecun_graph_slow(
        graph_of(oracle).module, oracle, loss_fn, batches, gauss_newton
    )
    assert_diag_close(est.diagonal(problem), slow)
    if gauss_newton:
        assert all(bool((v >= 0).all()) for v in est.diagonal(problem).values())


@pytest.mark.parametrize("case", ["res_mlp", "norms", "own_weights"])
def test_exact_hessian_and_hutchinson_on_graphs(case):
    model, loss_fn, batches = make(case, "ce_mean")
    problem = Problem(model, loss_fn, batches)
    assert_diag_close(
        ExactHessianDiagonal().diagonal(problem), reference.hessian_diag(model, loss_fn, batches)
    )
    h = HutchinsonDiagonal(samples=4, seed=0).diagonal(problem)
    assert set(h) == set(problem.parameters())


def test_graph_sweep_equals_the_chain_sweep_on_a_sequential():
    """The same model through both engines, every mode (MC with the same draws)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    model = model.to(D).eval()
    _, loss_fn, batches = make("res_mlp", "ce_mean")
    problem = Problem(model, loss_fn, batches)
    graph = graph_of(model)
    assert graph.is_chain()
    for mode in ("lecun", "lecun_gn", "ggn", "ef", "mc"):
        opts = {"samples": 3} if mode == "mc" else {}
        a = sweep.run(
            problem, graph, mode, estimator="t", wanted=problem.parameters(),
            generator=torch.Generator().manual_seed(1), **opts,
        )  # fmt: skip
        b = backprop.run(
            problem, mode, estimator="t", generator=torch.Generator().manual_seed(1), **opts
        )
        assert_diag_close(a, b)


def test_masks_attached_to_a_graph_model():
    """Derivatives are taken with respect to the stored weights of w ⊙ m."""
    model, loss_fn, batches = make("block", "ce_mean")
    names = ["attn.in_proj_weight", "ff.weight", "emb.weight"]
    g = torch.Generator().manual_seed(3)
    masks = {n: torch.rand(p.shape, generator=g) > 0.3 for n, p in model.named_parameters()
             if n in names}  # fmt: skip
    effective = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in effective.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    attach(model, Mask(masks))
    problem = Problem(model, loss_fn, batches)
    assert GGNDiagonal().path(problem).engine == "graph"
    ref = reference.ggn_diag(effective, loss_fn, batches)
    ref = {k: v * masks[k] if k in masks else v for k, v in ref.items()}
    out = GGNDiagonal().diagonal(problem)
    assert_diag_close({k: out[k] for k in ref}, ref)
    lecun = LeCunDiagonal().diagonal(problem)
    slow = reference_graph.lecun_graph_slow(
        graph_of(effective).module, effective, loss_fn, batches, True
    )
    slow = {k: v * masks[k] if k in masks else v for k, v in slow.items()}
    assert_diag_close({k: lecun[k] for k in slow}, slow)


def test_unequal_batches_give_the_same_result():
    model, loss_fn, batches = make("res_mlp", "ce_sum", sizes=(1, 6, 1))
    merged = [(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))]
    for est in (GGNDiagonal(), LeCunDiagonal(), EmpiricalFisherDiagonal()):
        assert_diag_close(
            est.diagonal(Problem(model, loss_fn, batches)),
            est.diagonal(Problem(model, loss_fn, merged)),
        )


@pytest.mark.slow
def test_mc_fisher_on_a_graph_converges_to_the_ggn():
    model, loss_fn, batches = make("concat", "ce_mean")
    problem = Problem(model, loss_fn, batches)
    mc = MCFisherDiagonal(samples=4000, seed=0).diagonal(problem)
    ggn = reference.ggn_diag(model, loss_fn, batches)
    for k in ggn:
        torch.testing.assert_close(mc[k], ggn[k], rtol=0.15, atol=0.02 * float(ggn[k].abs().max()))


# --------------------------------------------------------------------------- paths and errors
def test_explain_names_the_engine_of_every_estimator():
    model, loss_fn, batches = make("res_mlp", "ce_mean")
    paths = explain(Problem(model, loss_fn, batches))
    assert paths["ggn"].engine == paths["lecun"].engine == "graph"
    assert paths["hessian"].engine == "generic" and "second derivatives" in paths["hessian"].reason
    seq = nn.Sequential(nn.Linear(4, 3)).to(D)
    assert explain(Problem(seq, loss_fn, batches))["ggn"].engine == "chain"


def test_engine_of_finds_the_estimator_inside_a_pruner():
    from optbrain.curvature.paths import engine_of
    from optbrain.pruners import make as make_pruner

    model, loss_fn, batches = make("res_mlp", "ce_mean")
    problem = Problem(model, loss_fn, batches)
    assert engine_of(make_pruner("obd", 0), problem).engine == "graph"
    assert engine_of(make_pruner("magnitude", 0), problem) is None


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 3)

    def forward(self, x):
        h = self.l(x)
        for _ in range(x.shape[1] - 3):  # a loop over a shape: torch.fx cannot trace it
            h = torch.tanh(h)
        return h


def test_untraceable_model_falls_back_and_says_why(caplog):
    model = _Branchy().to(D)
    _, loss_fn, batches = make("res_mlp", "ce_mean")
    problem = Problem(model, loss_fn, batches)
    path = GGNDiagonal().path(problem)
    assert path.engine == "generic" and "cannot trace" in path.reason
    with caplog.at_level(logging.INFO, logger="optbrain.curvature.structured"):
        out = GGNDiagonal().diagonal(problem)
    assert "torch.func path" in caplog.text and "cannot trace" in caplog.text
    assert_diag_close(out, reference.ggn_diag(model, loss_fn, batches))
    with pytest.raises(UnsupportedModuleError, match="cannot trace"):
        LeCunDiagonal().diagonal(problem)


class _Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(2, 4)  # a torch module with parameters and no rule
        self.l = nn.Linear(4, 3)

    def forward(self, x):
        return self.l(self.norm(x))


def test_module_without_rule_takes_the_generic_path_named():
    model = _Unknown().to(D)
    _, loss_fn, batches = make("res_mlp", "ce_mean")
    problem = Problem(model, loss_fn, batches)
    path = GGNDiagonal().path(problem)
    assert path.engine == "generic" and "GroupNorm" in path.reason
    assert_diag_close(GGNDiagonal().diagonal(problem), reference.ggn_diag(model, loss_fn, batches))
    with pytest.raises(UnsupportedModuleError, match="GroupNorm"):
        LeCunDiagonal().diagonal(problem)


class _TwoKinds(nn.Module):
    """One parameter used by a Linear layer and by F.linear: the column estimators need the
    cross terms (generic path), LeCun sums over the connections."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x):
        return F.linear(torch.tanh(self.l(x)), self.l.weight)[:, :3]


def test_parameter_used_by_two_layer_kinds_is_exact():
    model = _TwoKinds().to(D)
    _, loss_fn, batches = make("res_mlp", "ce_mean")
    problem = Problem(model, loss_fn, batches)
    assert_diag_close(GGNDiagonal().diagonal(problem), reference.ggn_diag(model, loss_fn, batches))
    assert_diag_close(
        EmpiricalFisherDiagonal().diagonal(problem),
        reference.empirical_fisher_diag(model, loss_fn, batches),
    )
    with pytest.raises(UnsupportedModuleError, match="tied"):
        GGNDiagonal(method="backprop").diagonal(problem)


def test_samples_that_interact_are_refused():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 3)

        def forward(self, x: Tensor):
            return self.l(x - x.mean(0))  # every sample depends on the others

    model = Mixer().to(D)
    _, loss_fn, batches = make("res_mlp", "ce_mean")
    with pytest.raises(UnsupportedModuleError, match="depends on the other samples"):
        GGNDiagonal(method="backprop").diagonal(Problem(model, loss_fn, batches))


class _DecidesAtTraceTime(nn.Module):
    """``isinstance(out, tuple)`` is False for the proxy torch.fx traces with and True when the
    model runs: the traced graph reads another value than the model."""

    def __init__(self):
        super().__init__()
        self.r = nn.GRU(3, 4, batch_first=True)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        out = self.r(x)
        h = out[0][:, -1] if isinstance(out, tuple) else out[1][0]
        return self.out(torch.tanh(h) if isinstance(out, tuple) else h)


def test_a_graph_that_differs_from_the_model_is_refused():
    model = _DecidesAtTraceTime().to(D)
    x = torch.randn(6, 4, 3, dtype=D)
    problem = Problem(model, nn.CrossEntropyLoss(), (x, torch.randint(0, 3, (6,))))
    with pytest.raises(UnsupportedModuleError, match="does not compute the model"):
        GGNDiagonal(method="backprop").diagonal(problem)
    assert_diag_close(
        GGNDiagonal().diagonal(problem),
        reference.ggn_diag(model, problem.loss_fn, [(x, problem.data[1])], use_vmap=False),
    )


# --------------------------------------------------------------------------- LayerNorm in a chain
def _ln_chain():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).to(D)
    with torch.no_grad():
        seq[1].weight.add_(0.3 * torch.randn(5, dtype=D))
    x, y = torch.randn(10, 4, dtype=D), torch.randint(0, 3, (10,))
    return seq, nn.CrossEntropyLoss(), [(x, y)]


def test_a_chain_with_layernorm_gets_its_second_derivatives():
    """The chain engine's exact-Hessian and full-LeCun sweeps have no term for LayerNorm's own
    curvature: such a chain takes the graph engine (LeCun) or the generic one (Hessian)."""
    seq, loss_fn, batches = _ln_chain()
    problem = Problem(seq, loss_fn, batches)
    assert_diag_close(
        ExactHessianDiagonal().diagonal(problem), reference.hessian_diag(seq, loss_fn, batches)
    )
    slow = reference_graph.lecun_graph_slow(graph_of(seq).module, seq, loss_fn, batches, False)
    assert_diag_close(LeCunDiagonal(gauss_newton=False).diagonal(problem), slow)
    # the Gauss-Newton forms have no second-order residual: the chain engine stays
    assert GGNDiagonal().path(problem).engine == "chain"
    assert LeCunDiagonal().path(problem).engine == "chain"
    assert "LayerNorm" in ExactHessianDiagonal().path(problem).reason


# --------------------------------------------------------------------------- rule refusals
class _Projected(nn.Module):
    def __init__(self):
        super().__init__()
        self.r, self.out = nn.LSTM(3, 6, proj_size=2, batch_first=True), nn.Linear(2, 2)

    def forward(self, x):
        return self.out(self.r(x)[0][:, -1])


class _Renormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.out = nn.Embedding(7, 4, max_norm=1.0), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.e(x).mean(1))


def test_a_rule_refusal_is_known_before_the_run_and_falls_back():
    """A layer configuration a rule has no derivatives for (LSTM proj_size, Embedding max_norm,
    BatchNorm without running statistics) makes explain say generic, with the layer and the
    reason; the column estimators then fall back; LeCun refuses naming it."""
    g = torch.Generator().manual_seed(0)
    cases = [
        (_Projected(), torch.randn(6, 5, 3, generator=g), nn.MSELoss(), "proj_size"),
        (_Renormed(), torch.randint(0, 7, (6, 4), generator=g), nn.CrossEntropyLoss(), "max_norm"),
        (
            nn.Sequential(
                nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)
            ),
            torch.randn(6, 3, generator=g),
            nn.CrossEntropyLoss(),
            "track_running_stats",
        ),  # fmt: skip
    ]
    for model, x, loss_fn, word in cases:
        model = model.to(D).eval()
        x = x.to(D) if x.is_floating_point() else x
        y = (
            torch.randn(6, 2, dtype=D)
            if isinstance(loss_fn, nn.MSELoss)
            else torch.randint(0, 2, (6,))
        )
        problem = Problem(model, loss_fn, [(x, y)])
        for key, path in explain(problem).items():
            assert path.engine == "generic", (key, path)
            assert key == "hutchinson" or word in path.reason, (key, path)
        if word != "track_running_stats":  # batch statistics: no per-sample objective to check
            ggn = GGNDiagonal().diagonal(problem)
            assert_diag_close(ggn, reference.ggn_diag(model, loss_fn, [(x, y)], use_vmap=False))
        with pytest.raises(UnsupportedModuleError, match=word):
            LeCunDiagonal().diagonal(problem)


class _Erf(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.erf(self.a(x)))


def test_explain_knows_before_the_run_that_lecun_has_no_rule_for_a_function():
    model = _Erf().to(D)
    problem = Problem(
        model, nn.CrossEntropyLoss(), [(torch.randn(5, 3, dtype=D), torch.arange(5) % 2)]
    )
    paths = explain(problem)
    assert paths["lecun"].engine == "generic" and "'erf'" in paths["lecun"].reason
    assert paths["ggn"].engine == "graph"  # the columns go through erf by its vjp
    with pytest.raises(UnsupportedModuleError, match="erf"):
        LeCunDiagonal().diagonal(problem)
    # only the output layer's weights wanted: erf is not between them and the output
    only_b = Problem(model, nn.CrossEntropyLoss(), problem.data, params=["b.weight", "b.bias"])
    assert LeCunDiagonal().path(only_b).engine == "graph"


# ----------------------------------------------------------------- review: cached state, probes
class _Flagged(nn.Module):
    """A forward that branches on a plain Python flag (an ablation switch)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.o = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.skip = True

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = h + torch.tanh(self.b(h)) if self.skip else torch.tanh(self.b(h))
        return self.o(h)


def _ce_data(n=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)


def test_a_flag_the_forward_branches_on_is_read_again():
    torch.manual_seed(0)
    m, lf = _Flagged().double(), nn.CrossEntropyLoss()
    x, y = _ce_data()
    GGNDiagonal().diagonal(Problem(m, lf, [(x, y)]))
    m.skip = False
    got = GGNDiagonal().diagonal(Problem(m, lf, [(x, y)]))
    assert_diag_close(got, reference.ggn_diag(m, lf, [(x, y)]))


class _BatchMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.l, self.o = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.l(x))
        return self.o(h - h.mean(0))


@pytest.mark.parametrize("first", [1, 5])
def test_a_model_mixing_the_samples_of_a_batch_is_refused_by_every_engine(first):
    """Its per-sample curvature does not exist: no number, whatever the batching (a first batch
    of one sample included) and whatever the estimator."""
    torch.manual_seed(0)
    m, lf = _BatchMean().double(), nn.CrossEntropyLoss()
    x, y = _ce_data()
    p = Problem(m, lf, [(x[:first], y[:first]), (x[first:], y[first:])])
    for key, path in explain(p).items():
        if key != "hutchinson":  # Hessian-vector products of the batch objective: defined
            assert path.engine in ("refused",) or key == "hessian", (key, path)
    for est in (GGNDiagonal(), EmpiricalFisherDiagonal(), LeCunDiagonal()):
        with pytest.raises(UnsupportedModuleError, match="depends on the other samples"):
            est.diagonal(p)


def test_a_reattached_mask_reaches_the_cached_graph():
    m, lf, b = make("res_mlp", "ce_mean")
    g = torch.Generator().manual_seed(0)
    m1 = torch.rand(6, 6, generator=g) > 0.2
    attach(m, Mask({"l2.weight": m1}))
    for est in (GGNDiagonal, LeCunDiagonal):
        est().diagonal(Problem(m, lf, b))
    m2 = m1 & (torch.rand(6, 6, generator=g) > 0.5)
    attach(m, Mask({"l2.weight": m2}))
    newly = m1 & ~m2
    assert newly.any()
    for est in (GGNDiagonal, LeCunDiagonal):
        d = est().diagonal(Problem(m, lf, b))["l2.weight"]
        assert float(d[newly].abs().max()) == 0.0, est.__name__


class _Leaky(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        return self.o(torch.where(h > 0, h, 0.1 * h))


def test_a_where_on_a_data_dependent_condition_is_a_selection():
    torch.manual_seed(0)
    m, lf = _Leaky().double(), nn.CrossEntropyLoss()
    x, y = _ce_data(8)
    p = Problem(m, lf, [(x, y)])
    assert GGNDiagonal().path(p).engine == "graph"
    assert_diag_close(GGNDiagonal().diagonal(p), reference.ggn_diag(m, lf, [(x, y)]))
    ef = EmpiricalFisherDiagonal().diagonal(p)
    assert_diag_close(ef, reference.empirical_fisher_diag(m, lf, [(x, y)]))
    twin = nn.Sequential(m.a, nn.LeakyReLU(0.1), m.o)
    got = LeCunDiagonal().diagonal(p)
    want = LeCunDiagonal().diagonal(Problem(twin, lf, [(x, y)]))
    assert_diag_close(got, {k.replace("0.", "a.").replace("2.", "o."): v for k, v in want.items()})


class _Divided(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        return self.o(1.0 / (2.0 + h * h))


def test_lecun_knows_before_the_run_that_it_cannot_divide_by_a_parameter_dependent_value():
    torch.manual_seed(0)
    m, lf = _Divided().double(), nn.CrossEntropyLoss()
    x, y = _ce_data(8)
    p = Problem(m, lf, [(x, y)])
    path = LeCunDiagonal().path(p)
    assert path.engine == "generic" and "division" in path.reason
    with pytest.raises(UnsupportedModuleError, match="division"):
        LeCunDiagonal().diagonal(p)


def test_a_parametrization_that_is_not_a_mask_is_named_by_both_structured_engines():
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    for model in (nn.Sequential(nn.Linear(4, 3)), _Leaky()):
        layer = model[0] if isinstance(model, nn.Sequential) else model.a
        parametrize.register_parametrization(layer, "weight", Double())
        x, y = _ce_data(6)
        p = Problem(model.double(), nn.CrossEntropyLoss(), [(x, y)])
        with pytest.raises(
            UnsupportedModuleError, match="not an optbrain mask|only optbrain masks"
        ):
            GGNDiagonal(method="backprop").diagonal(p)
        assert GGNDiagonal().path(p).engine == "generic"
