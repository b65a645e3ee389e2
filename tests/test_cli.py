"""The ``optbrain`` command line and the demo behind it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from optbrain import cli, demo
from optbrain.curvature.base import DiagonalEstimator


@pytest.fixture(autouse=True)
def _one_thread():
    """The demo's nets are too small to gain from threads, and threads crawl on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
        ["demo", "--epochs", "x"],
        ["demo", "--epochs", "-1"],
        ["demo", "--hutchinson-samples", "0"],
        ["demo", "--no-such-flag"],
        ["no-such-command"],
    ],
)
def test_bad_arguments_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().err


def test_demo_command_runs(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(
        ["demo", "--epochs", "2", "--no-progress", "--hutchinson-samples", "4", "--out", str(out)]
    )
    assert code == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "trained 2 epochs" in text
    for label in ["GGN (exact)", "LeCun (Gauss-Newton)", "LeCun (full)", "Hessian (exact)",
                  "Empirical Fisher", "MC Fisher (1 sample)", "Hutchinson (4)"]:  # fmt: skip
        assert label in text
    assert (out / "demo.txt").read_text().strip() in text
    data = json.loads((out / "demo.json").read_text())
    assert data["n_params"] == 50_610 and len(data["rows"]) == 7
    assert data["layers"] == ["0", "2", "4"]
    rows = {r["label"]: r for r in data["rows"]}
    # the Gauss-Newton recursion is exact for the output layer; GGN diagonals are >= 0
    ggn, lecun = rows["GGN (exact)"], rows["LeCun (Gauss-Newton)"]
    assert lecun["layer_saliency"]["4"] == pytest.approx(ggn["layer_saliency"]["4"], rel=1e-4)
    assert ggn["min_diag"] >= 0 and lecun["min_diag"] >= 0
    assert all(r["ratio"] > 0 for r in data["rows"])


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
        demo.DemoEstimator("reference", _SquaredWeights()),
        demo.DemoEstimator("scaled", _Scaled(3.0)),
        demo.DemoEstimator("last layer", _Scaled(2.0), params=("4.weight", "4.bias"), note="L4"),
    ]
    res = demo.run(epochs=1, seed=1, progress=False, estimators=ests, repeats=1)
    assert capsys.readouterr() == ("", "")
    assert isinstance(res, demo.DemoResult) and str(res) == res.table
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
    assert [p.name for p in paths] == ["demo.txt", "demo.json"]


def test_demo_progress_goes_to_stderr(capsys):
    pytest.importorskip("tqdm")
    ests = [demo.DemoEstimator("reference", _SquaredWeights())]
    res = demo.run(epochs=1, progress=True, estimators=ests, repeats=1)
    out, err = capsys.readouterr()
    assert out == "" and "training" in err
    assert res.rows[0].label == "reference"


def test_demo_rejects_restricted_reference():
    ests = [demo.DemoEstimator("ref", _SquaredWeights(), params=("4.weight",))]
    with pytest.raises(ValueError, match="reference"):
        demo.run(epochs=0, estimators=ests, repeats=1)
