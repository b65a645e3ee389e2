"""optbrain.tasks: resolving `module:function` / `file.py:function`, validating, pruning a task."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fixtures_task as fx
from optbrain import tasks
from optbrain.history import History
from optbrain.masking import current_mask, load_pruned
from optbrain.pruners import METHODS as ob_methods
from optbrain.tasks import Task, TaskError

FIXTURE = Path(__file__).with_name("fixtures_task.py")


def load_model(path):
    model = fx.make_model()
    load_pruned(model, path)
    return model


@pytest.fixture(autouse=True)
def _isolated_imports(monkeypatch):
    """Undo the sys.path and sys.modules entries that importing tasks adds."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    for name in set(sys.modules) - before:
        if name.startswith(("_optbrain_task_", "my_task_mod", "broken_")):
            del sys.modules[name]


# ------------------------------------------------------------------------------ resolving
def test_module_form_is_imported_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "my_task_mod.py").write_text(
        "from fixtures_task import task\n\ndef other():\n    return task()\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(FIXTURE.parent))  # so that it can import the fixture
    sys.path[:] = [p for p in sys.path if p not in ("", str(tmp_path))]
    fn = tasks.resolve("my_task_mod:other")
    assert fn.__name__ == "other"
    assert str(tmp_path) in sys.path
    task = tasks.load_task("my_task_mod:other")
    assert isinstance(task, Task) and task.name == "my_task_mod:other"


def test_file_form(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task = tasks.load_task(f"{FIXTURE}:task")
    assert isinstance(task.model, torch.nn.Module) and task.val_loader is None
    assert task.test_loader is not None and set(task.loaders()) == {"test"}
    # relative path, dotted attribute
    rel = Path("sub") / "t.py"
    (tmp_path / "sub").mkdir()
    (tmp_path / rel).write_text(
        "import fixtures_task\n\nclass Holder:\n    make = staticmethod(fixtures_task.task)\n"
    )
    monkeypatch.syspath_prepend(str(FIXTURE.parent))
    assert tasks.resolve(f"{rel}:Holder.make") is not None


def test_dict_form_with_tensor_pair_and_val_loader():
    task = tasks.as_task(fx.task_dict(), "t")
    assert set(task.loaders()) == {"val", "test"}
    x, y = next(iter(task.test_loader))  # (X, Y) became one batch
    assert x.shape == (30, fx.N_IN) and y.shape == (30,)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("no_colon", "must be 'module:function'"),
        ("mod:", "must be 'module:function'"),
        (":fn", "must be 'module:function'"),
        ("mod:not-an-identifier", "must be 'module:function'"),
        ("no_such_module_xyz:task", "no module named 'no_such_module_xyz'"),
        ("fixtures_task:nope", "has no attribute 'nope'; its callables are"),
        ("fixtures_task:NOT_CALLABLE", "is a builtins.int, not a function"),
        ("fixtures_task:raises", "raised RuntimeError: the data server is down"),
        ("fixtures_task:needs_argument", "takes no arguments"),
        ("missing/file.py:task", "no such file"),
    ],
)
def test_resolve_errors(spec, match):
    with pytest.raises(TaskError, match=match):
        tasks.load_task(spec)


def test_import_errors_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken_dep_mod.py").write_text("import no_such_dependency_xyz\n")
    (tmp_path / "broken_code_mod.py").write_text("1 / 0\n")
    with pytest.raises(TaskError, match="importing module 'broken_dep_mod' failed.*no_such_dep"):
        tasks.resolve("broken_dep_mod:f")
    with pytest.raises(TaskError, match="raised ZeroDivisionError"):
        tasks.resolve("broken_code_mod:f")
    with pytest.raises(TaskError, match="raised ZeroDivisionError"):
        tasks.resolve("broken_code_mod.py:f")
    with pytest.raises(TaskError, match="not"):
        tasks.resolve(3)


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "fn, match",
    [
        ("returns_string", r"returned a builtins\.str; expected a tuple \(model, loss_fn"),
        ("returns_two", r"returned a tuple of 2 items \(Sequential, CrossEntropyLoss\); expected"),
        ("wrong_model", "returned a builtins.str as the model; expected a torch.nn.Module"),
        ("misspelt_key", r"unknown \['test_laoder'\] keys"),
        ("iterator_loader", "one-shot iterator"),
        ("unbatched_loader", r"train_loader yields a torch\.Tensor; expected \(input, target\)"),
        ("vector_loss", r"gave \(32,\); expected a scalar tensor"),
    ],
)
def test_wrong_returns_raise_task_error(fn, match):
    with pytest.raises(TaskError, match=match) as exc:
        tasks.load_task(f"fixtures_task:{fn}")
    assert f"task fixtures_task:{fn}" in str(exc.value)


def test_as_task_checks(tmp_path):
    model, loss_fn, train_loader, test_loader = fx.task()
    with pytest.raises(TaskError, match=r"missing \['train_loader'\]"):
        tasks.as_task({"model": model, "loss_fn": loss_fn})
    with pytest.raises(TaskError, match="as the loss"):
        tasks.as_task((model, 3, train_loader, test_loader))
    with pytest.raises(TaskError, match="empty train_loader"):
        tasks.as_task((model, loss_fn, [], None))
    with pytest.raises(TaskError, match="as train_loader"):
        tasks.as_task((model, loss_fn, torch.zeros(3, 8), None))
    with pytest.raises(TaskError, match="rows"):
        tasks.as_task((model, loss_fn, (torch.zeros(3, 8), torch.zeros(2)), None))
    with pytest.raises(TaskError, match="no prunable weight"):
        tasks.as_task((torch.nn.Tanh(), loss_fn, train_loader, None))
    with pytest.raises(TaskError, match="raised RuntimeError"):
        bad = [(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long))]  # wrong input width
        tasks.as_task((model, loss_fn, bad, None))
    ok = tasks.as_task((model, loss_fn, train_loader, None))
    assert tasks.as_task(ok) is ok and ok.loaders() == {}


