"""The generalisation machinery through ``optbrain prune`` and ``ob.prune``: weight decay, FPE per
round, selection of a round on FPE or validation (never test), γOBD's stopping rule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import optbrain as ob
from optbrain import cli, masking
from optbrain.history import History
from optbrain.report.tables import largest_compression

FIXTURE = Path(__file__).with_name("fixtures_task.py")
WITH_VAL = f"{FIXTURE}:task_dict"  # train, val and test
NO_VAL = f"{FIXTURE}:task"  # train and test


def _prune(out: Path, *args: str, task: str = WITH_VAL) -> int:
    base = ["prune", "--task", task, "--rounds", "2", "--sparsity", "0.6", "--out", str(out)]
    try:
        return cli.main([*base, *args, "--no-progress"])
    except SystemExit as exc:  # argparse's refusal of a bad value
        return exc.code


def test_gamma_obd_with_weight_decay_records_fpe_and_selects_on_it(tmp_path, capsys):
    import fixtures_task

    out = tmp_path / "run"
    args = ["--method", "gamma_obd", "--weight-decay", "1e-3", "--fpe", "--select", "fpe"]
    assert _prune(out, *args) == 0
    text = capsys.readouterr().out
    history = History.load(out / "gamma_obd" / "history.json")
    # every round has its FPE; the unpruned 195 parameters on 96 samples have none (N ≤ N_eff)
    assert all("fpe" in r.generalization for r in history.records)
    fpes = history.column("generalization.fpe")
    assert math.isnan(fpes[0]) and all(math.isfinite(v) for v in fpes[1:])
    for rec in history.records[1:]:  # weight decay: N_eff < p
        assert rec.generalization["n_eff"] < rec.generalization["n_params"]
    cfg = history.config
    assert cfg["weight_decay"] == 1e-3 and cfg["fpe"] == "diagonal" and cfg["select"] == "fpe"
    assert "weight_decay=0.001" in cfg["pruner"]  # the saliency uses λ too
    chosen = history.select("fpe")
    assert f"FPE selects round {chosen.round}" in text
    report = (out / "report.md").read_text()
    assert "| γOBD FPE" in report or "FPE |" in report
    assert f"FPE selects round {chosen.round}" in report
    # the selected round's model was kept and saved
    model = fixtures_task.make_model()
    mask = masking.load_pruned(model, out / "gamma_obd" / "model_selected.pt")
    assert mask.sparsity() == pytest.approx(chosen.sparsity)
    assert json.loads((out / "run.json").read_text())  # the report can be regenerated
    assert cli.main(["report", str(out)]) == 0


def test_largest_compression_is_picked_on_validation_when_there_is_one(tmp_path, capsys):
    out = tmp_path / "run"
    assert _prune(out, "--method", "magnitude") == 0
    text = capsys.readouterr().out
    assert "largest compression within 1 point of the unpruned val accuracy" in text
    assert "of the unpruned test accuracy" not in text
    history = History.load(out / "magnitude" / "history.json")
    chosen = largest_compression(history, "metrics.val_accuracy", 0.01).record
    line = next(s for s in text.splitlines() if s.strip().startswith("magnitude"))
    assert f"round {chosen.round}:" in line or (chosen.round == 0 and "no pruned" in line)
    if chosen.round:
        test_acc = chosen.metrics["test_accuracy"]
        assert f"test accuracy {100 * test_acc:.2f}%" in line  # reported, not chosen on
    report = (out / "report.md").read_text()
    assert "unpruned val accuracy" in report and "chosen on the validation set" in report


def test_select_validation_keeps_the_best_validation_round(tmp_path, capsys):
    import fixtures_task

    out = tmp_path / "run"
    assert _prune(out, "--method", "obd", "--select", "validation") == 0
    history = History.load(out / "obd" / "history.json")
    chosen = history.select("validation")
    assert f"validation loss selects round {chosen.round}" in capsys.readouterr().out
    mask = masking.load_pruned(fixtures_task.make_model(), out / "obd" / "model_selected.pt")
    assert mask.sparsity() == pytest.approx(chosen.sparsity)


@pytest.mark.parametrize(
    "args, task, match",
    [
        (["--select", "validation"], NO_VAL, "needs a validation loader"),
        (["--weight-decay", "-1"], WITH_VAL, "expected a number >= 0, got -1"),
        (["--stop-saliency", "nan"], WITH_VAL, "expected a finite number, got nan"),
        (["--fpe", "exact"], WITH_VAL, "invalid choice: 'exact'"),
    ],
)
def test_bad_generalisation_options_are_clear_errors(args, task, match, tmp_path, capsys):
    out = tmp_path / "run"
    assert _prune(out, *args, task=task) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not (out / "obd" / "checkpoint.pt").exists()


def test_python_prune_takes_the_same_options():
    import fixtures_task

    task = fixtures_task.task_dict()
    model, loss_fn, train, val, test = (task[k] for k in ob.tasks._KEYS)
    res = ob.prune(
        model,
        loss_fn,
        train,
        val_data=val,
        test_data=test,
        method="gamma_obd",
        sparsity=0.6,
        rounds=2,
        weight_decay=1e-3,
        fpe="diagonal",
        select="fpe",
    )
    assert math.isfinite(res.history.column("generalization.fpe")[-1])
    assert res.selected is not None and res.selected.round == res.history.select("fpe").round
    assert masking.current_mask(res.selected_model).sparsity() == pytest.approx(
        res.selected.sparsity
    )
    # γOBD's stopping rule: a threshold below every saliency stops before the first deletion
    stopped = ob.prune(
        fixtures_task.make_model(), loss_fn, train, method="gamma_obd", rounds=2,
        sparsity=0.6, stop_saliency=-1e9,
    )  # fmt: skip
    assert stopped.history.stopped.startswith("smallest saliency")
    assert [r.round for r in stopped.history.records] == [0]
