"""Figures of :mod:`optbrain.experiments.quantise_transformer`: perplexity per method beside the
GPTQ paper's OPT-125M numbers, per-layer relative errors, training curves."""

from __future__ import annotations

from pathlib import Path

from .figures import FigureFiles, new_figure
from .stats import mean_sd


def figures(cfg, runs, out: Path, names: list[str], paper: dict[str, float]) -> list[str]:
    """The experiment's figures: ``names`` the table's rows, ``paper`` the GPTQ paper's numbers."""
    figs = FigureFiles(out, cfg.figure_dpi)
    _perplexity(figs, names, runs, paper)
    _layer_errors(figs, cfg, runs)
    _training(figs, runs)
    return figs.paths


def _perplexity(figs: FigureFiles, names, runs, paper) -> None:
    fig = new_figure(11.0, 4.2)
    ax, axp = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    stats = [mean_sd([r["rows"][n]["perplexity"] for r in runs.values()]) for n in names]
    colors = [
        "k"
        if n == "float32"
        else "C0"
        if n.startswith("RTN")
        else "C1"
        if n.startswith("GPTQ")
        else "C2"
        if n.startswith("OBQ")
        else "C3"
        for n in names
    ]
    ax.bar(range(len(names)), [s[0] for s in stats], yerr=[s[1] for s in stats], color=colors)
    ax.axhline(stats[0][0], color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("perplexity per character (test files)")
    ax.set_ylim(bottom=min(s[0] for s in stats) * 0.9)
    ax.set_title(f"ours (mean ± sd, {len(runs)} seed{'s' * (len(runs) > 1)})", fontsize=9)
    keys = list(paper)
    axp.bar(
        range(len(keys)),
        [paper[k] for k in keys],
        color=[
            "k"
            if k == "float32"
            else "C0"
            if k.startswith("RTN")
            else "C1"
            if k.startswith("GPTQ")
            else "C2"
            for k in keys
        ],
    )
    axp.set_yscale("log")
    axp.set_xticks(range(len(keys)), keys, rotation=60, ha="right", fontsize=7)
    axp.set_title("GPTQ paper: OPT-125M, WikiText2", fontsize=9)
    figs.save(fig, "perplexity.png")


def _layer_errors(figs: FigureFiles, cfg, runs) -> None:
    first = next(iter(runs.values()))["rows"]
    b = min(cfg.bits)
    fig = new_figure(8.0, 3.6)
    ax = fig.subplots()
    series = [
        (f"GPTQ-{b}", "layer_relative_errors", "C1"),
        (f"RTN-{b}", "layer_relative_errors", "C0"),
    ]
    if cfg.obq:
        series.append((f"OBQ-{b}", "layer_relative_errors", "C2"))
    layers = list(first[f"GPTQ-{b}"]["layer_relative_errors"])
    for name, key, color in series:
        vals = [first[name][key][k] for k in layers]
        ax.plot(range(len(layers)), vals, "o-", color=color, label=name, ms=3)
    ax.set_yscale("log")
    ax.set_xticks(
        range(len(layers)),
        [k.replace("blocks.", "b").replace("attn.", "") for k in layers],
        rotation=70,
        fontsize=6,
    )
    ax.set_ylabel("‖(W − Ŵ)X‖² / ‖WX‖² (calibration)")
    ax.set_title(
        f"per-layer relative reconstruction error at {b} bits (seed {next(iter(runs))})", fontsize=9
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    figs.save(fig, "layer_errors.png")


def _training(figs: FigureFiles, runs) -> None:
    fig = new_figure(5.0, 3.2)
    ax = fig.subplots()
    for seed, r in runs.items():
        steps, loss = zip(*r["curve"])
        ax.plot(steps, loss, label=f"seed {seed}", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training NLL (nats/char, smoothed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    figs.save(fig, "training.png")
