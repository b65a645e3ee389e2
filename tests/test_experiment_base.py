"""The shared pieces of the experiments: a run's bookkeeping (Session), summaries over seeds,
figure files."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest

from optbrain.experiments import base
from optbrain.experiments.stats import fmt, mean_sd, mean_sd_curve, seeds_tag


@dataclass
class _Cfg(base.Config):
    seeds: tuple[int, ...] = (0, 1)

    def validate(self) -> None:
        self.need(len(self.seeds) > 0, "seeds", "give at least one seed")


def test_config_need_names_the_setting_and_its_value():
    with pytest.raises(ValueError, match=r"setting 'seeds' = \(\): give at least one seed"):
        _Cfg(seeds=()).validate()


def test_session_counts_lists_files_and_saves(tmp_path):
    calls = []
    out = tmp_path / "run"
    session = base.Session(_Cfg(), out, total=3, progress=lambda *a: calls.append(a))
    assert out.is_dir() and session.out == out
    session.tick("seed 0")
    session.write_json("rows/a.json", {"x": 1})
    (session.path("b.txt")).write_text("b")
    session.tick("seed 1")
    result = session.result("demo", "Demo")
    assert result.config == {"seeds": [0, 1]} and result.out_dir == str(out)
    back = session.finish(result, ["figures/f.png"])
    assert back is result
    assert calls == [(1, 3, "seed 0"), (2, 3, "seed 1"), (3, 3, "figures")]
    assert result.figures == ["figures/f.png"]
    assert result.files == ["rows/a.json", "b.txt", "figures/f.png", "result.json", "report.md"]
    assert json.loads((out / "rows/a.json").read_text()) == {"x": 1}
    assert base.Result.load(out).files == result.files and result.seconds >= 0


def test_session_validates_before_making_the_folder(tmp_path):
    with pytest.raises(ValueError, match="seeds"):
        base.Session(_Cfg(seeds=()), tmp_path / "never", total=1)
    assert not (tmp_path / "never").exists()


def test_mean_sd_curve_fmt_and_seeds_tag():
    curve = mean_sd_curve([[1.0, 2.0, 9.0], [3.0, 4.0]])  # cut to the shortest
    assert curve == [(2.0, math.sqrt(2.0)), (3.0, math.sqrt(2.0))]
    assert all(math.isnan(v) for v in mean_sd_curve([[1.0, math.nan]])[1])  # no finite value
    assert mean_sd([1, 2, None, math.inf]) == (1.5, math.sqrt(0.5))
    assert fmt((1.234, 0.05)) == "1.2 ± 0.1" and fmt((1.0, 0.0), 3) == "1.000 ± 0.000"
    assert seeds_tag(1) == "(1 seed)" and seeds_tag(3, "mlp") == "(mlp, 3 seeds)"


def test_figure_files_and_band(tmp_path):
    pytest.importorskip("matplotlib")
    from optbrain.experiments.figures import FigureFiles, band, new_figure

    figs = FigureFiles(tmp_path, dpi=30)
    fig = new_figure(2.0, 2.0)
    ax = fig.subplots()
    line = band(ax, [0, 1, 2], [(1.0, 0.5), (2.0, 0.0), (1.5, 1.0)], color="C3")
    assert list(line.get_ydata()) == [1.0, 2.0, 1.5]
    (fill,) = ax.collections
    ys = fill.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(0.5) and ys.max() == pytest.approx(2.5)
    assert figs.save(fig, "a.png") == "figures/a.png"
    assert (tmp_path / "figures" / "a.png").stat().st_size > 0 and figs.paths == ["figures/a.png"]
