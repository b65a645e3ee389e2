"""Safe defaults and bad input a first user meets: unsafe files refused, the user's umask, runs
never replaced unasked, NaN/inf named with split and batch, identical resumes, one --threads
default, the --quick banner."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

import optbrain as ob
from optbrain import cli, masking, tasks
from optbrain.errors import NonFiniteDataError, UnsafeFileError
from optbrain.loop import CHECKPOINT, iterative_prune
from optbrain.train import evaluate, train

FIXTURE = Path(__file__).with_name("fixtures_task.py")


class _RunsCode:
    """Unpickling this runs ``os.system`` (what a malicious checkpoint does)."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _evil(path: Path) -> None:
    torch.save({"format": "optbrain-checkpoint-3", "history": _RunsCode()}, path)


def _tiny():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)), x, (x[:, 0] > 0).long()


# ------------------------------------------------------------------------ files loaded safely
def test_a_checkpoint_with_pickled_code_is_refused_and_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, x, y = _tiny()
    _evil(tmp_path / CHECKPOINT)
    with pytest.raises(UnsafeFileError, match="pickled objects or code"):
        iterative_prune(
            model,
            ob.magnitude(),
            ob.schedule.one_shot(0.5),
            rounds=1,
            make_problem=lambda m: ob.Problem(m, nn.CrossEntropyLoss(), (x, y)),
            checkpoint_dir=tmp_path,
        )
    with pytest.raises(UnsafeFileError):
        masking.load_pruned(model, tmp_path / CHECKPOINT)
    assert not (tmp_path / "PWNED").exists()


def test_cli_resume_from_a_checkpoint_with_code_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / "obd").mkdir(parents=True)
    _evil(tmp_path / "run" / "obd" / CHECKPOINT)
    argv = ["prune", "--task", f"{FIXTURE}:task", "--rounds", "1", "--out", "run", "--resume"]
    assert cli.main([*argv, "--no-progress"]) == 2
    assert "refused to load" in capsys.readouterr().err
    assert not (tmp_path / "PWNED").exists()


# ------------------------------------------------------------------------ the user's umask
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


def test_files_are_written_with_the_users_umask(tmp_path, umask_022, capsys):
    argv = ["prune", "--task", f"{FIXTURE}:task", "--rounds", "1", "--out", str(tmp_path)]
    assert cli.main([*argv, "--no-progress"]) == 0
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in written}
    assert {"checkpoint.pt", "history.json", "model.pt", "report.md"} <= names
    for p in written:
        assert stat.S_IMODE(p.stat().st_mode) == umask_022, p


# ------------------------------------------------------------------------ never replaced unasked
def test_prune_out_on_a_finished_run_refuses_without_force(tmp_path, capsys):
    argv = ["prune", "--task", f"{FIXTURE}:task", "--rounds", "1", "--out", str(tmp_path)]
    assert cli.main([*argv, "--no-progress"]) == 0
    model_file = tmp_path / "obd" / "model.pt"
    before = model_file.read_bytes()
    capsys.readouterr()
    assert cli.main([*argv, "--sparsity", "0.5", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds a finished run" in err and "--force" in err and "--resume" in err
    assert model_file.read_bytes() == before
    assert cli.main([*argv, "--sparsity", "0.5", "--force", "--no-progress"]) == 0
    assert model_file.read_bytes() != before


# ------------------------------------------------------------------------ NaN and inf in data
@pytest.mark.parametrize(
    "task, split, batch",
    [
        ("nan_in_train_batch_3", "train", "batch 3"),
        ("nan_in_test_only", "test", "batch 2"),
        ("inf_in_val_targets", "val", "infinite value(s) in the targets of batch 1"),
    ],
)
def test_nan_or_inf_in_any_split_is_named_before_work_starts(task, split, batch, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["prune", "--task", f"{FIXTURE}:{task}", "--rounds", "1", "--out", str(out)]
    assert cli.main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"the {split} data has" in err and batch in err
    assert not out.exists()  # nothing written: found before any work


def test_nan_appearing_mid_run_is_named_and_leaves_no_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["prune", "--task", f"{FIXTURE}:nan_appears_later", "--rounds", "2", "--out", str(out)]
    assert cli.main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the test data has 1 NaN" in err and "batch 2 (pass" in err
    assert not (out / "obd" / CHECKPOINT).exists() and not (out / "obd" / "history.json").exists()


def test_train_and_evaluate_name_the_batch_with_nan():
    model, x, y = _tiny()
    x[20, 1] = float("nan")
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]
    with pytest.raises(NonFiniteDataError, match="training data .* batch 1 \\(epoch 1\\)"):
        train(model, batches, nn.CrossEntropyLoss(), epochs=1)
    with pytest.raises(NonFiniteDataError, match="batch 1"):
        evaluate(model, batches, nn.CrossEntropyLoss())


# ------------------------------------------------------------------------ identical resume
def test_resumed_prune_with_a_shuffling_loader_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    kw = dict(method="obd", sparsity=0.6, rounds=3, retrain_epochs=1)
    full = tasks.prune(f"{FIXTURE}:task", out_dir=tmp_path / "full", **kw).history
    calls = []
    real_train = train

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the retraining of round 2
            raise KeyboardInterrupt("simulated crash")
        return real_train(*args, **kwargs)

    monkeypatch.setattr("optbrain.train.train", crashing)
    with pytest.raises(KeyboardInterrupt):
        tasks.prune(f"{FIXTURE}:task", out_dir=tmp_path / "cut", **kw)
    monkeypatch.setattr("optbrain.train.train", real_train)
    resumed = tasks.prune(f"{FIXTURE}:task", out_dir=tmp_path / "cut", resume=True, **kw).history

    def strip(h):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in h.to_dict()["records"]]

    assert strip(resumed) == strip(full)  # exactly, not to 1e-8


# ------------------------------------------------------------------------ CLI consistency
def test_every_command_has_the_same_threads_default():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    defaults = {
        name: p.get_default("threads")
        for name, p in sub.choices.items()
        if any(a.dest == "threads" for a in p._actions)
    }
    assert set(defaults) == {"demo", "curvature", "reproduce", "prune", "quantize"}
    assert set(defaults.values()) == {1}