# ------------------------------------------------------------------------------ prune
@pytest.mark.parametrize("method", tasks.METHODS)
def test_prune_every_method(method, tmp_path):
    out = tmp_path / "run"
    spec = (
        "fixtures_task:task_dict" if ob_methods[method].needs_validation else "fixtures_task:task"
    )
    res = tasks.prune(spec, method=method, sparsity=0.6, rounds=2, retrain_epochs=1, out_dir=out)
    h = res.history
    assert [r.round for r in h.records] == [0, 1, 2]
    if method == "ocd":  # the target counts input cells: 5 of 8 inputs, 16 fan-out weights each
        assert h.records[-1].sparsity == pytest.approx(5 * 16 / (8 * 16 + 16 * 3))
    elif method == "unit_obs":  # whole units until the weight target is reached
        assert 0.6 <= h.records[-1].sparsity <= 0.6 + 16 / (8 * 16 + 16 * 3)
    else:
        assert h.records[-1].sparsity == pytest.approx(0.6, abs=0.01)
    assert "test_accuracy" in h.records[0].metrics
    assert History.load(out / method / "history.json").to_dict() == h.to_dict()
    mask = load_pruned(fx.make_model(), out / method / "model.pt")
    assert mask.sparsity() == pytest.approx(h.records[-1].sparsity)
    assert (out / "report.md").is_file() and str(res) == res.table
    assert ("dE pred" in res.table) == ob_methods[method].predicts_objective


def test_a_method_needing_validation_data_names_the_missing_loader(tmp_path):
    with pytest.raises(tasks.TaskError, match="val_loader"):
        tasks.prune("fixtures_task:task", method="validation_obd", rounds=1, out_dir=tmp_path)


@pytest.mark.parametrize("method, epochs, chosen", [("auto", 0, "layerwise_obs"), (None, 1, "obd")])
def test_auto_is_the_method_measured_best(method, epochs, chosen, tmp_path):
    """The default method is the recommended one (docs/benchmarks.md): one-shot without a
    retraining budget, the one measured best with retraining otherwise."""
    from optbrain.pruners import RECOMMENDED, recommended

    assert recommended(0) == RECOMMENDED["one_shot"] == "layerwise_obs"
    assert recommended(3) == RECOMMENDED["retrained"] == "obd"
    res = tasks.prune(
        "fixtures_task:task",
        method=method,
        sparsity=0.5,
        rounds=1,
        retrain_epochs=epochs,
        out_dir=tmp_path,
    )
    assert res.history.config["method"] == chosen
    assert (tmp_path / chosen / "model.pt").is_file()


@pytest.mark.parametrize("method", ["snip", "random"])
def test_a_method_that_needs_retraining_is_refused_without_a_budget(method, tmp_path):
    with pytest.raises(ValueError, match=rf"{method!r} needs retraining.*retrain_epochs >= 1"):
        tasks.prune("fixtures_task:task", method=method, retrain_epochs=0, out_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written
    from optbrain import cli

    code = cli.main(
        ["prune", "--task", "fixtures_task:task", "--method", method, "--retrain-epochs", "0",
         "--out", str(tmp_path), "--no-progress"]
    )  # fmt: skip
    assert code == 2


def test_prune_regression_task_and_schedules(tmp_path):
    res = tasks.prune(
        tasks.load_task("fixtures_task:regression_task"),
        method="magnitude",
        sparsity=0.5,
        rounds=2,
        retrain_epochs=0,
        out_dir=tmp_path,
        schedule="linear",
    )
    assert "train_loss" in res.history.records[0].metrics  # no val/test: training metrics
    assert [r.target for r in res.history.records] == [0.0, 0.25, 0.5]
    assert "largest compression" not in res.table  # no accuracy, no default tolerance
    assert current_mask(res.history and load_model(tmp_path / "magnitude" / "model.pt"))


def test_prune_resume_and_restart(tmp_path):
    kw = dict(method="obd", sparsity=0.5, rounds=2, retrain_epochs=1, out_dir=tmp_path)
    first = tasks.prune("fixtures_task:task", **kw)
    again = tasks.prune("fixtures_task:task", resume=True, **kw)  # finished: nothing to do
    assert again.history.to_dict() == first.history.to_dict()
    from optbrain.loop import CheckpointError

    with pytest.raises(CheckpointError, match="another configuration"):
        tasks.prune("fixtures_task:task", resume=True, **{**kw, "sparsity": 0.7})
    with pytest.raises(tasks.RunExistsError, match="a finished run .*--force"):
        tasks.prune("fixtures_task:task", **{**kw, "sparsity": 0.7})  # never replaced unasked
    assert tasks.prune("fixtures_task:task", resume=True, **kw).history.to_dict() == (
        first.history.to_dict()  # and left as it was
    )
    fresh = tasks.prune("fixtures_task:task", force=True, **{**kw, "sparsity": 0.7})  # replaced
    assert fresh.history.records[-1].sparsity == pytest.approx(0.7, abs=0.01)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"method": "nope"}, "unknown method"),
        ({"sparsity": 90}, "did you mean 0.9"),
        ({"sparsity": 0.0}, "fraction"),
        ({"rounds": 0}, "rounds"),
        ({"retrain_epochs": -1}, "retrain_epochs"),
        ({"schedule": "exp"}, "unknown schedule"),
    ],
)
def test_prune_rejects_bad_arguments(kw, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        tasks.prune("fixtures_task:task", out_dir=tmp_path, **kw)
    assert not any(tmp_path.iterdir())  # nothing written
