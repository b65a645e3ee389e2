"""Figures of the reproductions: matplotlib :class:`~matplotlib.figure.Figure` objects (no pyplot:
no global state, no backend change), a mean ± sd band, and saving under ``out_dir/figures``."""

from __future__ import annotations

from pathlib import Path

from ..report.figures import new_figure

__all__ = ["FigureFiles", "band", "new_figure"]

FIGURE_DIR = "figures"


class FigureFiles:
    """Saves figures as PNG under ``out_dir/figures`` at ``dpi``; :attr:`paths` lists them
    relative to ``out_dir`` (what :attr:`~optbrain.experiments.base.Result.figures` holds)."""

    def __init__(self, out_dir: str | Path, dpi: int):
        self.out = Path(out_dir)
        self.dpi = dpi
        self.paths: list[str] = []

    def save(self, fig, name: str) -> str:
        """Write ``fig`` to ``figures/name`` and return that relative path."""
        rel = f"{FIGURE_DIR}/{name}"
        (self.out / FIGURE_DIR).mkdir(parents=True, exist_ok=True)
        fig.savefig(self.out / rel, dpi=self.dpi)
        self.paths.append(rel)
        return rel


def band(ax, x, stats, **kw):
    """Plot mean ± sd (a list of ``(mean, sd)``) as a line with a shaded band; returns the line."""
    m = [s[0] for s in stats]
    sd = [s[1] for s in stats]
    (line,) = ax.plot(x, m, **kw)
    lo = [a - b for a, b in zip(m, sd)]
    hi = [a + b for a, b in zip(m, sd)]
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    return line
