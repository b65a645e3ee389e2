"""optbrain.report: text and markdown tables, figures, report.md, run directories."""

from __future__ import annotations

import json
import math

import pytest

from optbrain import report
from optbrain.history import History, RoundRecord
from optbrain.report import tables
from optbrain.report.progress import Bars

PNG = b"\x89PNG\r\n\x1a\n"


def _history(method: str, accs, predicted=None, actual=None, params=1000, total=900) -> History:
    """A synthetic history: round r keeps total * 0.5**r prunable entries."""
    records = []
    for r, acc in enumerate(accs):
        kept = int(total * 0.5**r)
        records.append(
            RoundRecord(
                round=r,
                target=1 - 0.5**r,
                sparsity=1 - kept / total,
                remaining=kept,
                total=total,
                remaining_params=params - (total - kept),
                predicted_increase=0.0 if r == 0 else (predicted or [0.01 * r] * 9)[r - 1],
                actual_increase=0.0 if r == 0 else (actual or [0.02 * r] * 9)[r - 1],
                objective_before=0.1,
                objective_pruned=0.1 + 0.02 * r,
                metrics_pruned={"test_accuracy": acc - 0.05, "test_loss": 0.3},
                metrics={"test_accuracy": acc, "test_loss": 0.2 + 0.01 * r},
                seconds=0.5,
            )
        )
    return History(records, {"method": method})


@pytest.fixture
def histories():
    return {
        "obd": _history("obd", [0.98, 0.979, 0.975, 0.972, 0.95]),
        "magnitude": _history("magnitude", [0.98, 0.978, 0.968, 0.90, 0.70]),
    }


# ------------------------------------------------------------------------------ tables
def test_history_table_groups_methods_and_shares_mask_columns(histories):
    text = tables.history_table(histories)
    lines = text.splitlines()
    assert "OBD" in lines[0] and "magnitude" in lines[0]  # group headers
    header = lines[1]
    # mask columns once, metric columns once per method
    assert header.split().count("sparsity") == 1 and header.split().count("params") == 1
    assert header.count("test acc") == 2 and header.count("dE actual") == 2
    rows = [line for line in lines if line.strip()[:1].isdigit()]
    assert len(rows) == 5
    assert rows[0].split()[:3] == ["0", "0.0%", "1,000"]
    assert "97.90%" in rows[1] and "97.80%" in rows[1]
    assert rows[0].count("-") >= 4  # round 0 has no increases
    widths = {len(line) for line in lines[1:]}
    assert len(widths) <= 2  # header, rule and rows are aligned (rows may be right-trimmed)
    assert max(len(line) for line in lines) <= 100


def test_history_table_per_history_columns(histories):
    cols = {
        "obd": ["round", "sparsity", "metrics.test_accuracy", "predicted_increase"],
        "magnitude": ["round", "sparsity", "metrics.test_accuracy"],
    }
    text = tables.history_table(histories, cols)
    assert text.count("dE pred") == 1 and text.count("test acc") == 2
    with pytest.raises(KeyError, match="unknown histories"):
        tables.history_table(histories, {"nope": ["round"]})
    with pytest.raises(TypeError):
        tables.history_table(histories, "round")
    with pytest.raises(ValueError, match="no histories"):
        tables.history_table({})


def test_history_table_splits_mask_columns_when_histories_disagree(histories):
    other = _history("magnitude", [0.98, 0.97, 0.96], total=400)
    text = tables.history_table({"obd": histories["obd"], "magnitude": other})
    header = text.splitlines()[1]
    assert header.split().count("sparsity") == 2  # different schedules: per history
    assert len([line for line in text.splitlines() if line.strip()[:1].isdigit()]) == 5
    assert "-" in text.splitlines()[-2]  # magnitude has no round 4: shown as "-"


def test_single_history_and_missing_metrics():
    h = _history("obd", [0.9, 0.8])
    text = tables.history_table(h, ["round", "metrics.no_such", "metrics_pruned.test_accuracy"])
    assert "no such" in text and "test acc (del)" in text
    row1 = text.splitlines()[-2].split()
    assert row1 == ["1", "-", "75.00%"]


def test_markdown_table(histories):
    md = report.markdown_table(histories)
    lines = md.splitlines()
    assert lines[0].startswith("| round | sparsity | params | OBD test acc")
    assert "magnitude ΔE actual" in lines[0]
    assert set(lines[1]) <= {"|", "-", ":"}
    assert len(lines) == 2 + 5
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_largest_compression(histories):
    sel = tables.largest_compression(histories["obd"], tolerance=0.01)
    assert sel.record.round == 3 and sel.value == pytest.approx(0.972)
    assert sel.compression == pytest.approx(1000 / sel.record.remaining_params)
    sel = tables.largest_compression(histories["magnitude"], tolerance=0.01)
    assert sel.record.round == 1
    assert tables.largest_compression(histories["magnitude"], tolerance=0.5).record.round == 4
    # losses: lower is better
    sel = tables.largest_compression(histories["obd"], "metrics.test_loss", tolerance=0.015)
    assert sel.record.round == 1
    assert tables.largest_compression(History()) is None
    assert tables.largest_compression(histories["obd"], "metrics.nothing") is None


def test_selection_lines(histories):
    lines = tables.selection_lines(histories, tolerance=0.01)
    assert lines[0].startswith("largest compression within 1 point of the unpruned test accuracy")
    assert "(98.00%)" in lines[0]
    assert "OBD" in lines[1] and "round 3" in lines[1]
    assert "magnitude" in lines[2] and "round 1" in lines[2]
    md = tables.selection_lines(histories, markdown=True)
    assert md[0].startswith("Largest") and md[1].startswith("- **OBD**: round 3")
    # no accuracy: no default tolerance
    h = History([RoundRecord(0, 0.0, 0.0, 9, 9, 10, metrics={"test_loss": 1.0})])
    assert tables.selection_lines({"x": h}) == []


