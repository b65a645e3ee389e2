"""The ``optbrain`` command line: demo, curvature, list, reproduce, prune, report."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from optbrain import cli, curvature_report, experiments, masking
from optbrain.curvature.base import DiagonalEstimator
from optbrain.history import History

FIXTURE = Path(__file__).with_name("fixtures_task.py")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "optbrain", *args], capture_output=True, text=True, timeout=120
    )


def test_version_via_python_m():
    from importlib.metadata import version

    res = _run("--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"optbrain {version('optbrain')}"


def test_version_via_main(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("optbrain ")


@pytest.mark.parametrize(
    "argv",
    [
        ["curvature", "--epochs", "x"],
        ["curvature", "--epochs", "-1"],
        ["curvature", "--hutchinson-samples", "0"],
        ["curvature", "--no-such-flag"],
        ["demo", "--rate", "1.5"],
        ["demo", "--rounds", "0"],
        ["demo", "--hutchinson-samples", "4"],
        ["no-such-command"],
        ["reproduce"],
        ["prune"],
        ["prune", "--task", "m:f", "--sparsity", "90"],
        ["prune", "--task", "m:f", "--method", "nope"],
        ["prune", "--task", "m:f", "--lr", "0"],
        ["report"],
    ],
)
def test_bad_arguments_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    for command in ("demo", "curvature", "list", "reproduce", "prune", "report"):
        assert command in err


def test_curvature_command_runs(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(
        [
            "curvature",
            "--epochs",
            "2",
            "--no-progress",
            "--hutchinson-samples",
            "4",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "trained 2 epochs" in text
    for label in ["GGN (exact)", "LeCun (Gauss-Newton)", "LeCun (full)", "Hessian (exact)",
                  "Empirical Fisher", "MC Fisher (1 sample)", "Hutchinson (4)"]:  # fmt: skip
        assert label in text
    assert (out / "curvature.txt").read_text().strip() in text
    data = json.loads((out / "curvature.json").read_text())
    assert data["n_params"] == 50_610 and len(data["rows"]) == 7
    assert data["layers"] == ["0", "2", "4"]
    rows = {r["label"]: r for r in data["rows"]}
    # the Gauss-Newton recursion is exact for the output layer; GGN diagonals are >= 0
    ggn, lecun = rows["GGN (exact)"], rows["LeCun (Gauss-Newton)"]
    assert lecun["layer_saliency"]["4"] == pytest.approx(ggn["layer_saliency"]["4"], rel=1e-4)
    assert ggn["min_diag"] >= 0 and lecun["min_diag"] >= 0
    assert all(r["ratio"] > 0 for r in data["rows"])
    # every estimator says which engine it took on the MLP (an nn.Sequential chain)
    assert rows["GGN (exact)"]["engine"].startswith("chain: ")
    assert rows["Hutchinson (4)"]["engine"].startswith("generic: ")
    assert "engine chain: an nn.Sequential chain of registry layers -- GGN (exact)" in text


# ------------------------------------------------------------------------------ demo.run
class _SquaredWeights(DiagonalEstimator):
    """A stand-in estimator: h = w² (not a curvature; only exercises the demo's plumbing)."""

    def diagonal(self, problem):
        params = problem.parameters()
        for i in range(3):
            if self.progress is not None:
                self.progress(i + 1, 3)
        return {k: v.detach() ** 2 for k, v in params.items()}


class _Scaled(DiagonalEstimator):
    def __init__(self, factor, **kw):
        super().__init__(**kw)
        self.factor = factor

    def diagonal(self, problem):
        return {k: self.factor * v.detach() ** 2 for k, v in problem.parameters().items()}


def test_demo_run_with_stand_in_estimators_is_silent(capsys, tmp_path):
    ests = [
        curvature_report.ReportEstimator("reference", _SquaredWeights()),
        curvature_report.ReportEstimator("scaled", _Scaled(3.0)),
        curvature_report.ReportEstimator(
            "last layer", _Scaled(2.0), params=("4.weight", "4.bias"), note="L4"
        ),
    ]
    res = curvature_report.run(epochs=1, seed=1, progress=False, estimators=ests, repeats=1)
    assert capsys.readouterr() == ("", "")
    assert isinstance(res, curvature_report.CurvatureReport) and str(res) == res.table
    assert res.layers == ["0", "2", "4"] and res.n_params == 50_610
    ref, scaled, last = res.rows
    assert ref.spearman_diag is None and scaled.spearman_diag == pytest.approx(1.0)
    assert scaled.spearman_saliency == pytest.approx(1.0)
    for layer in res.layers:
        assert scaled.layer_saliency[layer] == pytest.approx(3 * ref.layer_saliency[layer])
    assert last.layer_saliency["0"] is None and last.n_params == 1010
    assert last.layer_saliency["4"] == pytest.approx(2 * ref.layer_saliency["4"])
    assert "last layer*" in res.table and "* L4" in res.table
    assert all(len(line) <= 100 for line in res.table.splitlines())
    paths = res.save(tmp_path)
    assert [p.name for p in paths] == ["curvature.txt", "curvature.json"]


def test_demo_progress_goes_to_stderr(capsys):
    pytest.importorskip("tqdm")
    ests = [curvature_report.ReportEstimator("reference", _SquaredWeights())]
    res = curvature_report.run(epochs=1, progress=True, estimators=ests, repeats=1)
    out, err = capsys.readouterr()
    assert out == "" and "training" in err
    assert res.rows[0].label == "reference"


def test_demo_rejects_restricted_reference():
    ests = [curvature_report.ReportEstimator("ref", _SquaredWeights(), params=("4.weight",))]
    with pytest.raises(ValueError, match="reference"):
        curvature_report.run(epochs=0, estimators=ests, repeats=1)


# ------------------------------------------------------------------------------ help
@pytest.mark.parametrize("command", ["demo", "curvature", "list", "reproduce", "prune", "report"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    assert f"usage: optbrain {command}" in capsys.readouterr().out


def test_prune_methods_match_the_library():
    from optbrain import tasks

    prune = next(
        a for a in cli.build_parser()._subparsers._group_actions[0].choices["prune"]._actions
        if a.dest == "method"
    )  # fmt: skip
    assert tuple(prune.choices) == ("auto", *tasks.METHODS) and prune.default == "auto"


# ------------------------------------------------------------------------------ demo
def test_pruning_demo_tiny_writes_report(tmp_path, capsys):
    from optbrain import demo
    from optbrain.models.digits import digits_mlp

    out = tmp_path / "demo"
    res = demo.run(out, epochs=2, rounds=2, retrain_epochs=1, hidden=(16,), rate=0.5)
    assert capsys.readouterr() == ("", "")  # the library never prints
    assert str(res) == res.table
    for name in (
        "report.md",
        "run.json",
        "accuracy_vs_params.png",
        "objective_increase.png",
        "obd/history.json",
        "obd/model.pt",
        "obd/model_selected.pt",
        "magnitude/history.json",
        "magnitude/model.pt",
    ):
        assert (out / name).is_file(), name
    assert sorted(p.relative_to(out).as_posix() for p in res.files) == sorted(
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
    )
    obd = History.load(out / "obd" / "history.json")
    assert [r.round for r in obd.records] == [0, 1, 2]
    assert obd.records[2].sparsity == pytest.approx(0.75, abs=0.01)
    assert {"test_accuracy", "test_loss", "train_accuracy"} <= set(obd.records[1].metrics)
    rows = [line.split() for line in res.table.splitlines() if line[:5].strip().isdigit()]
    assert [r[0] for r in rows] == ["0", "1", "2"]
    assert rows[2][1] == "75.0%" and len(rows[2]) == 10  # OBD 4 columns + magnitude 3
    assert "largest compression within 1 point" in res.table
    mask = masking.load_pruned(digits_mlp((16,)), out / "obd" / "model.pt")
    assert mask.sparsity() == pytest.approx(obd.records[2].sparsity)
    report = (out / "report.md").read_text()
    assert "| OBD test acc" in report and "digits_mlp((16,))" in report
    assert all(len(line) <= 100 for line in res.table.splitlines())


def test_demo_command_default_out_is_under_cwd(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(
        ["demo", "--epochs", "1", "--rounds", "2", "--retrain-epochs", "1", "--no-progress"]
    )
    assert code == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "optbrain demo: OBD vs magnitude pruning of the digits MLP 64-300-100-10" in out
    assert "load_pruned(optbrain.models.digits.digits_mlp()" in out
    assert [p.name for p in tmp_path.iterdir()] == ["optbrain-runs"]
    run = tmp_path / "optbrain-runs" / "demo"
    from optbrain.models.digits import digits_mlp

    mask = masking.load_pruned(digits_mlp(), run / "obd" / "model.pt")
    assert 0.5 < mask.sparsity() < 0.6


# ------------------------------------------------------------------------------ list, reproduce
@dataclass
class _FakeConfig(experiments.Config):
    seeds: tuple[int, ...] = (0, 1)
    epochs: int = 3
    fail: bool = False

    @classmethod
    def quick(cls):
        return cls(epochs=1)

    def validate(self):
        if self.epochs < 1:
            raise ValueError(f"setting 'epochs' = {self.epochs}: must be >= 1")


@dataclass
class _SeedConfig(experiments.Config):
    seed: int = 0


def _fake_run(config, out_dir, progress=None):
    for i in range(2):
        if progress is not None:
            progress(i + 1, 2, f"step {i + 1}")
    res = experiments.Result(
        experiment="fake",
        config=config.to_dict(),
        claims=[
            experiments.Claim(
                "works",
                not getattr(config, "fail", False),
                f"seeds {list(getattr(config, 'seeds', [getattr(config, 'seed', None)]))}",
            )
        ],
        title="A fake experiment",
        out_dir=str(out_dir),
    )
    res.save(out_dir)
    return res


@pytest.fixture
def fake_experiment(monkeypatch):
    for name, cfg in (("fake", _FakeConfig), ("seeded", _SeedConfig), ("seedless", None)):
        mod = types.ModuleType(f"optbrain_test_{name}")
        mod.Config = cfg or experiments.Config
        mod.run = _fake_run
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
        spec = experiments.ExperimentSpec(name, mod.__name__, f"a {name} experiment for tests")
        monkeypatch.setitem(experiments.REGISTRY, name, spec)


def test_list(capsys, fake_experiment):
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == experiments.names() and "lecun1990" in names
    assert any(line.startswith("fake") and "a fake experiment for tests" in line for line in lines)


def test_reproduce_unknown_name(capsys):
    assert cli.main(["reproduce", "no_such_paper"]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'no_such_paper'" in err and "lecun1990" in err


@pytest.mark.parametrize(
    "args, match",
    [
        (["--set", "nope=1"], "unknown setting 'nope'"),
        (["--set", "epochs=x"], "bad value 'x' for setting 'epochs'"),
        (["--set", "epochs=0"], "must be >= 1"),
        (["--set", "epochs"], "must look like key=value"),
        (["--seed", "3", "--set", "seeds=1,2"], "not both"),
    ],
)
def test_reproduce_bad_settings(args, match, capsys, tmp_path, fake_experiment):
    assert cli.main(["reproduce", "fake", "--out", str(tmp_path), *args]) == 2
    assert match in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_reproduce_real_experiment_rejects_unknown_key(capsys):
    assert cli.main(["reproduce", "lecun1990", "--quick", "--set", "no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown setting 'no_such_key'" in err and "seeds" in err


def test_reproduce_runs_with_quick_set_and_seed(capsys, tmp_path, fake_experiment):
    out = tmp_path / "fake"
    argv = ["reproduce", "fake", "--quick", "--set", "epochs=2", "--seed", "5", "--out", str(out)]
    assert cli.main([*argv, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "A fake experiment" in text and "[held] works: seeds [5, 6]" in text
    result = experiments.Result.load(out)
    assert result.config == {"seeds": [5, 6], "epochs": 2, "fail": False}
    # --check turns a failed claim into exit status 1; progress goes to stderr
    assert cli.main([*argv, "--set", "fail=true", "--check"]) == 1
    out_text, err = capsys.readouterr()
    assert "NOT HELD" in out_text and "0 of 1 claims held" in out_text
    assert "fake" in err and "2/2" in err


def test_quick_runs_say_the_claims_are_sized_for_the_full_run(capsys, tmp_path, fake_experiment):
    assert cli.main(["reproduce", "fake", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "claims are sized for the full run" in capsys.readouterr().out
    assert cli.main(["reproduce", "fake", "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert "sized for the full run" not in capsys.readouterr().out


def test_reproduce_seed_field_variants(capsys, tmp_path, fake_experiment):
    assert cli.main(["reproduce", "seeded", "--seed", "7", "--out", str(tmp_path / "a")]) == 0
    assert experiments.Result.load(tmp_path / "a").config == {"seed": 7}
    capsys.readouterr()
    assert cli.main(["reproduce", "seedless", "--seed", "7", "--out", str(tmp_path / "b")]) == 2
    assert "no seed setting" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------ prune, report
def test_prune_command_writes_a_loadable_run(tmp_path, capsys):
    import fixtures_task

    out = tmp_path / "run"
    argv = ["prune", "--task", f"{FIXTURE}:task", "--rounds", "2", "--sparsity", "0.6"]
    assert cli.main([*argv, "--retrain-epochs", "1", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "method OBD" in text and "dE pred" in text and "load the pruned model" in text
    assert "curvature engine: chain: an nn.Sequential chain" in text
    history = History.load(out / "obd" / "history.json")
    assert [r.round for r in history.records] == [0, 1, 2]
    model = fixtures_task.make_model()
    mask = masking.load_pruned(model, out / "obd" / "model.pt")  # one call
    assert mask.sparsity() == pytest.approx(0.6, abs=0.01)
    assert masking.current_mask(model) == mask
    assert (out / "report.md").is_file() and (out / "accuracy_vs_params.png").is_file()
    assert "Curvature engine: chain:" in (out / "report.md").read_text()

    # the report command rebuilds report.md and the PNGs from the history
    before = (out / "report.md").read_text()
    for f in ("report.md", "accuracy_vs_params.png", "objective_increase.png"):
        (out / f).unlink()
    assert cli.main(["report", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (out / "report.md").read_text() == before
    assert (out / "accuracy_vs_params.png").is_file()


def test_prune_module_form_and_method(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(FIXTURE.parent))
    argv = ["prune", "--task", "fixtures_task:task_dict", "--method", "magnitude", "--rounds", "1"]
    assert cli.main([*argv, "--no-progress"]) == 0
    assert "dE pred" not in capsys.readouterr().out
    assert (tmp_path / "optbrain-runs" / "prune" / "magnitude" / "model.pt").is_file()


@pytest.mark.parametrize(
    "spec, match",
    [
        ("fixtures_task:returns_two", "returned a tuple of 2 items"),
        ("fixtures_task:wrong_model", "as the model; expected a torch.nn.Module"),
        ("fixtures_task:nope", "has no attribute 'nope'"),
        ("no_such_module_xyz:task", "no module named 'no_such_module_xyz'"),
        ("notaspec", "must be 'module:function'"),
    ],
)
def test_prune_with_a_wrong_task_is_a_clear_error(spec, match, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["prune", "--task", spec, "--out", str(out), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert match in captured.err and captured.err.startswith("optbrain prune: error: task")
    assert "Traceback" not in captured.err and not out.exists()


def test_prune_resume_with_other_settings_is_a_clear_error(tmp_path, capsys):
    base = ["prune", "--task", f"{FIXTURE}:task", "--rounds", "1", "--out", str(tmp_path)]
    assert cli.main([*base, "--no-progress"]) == 0
    code = cli.main([*base, "--sparsity", "0.5", "--resume", "--no-progress"])
    assert code == 2 and "another configuration" in capsys.readouterr().err


def test_report_errors(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "holds no pruning history" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
