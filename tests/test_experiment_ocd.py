"""The OCD reproductions (cibas1994-waveform, digits-ocd): quick runs, claims, helpers, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from optbrain import cli, experiments
from optbrain.experiments import Result, apply_overrides
from optbrain.experiments import cibas1994_waveform as W
from optbrain.experiments import digits_ocd as D
from optbrain.experiments import input_selection as S

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("scipy")


def _run(name, root, **kw):
    out = root / "out"
    cwd = root / "cwd"
    cwd.mkdir()
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)  # nothing may be written outside out_dir
        result = experiments.run(
            name, out, quick=True, progress=lambda d, t, s: calls.append((d, t, s)), **kw
        )
    assert list(cwd.iterdir()) == []
    assert [d for d, _, _ in calls] == list(range(1, len(calls) + 1))
    assert calls[-1][0] == calls[-1][1]
    for rel in result.files:
        assert (out / rel).is_file(), rel
    for rel in result.figures:
        assert (out / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return result, out


@pytest.fixture(scope="module")
def waveform(tmp_path_factory):
    return _run("cibas1994-waveform", tmp_path_factory.mktemp("waveform"))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return _run("digits-ocd", tmp_path_factory.mktemp("digits"))


def _claim(result: Result, start: str):
    found = [c for c in result.claims if c.name.startswith(start)]
    assert len(found) == 1, [c.name for c in result.claims]
    return found[0]


# --------------------------------------------------------------------------- waveform
def test_waveform_quick_claims(waveform):
    result, out = waveform
    assert {"rankings.png", "accuracy_vs_inputs.png"} == {p.split("/")[-1] for p in result.figures}
    # OCD separates the informative inputs 2..20 from the 21 pure-noise ones almost perfectly
    rows = [r for r in result.tables["rankings_per_seed"] if r["ranking"] == "ocd"]
    assert len(rows) == 2
    assert all(r["AUC informative vs pure noise"] >= 0.95 for r in rows), rows
    assert all(r["pure-noise inputs in top 19"] <= 2 for r in rows), rows
    # iterative OCD removal with retraining: the chosen set holds no appended noise input
    claim = _claim(result, "Iterative OCD removal")
    assert claim.held, claim.detail
    for row in result.tables["chosen_variable_sets"]:
        assert row["appended noise kept"] == 0
        assert row["chosen: test acc"] >= row["full test acc"] - 0.02
    assert _claim(result, "Context: the full 40-input net").held
    for r in result.tables["accuracy"]:
        assert 0.83 <= r["Bayes rule test accuracy"] <= 0.90
    # every ranking gets the literal and the informative claim; agreement table for 3 pairs
    for label in ("OCD", "permutation importance", "mutual information"):
        _claim(result, f"{label}: the 19 appended noise inputs rank below")
        _claim(result, f"{label}: the 19 informative inputs 2..20")
    assert len(result.tables["rank_agreement"]) == 3
    report = (out / "report.md").read_text()
    assert "| claim | paper | ours | held? |" in report and "](figures/rankings.png)" in report


def test_waveform_result_and_config_round_trip(waveform):
    result, out = waveform
    loaded = Result.load(out)
    assert json.dumps(loaded.to_dict(), sort_keys=True) == json.dumps(
        result.to_dict(), sort_keys=True
    )
    json.loads((out / "result.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    assert W.Config.from_dict(loaded.config) == W.Config.quick()
    assert W.Config.from_dict(W.Config().to_dict()) == W.Config()


# --------------------------------------------------------------------------- digits
def test_digits_quick_claims(digits):
    result, out = digits
    assert {"saliency_image.png", "accuracy_vs_pixels.png"} == {
        p.split("/")[-1] for p in result.figures
    }
    const = _claim(result, "The 4 pixels that are zero in every training image")
    assert const.held, const.detail
    border = _claim(result, "The 8 lowest-ranked pixels by OCD are border pixels")
    assert border.held, border.detail
    at16 = _claim(result, "With 16 pixels kept OCD's pixels give the highest")
    assert at16.held, at16.detail
    runs = json.loads((out / "runs.json").read_text())
    assert runs["constant_pixels"] == [0, 24, 32, 39]
    ocd = torch.tensor(runs["runs"][0]["scores"]["ocd"])
    assert (ocd[[0, 24, 32, 39]] == 0).all() and (ocd[[1, 2, 3]] > 0).all()
    assert D.Config.from_dict(Result.load(out).config) == D.Config.quick()


# --------------------------------------------------------------------------- helpers
def _tiny(seed=0, n=60, d=5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, d, generator=gen)
    x[:, 3] = 0.0  # a constant input
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(d, 4), nn.Tanh(), nn.Linear(4, 2))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for p in model.parameters():
            nn.init.normal_(p, std=0.7)
    return model, S.Split(x[:n], y[:n], x[n : 2 * n], y[n : 2 * n], x[2 * n :], y[2 * n :])


def test_ocd_input_scores_are_sums_of_fan_out_obd_saliencies():
    from optbrain.curvature import GGNDiagonal
    from optbrain.problem import Problem

    model, split = _tiny()
    model = model.double()
    split = S.Split(*(t.double() if t.is_floating_point() else t for t in vars(split).values()))
    s = S.input_scores("ocd", model, split)
    problem = Problem(model, nn.CrossEntropyLoss(), [(split.x_train, split.y_train)])
    h = GGNDiagonal().diagonal(problem)["0.weight"]
    expected = (0.5 * h * model[0].weight.detach() ** 2).sum(0)
    torch.testing.assert_close(s, expected.double(), rtol=1e-12, atol=0)
    assert s[3] == 0 and (s[[0, 1, 2, 4]] > 0).all()
    mag = S.input_scores("magnitude", model, split)
    torch.testing.assert_close(mag, 0.5 * model[0].weight.detach().square().sum(0))


def test_remove_inputs_keeps_them_removed_through_retraining():
    model, split = _tiny()
    S.remove_inputs(model, [1])
    S.remove_inputs(model, [4])  # a second call keeps the first removal
    S.fit(model, split, epochs=5, patience=2, lr=1e-2, batch_size=16, seed=0)
    w = model[0].weight.detach()
    assert (w[:, [1, 4]] == 0).all() and (w[:, [0, 2]] != 0).all()
    assert S.input_scores("ocd", model, split)[[1, 4]].abs().max() == 0


def test_iterative_removal_removes_lowest_first_and_chooses_by_validation():
    model, split = _tiny()
    seen = []

    def score(m, r):
        seen.append(r)
        return torch.tensor([5.0, 4.0, 3.0, 0.0, 1.0])  # removal order 3, 4, 2, 1

    rows = S.iterative_removal(
        model,
        split,
        score,
        step=2,
        min_inputs=1,
        retrain=lambda m, r: S.fit(m, split, epochs=3, patience=2, lr=1e-2, batch_size=16, seed=r),
    )
    assert [r["kept"] for r in rows] == [5, 3, 1]
    assert [r["removed"] for r in rows] == [[], [3, 4], [2, 1]]
    assert rows[-1]["alive"] == [0] and seen == [1, 2]
    assert model[0].weight.detach().abs().min() > 0  # the caller's model is untouched
    rows = [
        {"kept": 5, "val_accuracy": 0.80},
        {"kept": 4, "val_accuracy": 0.85},
        {"kept": 3, "val_accuracy": 0.845},
        {"kept": 2, "val_accuracy": 0.70},
    ]
    assert S.chosen_round(rows, 0.01)["kept"] == 3
    assert S.chosen_round(rows, 0.0)["kept"] == 4


def test_auc_ranks_and_ranking_stats():
    s = torch.tensor([3.0, 1.0, 2.0, 2.0])
    assert S.ranks(s).tolist() == [3, 0, 1, 2]
    assert W.auc(s, [0], [1, 2]) == 1.0 and W.auc(s, [2], [3]) == 0.5
    perfect = torch.cat([torch.arange(21, dtype=torch.float64) + 100, torch.zeros(19)])
    perfect[[0, 20]] = 50.0
    st = W.ranking_stats(perfect)
    assert st["literal"] and st["noise_in_top21"] == 0 and st["auc_wave_vs_noise"] == 1.0
    assert st["informative_top"] and st["pure_in_top19"] == 0
    perfect[[0, 20]] = -1.0  # inputs 1 and 21 below the noise: still literal-false
    st = W.ranking_stats(perfect)
    assert not st["literal"] and st["noise_in_top21"] == 2 and st["informative_top"]


def test_bayes_rule_accuracy_is_about_86_percent():
    from optbrain.data import make_waveform

    x, y = make_waveform(4000, seed=11)
    acc = W.bayes_accuracy(x, y, grid=200)
    assert 0.84 <= acc <= 0.885
    # the rule needs the right waves: permuting the inputs destroys it
    assert W.bayes_accuracy(x[:, torch.randperm(40, generator=torch.Generator())], y) < 0.6


# --------------------------------------------------------------------------- configs and CLI
@pytest.mark.parametrize("module", [W, D])
def test_config_round_trip_and_validation(module):
    cfg = module.Config()
    assert module.Config.from_dict(cfg.to_dict()) == cfg
    assert module.Config.from_dict(module.Config.quick().to_dict()) == module.Config.quick()
    with pytest.raises(ValueError, match="unknown setting 'nope'"):
        apply_overrides(cfg, {"nope": 1})
    with pytest.raises(ValueError, match="'seeds'"):
        apply_overrides(cfg, {"seeds": "1,1"})
    with pytest.raises(ValueError, match="'min_inputs'"):
        apply_overrides(cfg, {"min_inputs": "0"})


def test_cli_reproduce_quick(tmp_path, capsys):
    out = tmp_path / "wave"
    argv = ["reproduce", "cibas1994-waveform", "--quick", "--set", "seeds=0"]
    argv += ["--set", "removal=false", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "Optimal Cell Damage (Cibas et al. 1994/96)" in text and "claims held" in text
    result = Result.load(out)
    assert result.config["seeds"] == [0] and result.config["removal"] is False
    assert not any(c.name.startswith("Iterative") for c in result.claims)
    assert "cibas1994-waveform" in experiments.names() and "digits-ocd" in experiments.names()