def test_predicts_objective_and_primary_metric(histories):
    assert tables.predicts_objective(histories["obd"])
    assert not tables.predicts_objective(histories["magnitude"])
    h = History(config={"method": "magnitude", "predicts_objective": True})
    assert tables.predicts_objective(h)
    assert tables.primary_metric(histories) == "metrics.test_accuracy"
    h = History([RoundRecord(0, 0.0, 0.0, 9, 9, 10, metrics={"val_loss": 1.0})])
    assert tables.primary_metric({"x": h}) == "metrics.val_loss"
    assert tables.primary_metric({"x": History()}) is None


def test_default_columns(histories):
    cols = report.default_columns(histories)
    assert "predicted_increase" in cols["obd"]
    assert "predicted_increase" not in cols["magnitude"]
    assert cols["obd"][:5] == [
        "round",
        "sparsity",
        "remaining_params",
        "metrics.test_accuracy",
        "metrics.test_loss",
    ]


# ------------------------------------------------------------------------------ figures
def test_plot_histories_writes_pngs(histories, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    backend = matplotlib.get_backend()
    paths = report.plot_histories(histories, tmp_path)
    assert [p.name for p in paths] == ["accuracy_vs_params.png", "objective_increase.png"]
    for p in paths:
        assert p.read_bytes()[:8] == PNG
    assert matplotlib.get_backend() == backend  # no global state touched


def test_plot_histories_without_accuracy_or_positive_increases(tmp_path):
    pytest.importorskip("matplotlib")
    recs = [
        RoundRecord(0, 0.0, 0.0, 9, 9, 10, metrics={"train_loss": 1.0}),
        RoundRecord(1, 0.5, 0.5, 4, 9, 5, -1e-3, -2e-3, metrics={"train_loss": 1.2}),
        RoundRecord(2, 0.8, 0.8, 2, 9, 3, math.nan, 0.0, metrics={"train_loss": math.nan}),
    ]
    paths = report.plot_histories(History(recs, {"method": "obd"}), tmp_path)
    assert [p.name for p in paths] == ["loss_vs_params.png", "objective_increase.png"]


# ------------------------------------------------------------------------------ report.md
def _save(run_dir, histories):
    for name, h in histories.items():
        h.save(run_dir / name / "history.json")


def test_write_report_and_regenerate(histories, tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    _save(run, histories)
    (run / "obd" / "model.pt").write_bytes(b"x")
    path = report.write_report(run, histories, "My title", ["A note.", "Another."])
    text = path.read_text()
    assert text.startswith("# My title\n\nA note.\n\nAnother.\n")
    assert "| round | sparsity | params | OBD test acc" in text
    assert "![accuracy vs params](accuracy_vs_params.png)" in text
    assert "![objective increase](objective_increase.png)" in text
    assert "- **OBD**: round 3" in text
    assert "`obd/history.json`" in text and "`obd/model.pt`" in text
    meta = json.loads((run / "run.json").read_text())
    assert meta["title"] == "My title" and meta["histories"] == ["obd", "magnitude"]

    for f in ("report.md", "accuracy_vs_params.png", "objective_increase.png"):
        (run / f).unlink()
    again = report.regenerate(run)
    assert again.read_text() == text  # same report from the histories and run.json
    assert (run / "accuracy_vs_params.png").read_bytes()[:8] == PNG

    loaded = report.load_run(run)
    assert list(loaded.histories) == ["obd", "magnitude"]
    assert loaded.title == "My title" and loaded.notes == ["A note.", "Another."]


def test_regenerate_without_run_json_and_top_level_history(histories, tmp_path):
    pytest.importorskip("matplotlib")
    histories["obd"].save(tmp_path / "history.json")
    path = report.regenerate(tmp_path)
    text = path.read_text()
    assert text.startswith(f"# Pruning report: {tmp_path.name}")
    assert "| round |" in text and "`history.json`" in text


def test_write_report_without_matplotlib(histories, tmp_path, monkeypatch):
    def no_mpl(*args, **kwargs):
        raise ImportError("plots need matplotlib")

    monkeypatch.setattr(report, "plot_histories", no_mpl)
    text = report.write_report(tmp_path, histories, "t").read_text()
    assert "No figures: plots need matplotlib" in text and "## Figures" not in text
    text = report.write_report(tmp_path, histories, "t", figures=[]).read_text()
    assert "No figures" not in text


def test_load_run_errors(tmp_path):
    with pytest.raises(report.NoHistoryError, match="not a directory"):
        report.load_run(tmp_path / "missing")
    with pytest.raises(report.NoHistoryError, match="no pruning history"):
        report.load_run(tmp_path)
    (tmp_path / "result.json").write_text("{}")
    with pytest.raises(report.NoHistoryError, match="experiment run"):
        report.load_run(tmp_path)
    (tmp_path / "obd").mkdir()
    (tmp_path / "obd" / "history.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the history"):
        report.load_run(tmp_path)


# ------------------------------------------------------------------------------ progress
def test_bars_are_silent_when_disabled(capsys):
    bars = Bars(False)
    assert not bars.enabled
    with bars.stage("x", total=3) as stage:
        assert stage is None
    assert capsys.readouterr() == ("", "")


def test_bars_write_to_stderr(capsys):
    pytest.importorskip("tqdm")
    with Bars(True).stage("work", total=2, leave=True) as stage:
        stage(1, 2)
        stage(2, 2, "done")
        stage.note("finished")
    out, err = capsys.readouterr()
    assert out == "" and "work" in err and "2/2" in err
