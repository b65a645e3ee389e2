"""The extreme-sparsity study (issue #12 item 5): the quick form end to end (digits MLP and a tiny
LSTM translator), what it measures, and its bad inputs (an unreachable sparsity, no retraining
budget, too few samples)."""

from __future__ import annotations

import json
import math

import pytest

from optbrain import experiments
from optbrain.errors import EmptyLayerError
from optbrain.experiments import extreme_sparsity as es
from optbrain.experiments.extreme_sparsity_methods import LABELS, METHODS
from optbrain.models.seq2seq import CLASSES

pytest.importorskip("matplotlib")
pytest.importorskip("sacrebleu")
pytest.importorskip("num2words")


def _runs(tmp_path, task):
    return json.loads((tmp_path / "runs.json").read_text())["sweeps"][task]["runs"]


def _before(runs, method, level):
    vals = [r["before"]["score"] for r in runs if r["method"] == method and r["level"] == level]
    return sum(vals) / len(vals)


def test_quick_form_runs_both_tasks_with_every_method(tmp_path):
    result = experiments.run("extreme-sparsity", tmp_path, quick=True)
    cfg = es.Config.quick()
    n = len(cfg.methods) * len(cfg.levels)
    for task in ("nmt", "digits"):
        assert len(result.tables[f"{task}_summary"]) == n
        runs = _runs(tmp_path, task)
        assert len(runs) == n * len(cfg.seeds)
        for r in runs:  # every pruner reached its level, scores on a 0-1 scale
            assert r["sparsity"] == pytest.approx(r["level"], abs=1e-3)
            assert 0 <= r["before"]["score"] <= 1 and 0 <= r["after"]["score"] <= 1
            assert sum(c["share"] for c in r["where"].values()) == pytest.approx(1)
    assert [r["method"] for r in result.tables["nmt_where_900"]] == [LABELS[m] for m in METHODS]
    where = {r["method"]: r for r in result.tables["nmt_where_900"]}
    assert set(where["random"]) == {"method", *CLASSES}
    uniform = where["magnitude, class-uniform"]
    assert all(uniform[c] == pytest.approx(90, abs=0.6) for c in CLASSES)
    assert {r["score"] for r in result.tables["curvature_check"]} == {
        "LeCun (OBD)",
        "course ½ g_acc² w²",
    }
    assert result.figures == ["figures/nmt_sweep.png", "figures/digits_sweep.png"]
    assert len(result.claims) == 10


def test_digits_sweep_keeps_accuracy_at_low_sparsity_and_random_collapses(tmp_path):
    """The meaningful property of the CI sweep: at 50 % OBD and magnitude keep the dense
    accuracy (no retraining), random deletion of 99 % leaves chance, retraining never hurts OBD
    at 50 % by more than a point, and SNIP trained from a 50 % mask learns the task."""
    cfg = es.Config.quick()
    result = experiments.run("extreme-sparsity", tmp_path, quick=True, overrides=["tasks=digits"])
    dense = json.loads((tmp_path / "runs.json").read_text())["sweeps"]["digits"]["dense"]
    acc = sum(d["score"] for d in dense) / len(dense)
    assert acc > 0.9
    runs = _runs(tmp_path, "digits")
    for method in ("obd", "magnitude_blind"):
        assert _before(runs, method, 0.5) > acc - 0.03
    assert _before(runs, "random", 0.99) < 0.2
    snip = [r["after"]["score"] for r in runs if r["method"] == "snip" and r["level"] == 0.5]
    assert min(snip) > 0.85
    claims = {c.name.split(" (")[0]: c for c in result.claims}
    low = "digits: at 50 % the best of OBD and magnitude, without retraining, keeps ≥ 95 %"
    assert claims[low + " of the dense score"].held
    assert claims["digits: random deletion of 99 % collapses the model"].held
    assert len(cfg.seeds) == 2


def test_no_retraining_budget_reports_only_scores_before(tmp_path):
    result = experiments.run(
        "extreme-sparsity",
        tmp_path,
        quick=True,
        overrides=["tasks=digits", "digits_retrain_epochs=0", "seeds=0", "levels=0.5,0.99"],
    )
    runs = _runs(tmp_path, "digits")
    assert all(r["after"] is None for r in runs if r["method"] != "snip")
    assert all(r["after"] is not None for r in runs if r["method"] == "snip")  # trained anyway
    assert not any("retrained" in c.name or "SNIP is good" in c.name for c in result.claims)
    assert any("retraining budget 0" in n for n in result.notes)
    rows = result.tables["digits_summary"]
    assert {r["after"] for r in rows if r["method"] != LABELS["snip"]} == {"–"}


