"""The Hassibi–Stork reproductions (XOR, MONK, Gaussian mixture): quick runs, claims, configs,
and the shared helpers they are built from."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from optbrain import cli, experiments
from optbrain.data import load_monk, xor_data
from optbrain.experiments import Result, apply_overrides
from optbrain.experiments import hassibi1993_monk as monk
from optbrain.experiments import hassibi1993_xor as xor
from optbrain.experiments import hassibi1994_mixture as mixture
from optbrain.experiments.hassibi_common import (
    ShuffledBatches,
    all_parameters_mask,
    delete_one_at_a_time,
    fit,
    live_topology,
    make_pruner,
    mse_problem,
    sigmoid_net,
)
from optbrain.experiments.stats import mean_sd

pytest.importorskip("matplotlib")

NAMES = ("hassibi1993-xor", "hassibi1993-monk", "hassibi1994-mixture")
MODULES = {"hassibi1993-xor": xor, "hassibi1993-monk": monk, "hassibi1994-mixture": mixture}


# ------------------------------------------------------------------------------ shared helpers
@pytest.mark.parametrize(
    ("n_in", "hidden", "count"), [(2, 2, 9), (17, 3, 58), (17, 2, 39), (5, 9, 64)]
)
def test_sigmoid_net_sizes_match_the_papers(n_in, hidden, count):
    net = sigmoid_net(n_in, hidden, seed=0)
    assert sum(p.numel() for p in net.parameters()) == count
    assert all_parameters_mask(net).total() == count  # biases are prunable too
    assert all(p.dtype == torch.float64 for p in net.parameters())
    state = torch.get_rng_state()
    again = sigmoid_net(n_in, hidden, seed=0)
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched
    for a, b in zip(net.parameters(), again.parameters()):
        assert torch.equal(a, b)
    scaled = sigmoid_net(n_in, hidden, seed=0, init_scale=2.0)
    assert max(float(p.detach().abs().max()) for p in scaled.parameters()) <= 2.0
    with pytest.raises(ValueError, match="layer sizes"):
        sigmoid_net(0, 2, seed=0)


def test_fit_reaches_zero_error_on_xor_and_respects_a_mask():
    x, y = xor_data(dtype=torch.float64)
    net = sigmoid_net(2, 2, seed=1, init_scale=2.0)
    res = fit(net, x, y, max_iter=300)
    assert res.mse < 1e-10 and res.mse == pytest.approx(
        float(nn.functional.mse_loss(net(x), y).detach())
    )
    # weight decay: the regularised objective is reported separately and is larger
    dec = fit(sigmoid_net(2, 2, seed=1, init_scale=2.0), x, y, weight_decay=1e-3, max_iter=300)
    assert dec.objective > dec.mse > 0
    # with a mask attached, pruned entries stay exactly 0 through L-BFGS
    from optbrain.masking import attach, detach

    net2 = sigmoid_net(2, 2, seed=1, init_scale=2.0)
    mask = all_parameters_mask(net2).with_pruned({"2.bias": [0]})
    attach(net2, mask)
    fit(net2, x, y, max_iter=100)
    detach(net2, bake=True)
    assert float(net2[2].bias.detach()) == 0.0


def test_delete_one_at_a_time():
    d = load_monk(3, seed=0, dtype=torch.float64)
    net = sigmoid_net(17, 2, seed=0)
    fit(net, d.x_train, 0.1 + 0.8 * d.y_train, weight_decay=1e-2, max_iter=200)
    problem = mse_problem(net, d.x_train, 0.1 + 0.8 * d.y_train)
    mask = all_parameters_mask(net)
    pruned = []

    def after(step):
        new, info = step.new, step.info
        pruned.append(new.pruned())
        flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        kept = torch.cat([new[k].reshape(-1) for k in new.names])
        assert torch.all(flat[~kept] == 0)  # deleted entries exactly zero
        assert info.newly_pruned == 1

    assert (
        delete_one_at_a_time(net, problem, make_pruner("obs"), mask, min_kept=35, after=after)
        is None
    )
    assert pruned == [1, 2, 3, 4]


def test_unit_obs_steps_remove_whole_units():
    d = load_monk(1, seed=0, dtype=torch.float64)
    t = 0.1 + 0.8 * d.y_train
    net = sigmoid_net(17, 3, seed=0)
    fit(net, d.x_train, t, weight_decay=1e-4, max_iter=300)
    kept = [58]

    def after(step):
        assert step.new.kept() in (kept[-1] - 3, kept[-1] - 1 - 17 - 1)  # an input or a unit
        assert step.info.cells_removed == step.round  # one more cell per step
        kept.append(step.new.kept())
        return "enough" if step.round == 3 else None

    problem = mse_problem(net, d.x_train, t)
    pruner = make_pruner("unit_obs")
    assert delete_one_at_a_time(net, problem, pruner, all_parameters_mask(net), after=after) == (
        "enough"
    )
    assert len(kept) == 4


def test_shuffled_batches_cover_every_row_once_per_pass():
    x = torch.arange(10.0).unsqueeze(1)
    batches = ShuffledBatches(x, 2 * x, batch_size=4, seed=3)
    assert len(batches) == 3
    first = list(batches)
    assert [b[0].shape[0] for b in first] == [4, 4, 2]
    rows = torch.cat([b[0] for b in first]).flatten()
    assert sorted(rows.tolist()) == list(range(10)) and rows.tolist() != list(range(10))
    assert all(torch.equal(b[1], 2 * b[0]) for b in first)
    second = torch.cat([b[0] for b in batches]).flatten()
    assert second.tolist() != rows.tolist()  # a new order on every pass
    again = ShuffledBatches(x, 2 * x, batch_size=4, seed=3)
    assert torch.cat([b[0] for b in again]).flatten().tolist() == rows.tolist()
    with pytest.raises(ValueError, match="rows"):
        ShuffledBatches(x, x[:3], batch_size=2)


def test_live_topology_counts_dead_units():
    net = sigmoid_net(3, 2, seed=0)
    mask = all_parameters_mask(net)
    assert live_topology(mask) == (3, 2, 3 * 2 + 2 + 2 + 1)
    # hidden unit 0 loses its output weight: its fan-in no longer counts, input 2 unused
    mask = mask.with_pruned({"2.weight": [0], "0.weight": [5]})
    assert live_topology(mask) == (2, 1, 2 + 1 + 1 + 1)


def test_make_pruner_and_mean_sd():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        make_pruner("nope")
    assert make_pruner("unit_obs").groups == "unit"
    assert mean_sd([1.0, 3.0]) == (2.0, math.sqrt(2.0))
    assert mean_sd([2.0]) == (2.0, 0.0)
    assert all(math.isnan(v) for v in mean_sd([]))


def test_xor_labels_and_offdiag_mass():
    assert [xor.weight_label("0.weight", (i, j)) for i in (0, 1) for j in (0, 1)] == [
        "u11",
        "u12",
        "u21",
        "u22",
    ]
    assert xor.weight_label("0.bias", (1,)) == "u23"
    assert xor.weight_label("2.weight", (0, 1)) == "v2" and xor.weight_label("2.bias", ()) == "v3"
    assert xor.offdiag_mass(torch.diag(torch.tensor([1.0, 2.0]))) == 0.0
    m = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    assert xor.offdiag_mass(m) == pytest.approx(math.sqrt(0.5))


# ------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", NAMES)
def test_registry_and_config_round_trip(name):
    module = MODULES[name]
    assert name in experiments.names() and experiments.get(name) is module
    assert experiments.REGISTRY[name].summary == module.SUMMARY
    quick = module.Config.quick()
    assert module.Config.from_dict(quick.to_dict()) == quick
    assert module.Config.from_dict(module.Config().to_dict()) == module.Config()
    json.dumps(module.Config().to_dict())
    with pytest.raises(ValueError, match="unknown setting 'nope'"):
        apply_overrides(module.Config(), {"nope": "1"})


@pytest.mark.parametrize(
    ("module", "key", "value", "match"),
    [
        (xor, "n_seeds", "0", "'n_seeds'.*>= 1"),
        (xor, "high", "0.05", "'high'.*above low"),
        (xor, "obd_curvature", "lecun", "one of 'ggn', 'hessian'"),
        (monk, "problems", "4", "'problems'.*1, 2, 3"),
        (monk, "methods", "obs,obs", "distinct"),
        (monk, "hidden", "3,2", "expected 3 values"),
        (mixture, "max_removed", "64", r"'max_removed'.*1\.\.63"),
        (mixture, "starts", "early_stopped", None),
        (mixture, "alpha", "0", "'alpha'.*> 0"),
    ],
)
def test_bad_settings(module, key, value, match):
    if match is None:
        assert apply_overrides(module.Config(), {key: value}).starts == ("early_stopped",)
        return
    with pytest.raises(ValueError, match=match):
        apply_overrides(module.Config(), {key: value})


# ------------------------------------------------------------------------------ quick runs
@pytest.fixture(scope="module")
def xor_quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("xor")
    return experiments.run("hassibi1993-xor", out, quick=True), out


def test_xor_quick_claims(xor_quick):
    result, out = xor_quick
    n_trained = int(result.claim("at least 4 nets trained to zero error").detail.split()[0])
    assert n_trained >= 4
    # the robust parts of the paper's claim: OBD's deletion breaks XOR, OBS's keeps it more often,
    # and the Hessian at the solution is far from diagonal
    assert result.claim("OBS keeps XOR solved more often than OBD (no retraining)").held
    assert result.claim("the Hessian is far from diagonal (‖offdiag‖_F/‖H‖_F > 0.5)").held
    names = [c.name for c in result.claims]
    assert any(n.startswith("only OBS keeps XOR solved") for n in names)
    assert any(n.startswith("magnitude and OBD sometimes") for n in names)
    # at zero error the exact Hessian equals the Gauss–Newton matrix OBS uses
    hess, ggn = result.tables["curvature"]
    assert hess["offdiag_mass_mean"] == pytest.approx(ggn["offdiag_mass_mean"], abs=1e-4)
    seeds = json.loads((out / "seeds.json").read_text())
    assert len(seeds) == 16 and sum(r["trained"] for r in seeds) == n_trained
    for r in seeds:
        if r["trained"]:
            assert r["ggn_rank"] <= 4  # 4 patterns, one output
            assert r["obs"]["predicted"] >= 0
    assert len(result.figures) == 3
    for rel in result.figures:
        assert (out / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_monk_quick_through_the_cli(tmp_path, capsys):
    out = tmp_path / "monk"
    code = cli.main(
        ["reproduce", "hassibi1993-monk", "--quick", "--out", str(out), "--no-progress"]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "OBS and Unit-OBS on the MONK's problems" in text and "claims held" in text
    result = Result.load(out)
    assert monk.Config.from_dict(result.config) == monk.Config.quick()
    # what reproduces on the quick setting: MONK-3 pruned to the paper's 4 weights by OBS, and
    # Unit-OBS on MONK-1 keeps only inputs of the attributes the concept depends on
    assert result.claim("OBS: 39 → 4 weights at unchanged accuracy (MONK-3, 1 seed)").held
    assert result.claim(
        "Unit-OBS keeps only inputs of the relevant attributes a1, a2, a5 (MONK-1, 1 seed)"
    ).held
    assert result.claim("OBS leaves fewer weights than magnitude (MONK-1, 1 seed)").held
    assert result.claim("reference net trained to the paper's accuracy (MONK-1, 1 seed)").held
    rows = {(r["problem"], r["method"]): r for r in result.tables["weights_left"]}
    assert rows[("MONK-1", "Unit-OBS")]["topologies"].endswith("-3-1")
    assert (
        rows[("MONK-1", "Unit-OBS, then OBS")]["weights_left_mean"]
        <= (rows[("MONK-1", "Unit-OBS")]["weights_left_mean"])
    )
    nets = json.loads((out / "nets.json").read_text())
    for traj_owner in nets["1"][0]["methods"].values():
        traj = traj_owner["trajectory"]
        assert traj[0]["train_acc"] == 1.0 and traj[0]["test_acc"] == 1.0
        assert [t["remaining"] for t in traj] == sorted(
            (t["remaining"] for t in traj), reverse=True
        )
    json.loads((out / "result.json").read_text(), parse_constant=pytest.fail)


def test_mixture_quick(tmp_path):
    cfg = apply_overrides(mixture.Config.quick(), {"max_removed": 12})
    result = mixture.run(cfg, tmp_path)
    assert result.claim("training error at the minimum about 0.15 per pattern").held
    names = [c.name for c in result.claims]
    for start in ("trained to the minimum", "early-stopped"):
        assert sum(start in n for n in names) == 3, names
    for start in ("minimum", "early_stopped"):
        rows = result.tables[f"test_error_{start}"]
        for method in ("OBS", "OBD"):
            curve = [r for r in rows if r["method"] == method]
            assert [r["removed"] for r in curve] == list(range(13))
            assert all(0 < r["test_mse"] < 1 for r in curve)
    # OBS's first deletions barely change the training error (its saliency is tiny), OBD's
    # retraining keeps the training error near the start
    curves = json.loads((tmp_path / "curves.json").read_text())
    obs = curves["minimum"]["0"]["curves"]["obs"]
    assert obs[1]["train_mse"] - obs[0]["train_mse"] < 1e-3
    assert Result.load(tmp_path).claims == result.claims
