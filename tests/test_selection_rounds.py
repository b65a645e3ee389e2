"""Model selection over pruning rounds: FPE recorded by the loop, History.select, and restoring
the selected round's model from the run directory."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from optbrain import schedule as S
from optbrain.generalization import fpe
from optbrain.history import History, RoundRecord
from optbrain.loop import iterative_prune, load_round, round_path
from optbrain.masking import Mask, attach, current_mask
from optbrain.problem import Problem
from optbrain.pruners import gamma_obd

F64 = torch.float64


def _net(seed=0):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(F64)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=g, dtype=F64))
    return net


def _data(n=60, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=F64)
    y = torch.tanh(x[:, :1] - 0.5 * x[:, 1:2]) + 0.1 * torch.randn(n, 1, generator=g, dtype=F64)
    return x, y


def _retrain(data, lam):
    def retrain(model, r):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=lam)
        x, y = data
        for _ in range(30):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    return retrain


def _run(tmp_path, lam=0.01, rounds=3, **kw):
    data, val = _data(), _data(40, seed=2)
    model = _net()
    loss = nn.MSELoss()

    def evaluate(m):
        with torch.no_grad():
            return {"val_loss": float(loss(m(val[0]), val[1]))}

    history = iterative_prune(
        model,
        gamma_obd(lam),
        S.geometric(0.3),
        rounds=rounds,
        make_problem=lambda m: Problem(m, loss, data),
        retrain=_retrain(data, lam),
        evaluate=evaluate,
        checkpoint_dir=tmp_path,
        **kw,
    )
    return model, history, data


# ------------------------------------------------------------------------------ recording
def test_loop_records_fpe_and_keeps_every_round(tmp_path):
    lam = 0.01
    model, history, data = _run(
        tmp_path, lam, estimate_fpe={"weight_decay": lam, "form": "full"}, keep_rounds=True
    )
    assert [r.round for r in history.records] == [0, 1, 2, 3]
    for rec in history.records:
        g = rec.generalization
        assert set(g) >= {"fpe", "n_eff", "train_error", "gamma2", "n_params", "damping"}
        assert g["n_params"] == rec.remaining_params
        assert 0 < g["n_eff"] < rec.remaining_params
        fresh = _net(5)
        mask = load_round(fresh, tmp_path, rec.round)
        assert (mask.kept() if len(mask) else rec.total) == rec.remaining  # round 0: no mask
        est = fpe(Problem(fresh, nn.MSELoss(), data), lam, form="full")
        assert est.fpe == pytest.approx(g["fpe"], rel=1e-9)
    # the history on disk has the column too
    on_disk = History.load(tmp_path / "history.json")
    assert on_disk.column("generalization.fpe") == history.column("generalization.fpe")


def test_restore_a_selected_round_onto_the_pruned_model(tmp_path):
    model, history, data = _run(tmp_path, estimate_fpe=True, keep_rounds=True)
    final = current_mask(model)
    chosen = history.select("validation")
    first = history.records[1]
    assert round_path(tmp_path, 1).is_file()
    mask = load_round(model, tmp_path, first)  # the final (smaller) mask was attached
    assert mask.kept() == first.remaining > final.kept()
    with torch.no_grad():
        val = _data(40, seed=2)
        assert float(nn.functional.mse_loss(model(val[0]), val[1])) == pytest.approx(
            first.metrics["val_loss"], rel=1e-12
        )
    load_round(model, tmp_path, chosen)
    assert current_mask(model).kept() == chosen.remaining
    with pytest.raises(FileNotFoundError, match="keep_rounds=True"):
        load_round(model, tmp_path, 9)


def test_fpe_is_nan_where_undefined(tmp_path):
    model, history, _ = _run(tmp_path, rounds=1, estimate_fpe=True)
    assert all(math.isfinite(r.generalization["fpe"]) for r in history.records)
    data = _data(15)  # N = 15 < p = 26 without weight decay
    h = iterative_prune(
        _net(),
        gamma_obd(),
        S.one_shot(0.2),
        rounds=1,
        make_problem=lambda m: Problem(m, nn.MSELoss(), data),
        estimate_fpe=True,
    )
    assert all(math.isnan(r.generalization["fpe"]) for r in h.records)
    assert h.records[0].generalization["train_error"] > 0


def test_bad_loop_options(tmp_path):
    kw = {"rounds": 1, "make_problem": lambda m: Problem(m, nn.MSELoss(), _data())}
    with pytest.raises(ValueError, match="keep_rounds=True needs a checkpoint_dir"):
        iterative_prune(_net(), gamma_obd(), S.one_shot(0.2), keep_rounds=True, **kw)
    with pytest.raises(TypeError, match="estimate_fpe"):
        iterative_prune(_net(), gamma_obd(), S.one_shot(0.2), estimate_fpe="yes", **kw)
    with pytest.raises(ValueError, match="weight_decay"):
        iterative_prune(
            _net(), gamma_obd(), S.one_shot(0.2), estimate_fpe={"weight_decay": -1}, **kw
        )


# ------------------------------------------------------------------------------ History.select
def _history(rows):
    """rows: (remaining_params, fpe, val_loss, test_loss)."""
    h = History()
    for i, (p, f, v, t) in enumerate(rows):
        h.append(
            RoundRecord(
                round=i,
                target=0.0,
                sparsity=0.0,
                remaining=p,
                total=100,
                remaining_params=p,
                metrics={"val_loss": v, "test_loss": t, "val_accuracy": 1 - v},
                generalization={"fpe": f},
            )
        )
    return h


ROWS = [
    (100, 0.50, 0.40, 0.45),
    (80, 0.42, 0.35, 0.30),
    (60, 0.40, 0.36, 0.50),
    (40, 0.41, 0.33, 0.20),
    (20, 0.60, math.nan, 0.10),
]


def test_select_criteria():
    h = _history(ROWS)
    assert h.select("fpe").round == 2
    assert h.select("validation").round == 3
    assert h.select("validation", metric="val_accuracy").round == 3  # higher is better
    assert h.select("smallest_within", tolerance=0.0).round == 3
    # within 0.05 of the best validation loss (0.33): 0.35, 0.36, 0.33 qualify; smallest: 40
    assert h.select("smallest_within", tolerance=0.05).round == 3
    fpe_key = "generalization.fpe"
    assert h.select("smallest_within", tolerance=0.005, metric=fpe_key).round == 2
    assert h.select("smallest_within", tolerance=0.05, metric=fpe_key).round == 3
    assert h.select("smallest_within", tolerance=0.25, metric=fpe_key).round == 4
    # ties go to the smaller network
    tie = _history([(100, 0.3, 0.3, 0.3), (50, 0.3, 0.3, 0.3)])
    assert tie.select("fpe").round == 1


def test_select_refuses_bad_requests():
    h = _history(ROWS)
    with pytest.raises(ValueError, match="criterion must be one of"):
        h.select("aic")
    with pytest.raises(ValueError, match="refusing to select on 'metrics.test_loss'"):
        h.select("validation", metric="test_loss")
    with pytest.raises(ValueError, match="tolerance applies"):
        h.select("fpe", tolerance=0.1)
    with pytest.raises(ValueError, match="tolerance must be"):
        h.select("smallest_within", tolerance=-1)
    with pytest.raises(ValueError, match="no round has a finite"):
        _history([(10, math.nan, math.nan, 0.1)]).select("fpe")


def test_old_histories_load_without_the_new_column(tmp_path):
    h = _history(ROWS[:2])
    d = h.to_dict()
    for r in d["records"]:
        del r["generalization"]
    path = tmp_path / "history.json"
    path.write_text(json.dumps(d))
    old = History.load(path)
    assert old.records[0].generalization == {}
    assert math.isnan(old.column("generalization.fpe")[0])


def test_load_round_replaces_a_mask_that_is_attached(tmp_path):
    net = _net()
    m = Mask.ones(net)
    from optbrain.masking import save_pruned

    save_pruned(net, round_path(tmp_path, 0))
    attach(net, m.with_pruned({"0.weight": [0, 1, 2]}))
    assert current_mask(net).pruned() == 3
    restored = load_round(net, tmp_path, 0)
    assert len(restored) == 0 and len(current_mask(net)) == 0


# ------------------------------------------------------------------------------ report
def test_report_plots_and_names_the_selected_rounds(tmp_path):
    pytest.importorskip("matplotlib")
    from optbrain import report

    _, history, _ = _run(tmp_path / "run", estimate_fpe=True)
    fpe_round = history.select("fpe")
    val_round = history.select("validation")
    out = tmp_path / "rep"
    path = report.write_report(out, {"gamma_obd": history}, "t")
    text = path.read_text()
    assert (out / "generalization_vs_params.png").read_bytes()[:4] == b"\x89PNG"
    assert "![generalization vs params](generalization_vs_params.png)" in text
    assert f"FPE selects round {fpe_round.round} " in text
    assert f"validation loss selects round {val_round.round} " in text
    assert "| gamma_obd FPE | gamma_obd N_eff |" in text
    # a run without FPE gets neither the figure nor the lines
    plain = History.from_dict(history.to_dict())
    for r in plain.records:
        r.generalization = {}
    text = report.write_report(tmp_path / "plain", {"obd": plain}, "t").read_text()
    assert "generalization_vs_params" not in text and "FPE selects" not in text
