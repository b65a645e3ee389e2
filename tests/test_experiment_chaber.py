"""The chaber2018-ph reproduction: a tiny run end to end, the selection helper, settings, and the
ready-made sequence task through optbrain.tasks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from optbrain import experiments
from optbrain.experiments import apply_overrides
from optbrain.experiments import chaber2018_ph as ch
from optbrain.history import History, RoundRecord

pytest.importorskip("matplotlib")

TINY = {
    "n_train": 240,
    "n_val": 130,
    "n_test": 130,
    "hold_max": 12,
    "orders": "1,2",
    "hidden": "3",
    "segment": 40,
    "max_iter": 20,
    "per_round": 0.25,
    "max_sparsity": 0.5,
    "retrain_max_iter": 10,
    "rnn_cells": "gru",
    "narmax": "false",
    "rnn_hidden": 3,
    "figure_dpi": 30,
}


def test_tiny_run_writes_claims_tables_and_figures(tmp_path):
    cfg = experiments.make_config("chaber2018-ph", quick=True, overrides=TINY)
    result = ch.run(cfg, tmp_path)
    assert [c.name.split(" (")[0] for c in result.claims] == [
        "about 60 % of the parameters removed",
        "about 30 % lower validation error than the full model",
    ]
    rows = result.tables["full_vs_pruned"]
    assert len(rows) == 2 * 2 * 2  # 2 structures × 2 methods × (best, smallest)
    assert {r["model"] for r in rows} == {"nA=nB=1, K=3", "nA=nB=2, K=3"}
    models = [r["model"] for r in result.tables["models"]]
    assert "GRU" in models and "NARX (one-step trained)" in models
    for fig in result.figures:
        assert (tmp_path / fig).stat().st_size > 1000
    assert set(result.figures) == {
        "figures/ph_test_trajectories.png",
        "figures/error_vs_parameters.png",
    }
    runs = json.loads((tmp_path / "runs.json").read_text())
    entry = runs["cells"]["nA=nB=2, K=3"]["0"]
    assert entry["params"] == (2 + 2 - 1 + 3) * 3 + 1
    hist = History.from_dict(entry["methods"]["obd"]["history"])
    assert hist.records[0].remaining_params == entry["params"]  # biases prunable
    assert hist.records[1].remaining_params == entry["params"] - round(0.25 * entry["params"])
    assert math.isfinite(entry["full"]["val_loss"])
    assert (tmp_path / "report.md").read_text().count("| **no** |") + (
        tmp_path / "report.md"
    ).read_text().count("| yes |") == 2


def test_quick_run_through_the_cli(tmp_path):
    from optbrain import cli
    from optbrain.experiments import Result

    out = tmp_path / "q"
    assert cli.main(
        ["reproduce", "chaber2018-ph", "--quick", "--out", str(out), "--no-progress"]
    ) in (0, 1)
    result = Result.load(out)
    assert ch.Config.from_dict(result.config) == ch.Config.quick()
    assert len(result.claims) == 2 and len(result.figures) == 2
    removed = [r["removed"] for r in result.tables["full_vs_pruned"]]
    assert all(r.endswith("%") for r in removed)


def _history(vals_params: list[tuple[float, int]]) -> History:
    h = History()
    for r, (v, n) in enumerate(vals_params):
        h.append(RoundRecord(r, 0.0, 0.0, n, 100, n, metrics={"val_loss": v, "test_loss": 2 * v}))
    return h


def test_select_best_and_smallest_within_tolerance():
    h = _history([(1.0, 100), (0.9, 90), (0.8, 80), (0.85, 70), (0.87, 60), (0.95, 50)])
    sel = ch.select(h, tolerance=0.1)
    assert sel["best"]["round"] == 2 and sel["best"]["remaining_params"] == 80
    assert sel["smallest"]["round"] == 4 and sel["smallest"]["test_loss"] == pytest.approx(1.74)
    assert ch.select(h, tolerance=0.0)["smallest"]["round"] == 2
    # the unpruned round is never selected, even when it is the best
    h0 = _history([(0.5, 100), (0.9, 90), (0.7, 80)])
    assert ch.select(h0, 0.1)["best"]["round"] == 2
    assert ch.select(_history([(0.5, 100)]), 0.1) == {}


@pytest.mark.parametrize(
    "key, value, what",
    [
        ("orders", "0", "orders"),
        ("segment", "3000", "n_train"),
        ("per_round", "0", "per_round"),
        ("stop_factor", "1", "stop_factor"),
        ("eval_start", "1", "eval_start"),
        ("delay", "4", "delay"),
    ],
)
def test_bad_settings_are_refused(key, value, what):
    with pytest.raises(ValueError, match=what):
        apply_overrides(ch.Config(), {key: value})


def test_quick_config_is_registered():
    assert "chaber2018-ph" in experiments.names()
    quick = experiments.make_config("chaber2018-ph", quick=True)
    assert quick.seeds == (0,) and len(quick.cells()) == 1


def test_sequence_task_prunes_through_optbrain_tasks(tmp_path):
    from optbrain.masking import current_mask, load_pruned
    from optbrain.models.ph_task import make_model
    from optbrain.tasks import load_task, prune

    task = load_task("optbrain.models.ph_task:prune_task")
    x, y = task.train_loader[0]
    assert x.shape[1:] == (100, 2) and y.shape[1:] == (98, 1)
    assert task.val_loader[0][0].shape[0] == 1  # the whole validation sequence is one sample
    result = prune(task, "obd", sparsity=0.3, rounds=1, retrain_epochs=2, lr=1e-3, out_dir=tmp_path)
    rec = result.history.last
    assert rec.round == 1 and rec.sparsity == pytest.approx(0.3, abs=0.03)
    assert math.isfinite(rec.metrics["test_loss"])
    fresh = make_model()
    mask = load_pruned(fresh, result.model_path)
    assert mask == current_mask(task.model)
    with torch.no_grad():
        assert torch.allclose(fresh(x), task.model(x))


def test_one_step_view_is_obd_without_the_feedback_term():
    from optbrain.curvature import GGNDiagonal
    from optbrain.models.sequences import sequence_problem
    from optbrain.models.sysid import NARX, OutputError

    g = torch.Generator().manual_seed(0)
    u = 12 + 7 * torch.rand(80, 1, generator=g, dtype=torch.float64)
    y = 7 + torch.randn(80, 1, generator=g, dtype=torch.float64).cumsum(0) * 0.1
    oe = OutputError(2, 2, 3, seed=1).double().fit_scaling(u, y)
    narx = NARX(2, 2, 3).double()
    narx.load_state_dict(oe.state_dict())
    view = ch._OneStepView(oe)
    assert [n for n, _ in view.named_parameters()] == [n for n, _ in oe.named_parameters()]
    got = GGNDiagonal().diagonal(sequence_problem(view, u, y, 40))
    want = GGNDiagonal().diagonal(sequence_problem(narx, u, y, 40))
    through = GGNDiagonal().diagonal(sequence_problem(oe, u, y, 40))
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-10, atol=1e-14)
    assert not torch.allclose(got["hidden.weight"], through["hidden.weight"], rtol=0.05)


def test_narmax_baseline_picks_the_best_validation_point():
    pytest.importorskip("sysidentpy")
    from optbrain.data.ph_reactor import SequenceSpec, make_sequences
    from optbrain.experiments.narmax_baseline import fit_narmax

    data = make_sequences(SequenceSpec(n_train=300, n_val=150, n_test=150), 0)
    r = fit_narmax(data, degrees=(1,), lags=(1, 2), start=5)
    assert len(r["grid"]) == 2 and r["degree"] == 1
    assert r["val_loss"] == min(g["val_loss"] for g in r["grid"])
    variance = float(data.val.y[5:].var())
    assert 0 < r["val_loss"] < variance  # a linear ARX model beats the mean in simulation
