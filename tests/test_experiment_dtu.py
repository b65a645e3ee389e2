"""The reproductions of the DTU generalisation studies (NNSYSID's sunspot demo, Pedersen et al.'s
γOBD/γOBS on Mackey–Glass, Gorodkin et al.'s contiguity study, Tresp et al.'s EBD, Larsen et al.'s
validation-set OBD): quick runs end to end with the claims' shape, and the pieces they are built
from checked against closed forms."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from optbrain import experiments
from optbrain.experiments import Result, apply_overrides
from optbrain.experiments import gorodkin1993_contiguity as contiguity
from optbrain.experiments import larsen1996_validation as larsen
from optbrain.experiments import nnsysid_sunspots as sunspots
from optbrain.experiments import pedersen1996_mackey_glass as mackey
from optbrain.experiments import tresp1997_ebd as tresp

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("statsmodels")

NAMES = (
    "nnsysid-sunspots",
    "pedersen1996-mackey-glass",
    "gorodkin1993-contiguity",
    "tresp1997-ebd",
    "larsen1996-validation",
)
MODULES = dict(zip(NAMES, (sunspots, mackey, contiguity, tresp, larsen)))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Every experiment's quick run (nothing written outside its out_dir)."""
    out = {}
    for name in NAMES:
        if name == "pedersen1996-mackey-glass":
            pytest.importorskip("jitcdde")
        root = tmp_path_factory.mktemp(name)
        cwd = root / "cwd"
        cwd.mkdir()
        calls = []
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(cwd)
            result = experiments.run(
                name, root / "out", quick=True, progress=lambda d, t, s, c=calls: c.append((d, t))
            )
        assert list(cwd.iterdir()) == []
        out[name] = (result, root / "out", calls)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_quick_run_writes_its_report(quick, name):
    result, out, calls = quick[name]
    assert (out / "result.json").is_file() and (out / "report.md").is_file()
    for rel in result.files:
        assert (out / rel).is_file(), rel
    for rel in result.figures:
        assert (out / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / rel).stat().st_size < 300_000
    assert [d for d, _ in calls] == list(range(1, len(calls) + 1)) and calls[-1][0] == calls[-1][1]
    assert result.claims and all(c.paper and c.detail for c in result.claims)
    loaded = Result.load(out)
    assert loaded.claims == result.claims
    json.loads((out / "result.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    mod = MODULES[name]
    assert mod.Config.from_dict(loaded.config) == mod.Config.quick()
    assert experiments.REGISTRY[name].summary == mod.SUMMARY


def test_sunspots_quick_claims(quick):
    result = quick["nnsysid-sunspots"][0]
    names = [c.name for c in result.claims]
    assert any(n.startswith("FPE selects about 27 weights") for n in names)
    assert any("no worse than TAR" in n for n in names)
    rows = result.tables["selected_by_fpe"]
    assert {r["method"] for r in rows} == {"OBS", "OBD"}
    for r in rows:
        assert 6 <= r["weights"] < 113
        assert 0.05 < r["train"] < 0.15 and 0.05 < r["test_1921_55"] < 0.2
        assert r["N_eff"] < r["weights"]  # weight decay: fewer effective than actual parameters
    summary = result.tables["nmse_summary"]
    assert summary[0]["model"] == "WRH (paper)" and summary[0]["test_1921_55"] == "0.086"


def test_mackey_glass_quick_claims(quick):
    result = quick["pedersen1996-mackey-glass"][0]
    rank = [c for c in result.claims if c.name.startswith("estimated and measured")]
    assert len(rank) == 2
    assert rank[0].held, rank[0].detail  # γOBD ranks consistently even in the quick run
    assert any(c.name.startswith("γOBS brings no significant gain") for c in result.claims)
    for row in result.tables["per_seed"]:
        assert row["N_eff_full"] < 81


def test_contiguity_quick_claims(quick):
    result = quick["gorodkin1993-contiguity"][0]
    curves = result.tables["learning_curves"]
    assert [r["training strings"] for r in curves] == [60, 200]
    acc = result.claim("OBD's predicted ΔE is accurate (LeCun's recursion) (200 strings, 1 seed)")
    assert acc.held, acc.detail
    assert {r["diagonal"] for r in result.tables["obd_accuracy"]} == set(
        contiguity.DIAGONALS.values()
    )


def test_tresp_quick_table(quick):
    result = quick["tresp1997-ebd"][0]
    rows = result.tables["table1"]
    assert [r["method"] for r in rows] == ["early stopping", "OBD", "ESP", "EBD"] * 2
    assert rows[1]["relative (paper)"] == 0.965 and rows[7]["relative (paper)"] == 1.014
    assert len(result.claims) == 4


def test_larsen_quick_table(quick):
    result = quick["larsen1996-validation"][0]
    rows = result.tables["selected"]
    assert len(rows) == 2 * len(larsen.SCHEMES)
    for r in rows:
        assert r["relative to unpruned"] > 0
    best = [r for r in rows if r["scheme"].startswith("best")]
    for problem in ("linear", "net"):
        (b,) = [r for r in best if r["problem"] == problem]
        others = [r for r in rows if r["problem"] == problem and not r["scheme"].startswith("un")]
        # the bound is the least test error along training OBD: no worse than the schemes on it
        for r in others:
            if r["scheme"].startswith("training OBD"):
                assert b["relative to unpruned"] <= r["relative to unpruned"] + 1e-9


@pytest.mark.parametrize(
    ("name", "key", "value", "match"),
    [
        ("nnsysid-sunspots", "decay_output", "0", "decay_output"),
        ("nnsysid-sunspots", "min_kept", "113", "min_kept"),
        ("pedersen1996-mackey-glass", "weight_decay", "0", "weight_decay"),
        ("gorodkin1993-contiguity", "sizes", "200,100", "increase"),
        ("tresp1997-ebd", "hidden", "10", "one size per data set"),
        ("tresp1997-ebd", "seeds", "1,1", "distinct"),
        ("larsen1996-validation", "linear_inputs", "60", "N > p"),
    ],
)
def test_configs_reject_bad_values(name, key, value, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(MODULES[name].Config(), {key: value})


# --------------------------------------------------------------------------- the pieces
def test_sunspots_rescaling_is_nnsysids_two_decays():
    """Our objective with one λ on the rescaled net = 2 × NNSYSID's PI with D = [D₁ D₂] on the
    original parametrisation (W1 = V/c, inputs and bias input unscaled)."""
    cfg = sunspots.Config()
    data = sunspots._load(cfg)
    n = data.n_train
    lam = sunspots.weight_decay(cfg, n)
    c = math.sqrt(cfg.decay_hidden / cfg.decay_output)
    net = sunspots.tanh_net(13, 8, seed=1, bias=False)
    x, y = data.x["train"], data.y["train"]
    with torch.no_grad():
        sse = float((net(x) - y).square().sum())
        theta = torch.cat([p.reshape(-1) for p in net.parameters()])
        ours = sse / n + 0.5 * lam * float(theta.square().sum())
        w1 = net[0].weight / c  # the original input-to-hidden weights (and hidden biases)
        raw = x * c  # NNSYSID's regressors: the 12 lags and a row of ones
        assert torch.equal(raw[:, 12], torch.ones(n, dtype=x.dtype))
        sse_orig = float((net[2](torch.tanh(raw @ w1.T)) - y).square().sum())
        out_sq = float(net[2].weight.square().sum() + net[2].bias.square().sum())
        pi = sse_orig + cfg.decay_output * out_sq + cfg.decay_hidden * float(w1.square().sum())
        pi /= 2 * n
    assert sse_orig == pytest.approx(sse, rel=1e-12)
    assert ours == pytest.approx(2 * pi, rel=1e-12)
    assert lam == pytest.approx(2 * 0.01 / 209)


def test_sunspots_topology_reads_lags_and_units():
    mask = {
        "0.weight": torch.zeros(8, 13, dtype=torch.bool),
        "2.weight": torch.zeros(1, 8, dtype=torch.bool),
    }
    mask["0.weight"][0, 11] = True  # y(t−1) into unit 0
    mask["0.weight"][1, 0] = True  # y(t−12) into unit 1, which has no output weight
    mask["0.weight"][2, 12] = True  # only the bias input into unit 2
    mask["2.weight"][0, [0, 2]] = True
    assert sunspots._topology(mask, 12) == ([1], 2)


def _linear_at_minimum(lam, n=40, seed=0):
    """A linear model at the exact minimum of mean MSE + ½λ‖θ‖² (closed form)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-0.5], [0.2]], dtype=torch.float64)
    y = y + 0.3 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    a = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    theta = torch.linalg.solve(2 / n * a.T @ a + lam * torch.eye(4, dtype=x.dtype), 2 / n * a.T @ y)
    with torch.random.fork_rng(devices=[]):
        model = nn.Sequential(nn.Linear(3, 1)).to(torch.float64)
    with torch.no_grad():
        model[0].weight.copy_(theta[:3].T)
        model[0].bias.copy_(theta[3])
    return model, x, y


def test_gamma_obs_measured_change_is_exact_on_a_quadratic():
    """Linear model, test set = training set: the measured change after the OBS update is ζ_q
    exactly, so measured − estimated = (2/N)·E·(N_eff − N_eff,−q) for every coordinate."""
    from optbrain.curvature import AutoInverse
    from optbrain.masking import Mask
    from optbrain.saliency.generalization import neff_drop

    lam = 0.05
    model, x, y = _linear_at_minimum(lam)
    data = mackey._Data(x, y, x, y, 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    est, act = mackey.per_weight_changes(model, "gamma_obs", lam, data)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # unchanged
    problem = mackey._problem(model, data)
    inv = AutoInverse(alpha=lam).inverse(problem, Mask({}))
    drop = neff_drop(inv.matrix, lam)
    e = problem.objective()
    assert len(est) == 4
    for q in range(4):
        assert act[q] - est[q] == pytest.approx(2 / 40 * e * float(drop[q]), rel=1e-6)
    # γOBD: the measured change of zeroing one weight of a quadratic is OBD's (λ + ½h)w²
    est, act = mackey.per_weight_changes(model, "gamma_obd", lam, data)
    from optbrain.curvature import GGNDiagonal
    from optbrain.generalization import fraction_determined

    h = torch.cat([v.reshape(-1) for v in GGNDiagonal().diagonal(problem).values()])
    r = fraction_determined(h, torch.full_like(h, lam))
    for q in range(4):
        assert act[q] - est[q] == pytest.approx(2 / 40 * e * float(r[q] ** 2), rel=1e-6)


def test_contiguity_single_deletions_exact_on_a_quadratic():
    lam = 0.01
    model, x, y = _linear_at_minimum(lam)
    out = contiguity.single_deletions(model, lam, x, y)
    assert set(out) == {"measured", *contiguity.DIAGONALS}
    for k in contiguity.DIAGONALS:
        for p, m in zip(out[k], out["measured"]):
            assert p == pytest.approx(m, rel=1e-6)


def test_tresp_splits_are_thirds_and_standardised():
    d = tresp.load_split("diabetes", seed=3)
    assert {k: v.shape[0] for k, v in d.x.items()} == {"train": 147, "val": 147, "test": 148}
    assert torch.allclose(d.x["train"].mean(0), torch.zeros(10, dtype=torch.float64), atol=1e-12)
    assert float(d.y["train"].std()) == pytest.approx(1.0)
    b = tresp.load_split("breast_cancer", seed=3)
    assert b.x["train"].shape == (189, 30) and set(b.y["test"].unique().tolist()) == {0.0, 1.0}
    again = tresp.load_split("breast_cancer", seed=3)
    assert torch.equal(again.x["test"], b.x["test"])


def test_larsen_data_has_the_stated_relevant_inputs():
    cfg = larsen.Config()
    d = larsen.make_data(cfg, "linear", 4)
    assert len(d.relevant) == cfg.linear_relevant
    # least squares on the noise-free part recovers zero weights on the irrelevant inputs
    x = torch.cat([d.x["train"], d.x["test"]])
    y = torch.cat([d.y["train"], d.y["test"]])
    w = torch.linalg.lstsq(x, y).solution[:, 0]
    irrelevant = [j for j in range(cfg.linear_inputs) if j not in d.relevant]
    assert float(w[irrelevant].abs().max()) < 0.1 < float(w[d.relevant].abs().min())
    assert larsen._inputs({"weight": torch.tensor([[True, False, True]])}, "linear") == [0, 2]
    m = {"0.weight": torch.tensor([[True, False], [False, True]]),
         "2.weight": torch.tensor([[True, False]])}  # fmt: skip
    assert larsen._inputs(m, "net") == [0]


def test_sunspot_data_in_nnsysids_scale():
    from optbrain.data.sunspots import NMSE_VARIANCE, NNSYSID_SCALE, load_sunspots, sunspot_series

    years, act = sunspot_series()
    d = load_sunspots(12, scale=NNSYSID_SCALE)
    assert d.offset == 0.0 and d.scale == NNSYSID_SCALE
    assert d.x["train"].shape == (209, 12)
    assert d.x["train"][0].tolist() == pytest.approx((act[:12] / NNSYSID_SCALE).tolist())
    assert float(d.y["test2"][1, 0]) == pytest.approx(0.9947, abs=1e-4)  # 1957 in solplet.asc
    assert d.nmse(0.01) == pytest.approx(0.01 * NNSYSID_SCALE**2 / NMSE_VARIANCE)
    for bad in (0, -1.0, "191"):
        with pytest.raises(ValueError, match="scale"):
            load_sunspots(12, scale=bad)


def test_gamma_obs_surgeon_deletes_the_least_with_the_obs_update():
    """On a quadratic (linear model at its regularised minimum) one call deletes the entry of
    least γOBS saliency and moves the others so that E rises by exactly ζ_q."""
    from optbrain.experiments.hassibi_common import all_parameters_mask
    from optbrain.masking import attach
    from optbrain.saliency.generalization import GammaOBS

    lam = 0.05
    model, x, y = _linear_at_minimum(lam)
    attach(model, all_parameters_mask(model))
    data = mackey._Data(x, y, x, y, 1.0)
    problem = mackey._problem(model, data)
    scores = GammaOBS(lam)(problem)
    flat = torch.cat([scores["0.weight"].reshape(-1), scores["0.bias"].reshape(-1)])
    q = int(torch.argmin(flat))
    e0 = problem.objective()
    pruner = mackey.GammaOBSSurgeon(lam)
    mask = pruner.default_mask(model)
    new, info = pruner(problem, mask, 1)
    assert new.pruned() == 1
    kept = torch.cat([new["0.weight"].reshape(-1), new["0.bias"].reshape(-1)])
    assert not bool(kept[q]) and info.predicted_increase == pytest.approx(float(flat[q]))
    attach(model, new)
    w = torch.cat([p.detach().reshape(-1) for p in (model[0].weight, model[0].bias)])
    assert float(w[q]) == 0.0
    # E rose by the OBS saliency with decay, ζ_q = γ-saliency + (2/N)·E·(N_eff drop)
    from optbrain.saliency.generalization import neff_drop

    zeta = float(flat[q]) + 2 / 40 * e0 * float(neff_drop(_inverse_of(lam, x), lam)[q])
    assert problem.objective() - e0 == pytest.approx(zeta, rel=1e-6)
    with pytest.raises(ValueError, match="one entry per call"):
        pruner(problem, new, 3)


def _inverse_of(lam, x):
    """(G + λI)⁻¹ of the linear model's mean MSE on x (with the bias column)."""
    n = x.shape[0]
    a = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    return torch.linalg.inv(2 / n * a.T @ a + lam * torch.eye(4, dtype=x.dtype))


def test_contiguity_receptive_fields():
    w1 = torch.zeros(3, 10, dtype=torch.bool)
    w1[0, [3, 4]] = True  # an edge detector on positions 3, 4
    w1[1, [0, 7]] = True  # not local
    w1[2, 5] = True  # no output weight: not live
    mask = {"0.weight": w1, "2.weight": torch.tensor([[True, True, False]])}
    fields = contiguity.receptive_fields(mask)
    assert fields == [[3, 4], [0, 7]]
    assert [contiguity.is_local(f) for f in fields] == [True, False]
    assert contiguity.is_local([9]) and not contiguity.is_local([2, 4])