def test_unreachable_sparsity_is_refused_before_training(tmp_path):
    # 64-2-10 MLP: 148 weights in 2 matrices, one kept each -> at most 1 - 2/148 = 0.9865
    with pytest.raises(EmptyLayerError, match=r"reaches at most 0\.98648"):
        experiments.run(
            "extreme-sparsity",
            tmp_path,
            quick=True,
            overrides=["tasks=digits", "digits_hidden=2", "levels=0.5,0.99", "seeds=0"],
        )
    assert not (tmp_path / "runs.json").exists()


def test_a_level_one_weight_class_cannot_reach_is_refused_before_training(tmp_path, monkeypatch):
    """64-4-10 MLP at 99 %: reachable over the whole model (1 - 2/296), but class-uniform
    pruning would empty the output class (39 of its 40 weights may go, 40 would have to)."""
    from optbrain.experiments import extreme_sparsity as es

    trained = []
    monkeypatch.setattr(es, "_train", lambda *a, **k: trained.append(1))
    with pytest.raises(EmptyLayerError, match="class-uniform pruning cannot reach"):
        experiments.run(
            "extreme-sparsity",
            tmp_path,
            quick=True,
            overrides=["tasks=digits", "digits_hidden=4", "levels=0.5,0.99", "seeds=0"],
        )
    assert not trained


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("prune_samples=4", "prune_samples.*>= 8"),
        ("nmt_sizes=4,10,10", "training split must hold >= 8"),
        ("levels=0.5,1.0", r"sparsities must be in \(0, 1\)"),
        ("levels=0.9,0.5", "must be increasing"),
        ("nmt_epochs=0", "nmt_epochs.*>= 1"),
        ("digits_retrain_epochs=-1", ">= 0"),
        ("methods=obd,obd", "must be distinct"),
    ],
)
def test_bad_settings_name_the_cause(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        experiments.run("extreme-sparsity", tmp_path, quick=True, overrides=[override])
    assert not (tmp_path / "runs.json").exists()


def test_unknown_method_is_refused():
    from optbrain.experiments.extreme_sparsity_methods import make_pruner

    with pytest.raises(ValueError, match="unknown method 'obs'"):
        make_pruner("obs", classes={}, dense={}, seed=0, obd_estimates=1)


def test_course_numbers_are_the_papers():
    from optbrain.experiments.extreme_sparsity_report import COURSE

    assert COURSE["dense"] == 0.283
    assert COURSE["course_obd"][0.9] == (0.1560, 0.2537)
    assert COURSE["course_obd"][0.99] == (0.0036, 0.1109)
    assert [COURSE["snip"][lv][1] for lv in (0.9, 0.95, 0.97, 0.99)] == [
        0.2191,
        0.1846,
        0.1480,
        0.0524,
    ]
    assert math.isclose(COURSE["magnitude_blind"][0.95][1], 0.2074)


def test_registered_with_a_quick_config():
    assert "extreme-sparsity" in experiments.names()
    assert experiments.get("extreme-sparsity") is es
    quick = experiments.make_config("extreme-sparsity", quick=True)
    assert quick.nmt_hidden < es.Config().nmt_hidden == 256  # the full setting
    assert es.Config().levels == (0.5, 0.8, 0.9, 0.95, 0.97, 0.99, 0.995)


def test_course_score_is_snip_squared_on_the_same_data():
    """What the write-up says of the course project's "OBD": with the gradient accumulated over
    all the data, ½ (Σ_b ∂L_b/∂w)² w² = ½ N² (SNIP's |w ∂E/∂w|)², a monotone function of SNIP:
    the same ranking (float64 oracle on a small tanh net)."""
    import torch
    from torch import nn

    from optbrain.problem import Problem
    from optbrain.saliency import SNIP, AccumulatedGradient

    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=gen)
    problem = Problem(model, nn.CrossEntropyLoss(), [(x[:16], y[:16]), (x[16:], y[16:])])
    course, snip = AccumulatedGradient()(problem), SNIP(batches=None)(problem)
    for k in course:
        torch.testing.assert_close(course[k], 0.5 * (40 * snip[k]) ** 2)
