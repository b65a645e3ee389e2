"""Hessian-aware post-training quantisation of a small transformer (GPTQ, Frantar et al. 2023).

A decoder-only character-level transformer (:mod:`optbrain.models.transformer`: pre-LN blocks,
``nn.Linear`` projections) is trained offline on the source text of Python's standard library
(:mod:`optbrain.data.stdlib_text`, a fixed split by file). Its block layers (query, key, value,
output, MLP projections; the embeddings and the output head stay in float32, as GPTQ keeps
OPT's) are then compressed without retraining, and the perplexity on the held-out files is
measured over non-overlapping context windows (PAPERS.md §14.5):

* float32; RTN and GPTQ at 4 and 3 bits, per output channel and with groups (GPTQ's group of
  128 columns at width 768 scaled to ``group_size`` at our width); GPTQ with ``act_order``; OBQ
  (exact greedy) per channel;
* layer-wise OBS (:class:`optbrain.layerwise.LayerwiseOBS`) at 50 % and 2:4;
* joint: layer-wise OBS 50 %, then GPTQ-4 of the survivors against the same Hessian.

Calibration: ``calibration`` random training windows (GPTQ: 128 segments of 2048 tokens);
sequential block-by-block calibration. Beside ours, the paper's OPT-125M WikiText2 numbers.
With ``hf=true`` the same pipeline runs on a GPT-2-architecture model built from a
``transformers`` config (its projections are ``Conv1D`` modules), trained briefly on the same
text (``pip install 'optbrain[hf]'``; nothing is downloaded).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import base
from .base import Claim, Progress, Result, Session
from .char_lm import fit, perplexity
from .stats import fmt, mean_sd, seeds_tag

log = logging.getLogger(__name__)

NAME = "quantise-transformer"
SUMMARY = (
    "GPTQ / OBQ / RTN post-training quantisation and layer-wise OBS pruning of a small "
    "character-level transformer trained offline on Python's standard library (Frantar et al. "
    "2023), perplexity against the GPTQ paper's OPT-125M ordering"
)
TITLE = "Post-training quantisation of a small transformer: RTN, GPTQ, OBQ, layer-wise OBS"

#: OPT-125M, WikiText2 perplexity (GPTQ paper, PAPERS.md §14.5)
PAPER = {
    "float32": 27.65,
    "RTN-4": 37.28,
    "GPTQ-4": 31.12,
    "OBQ-4": 32.52,
    "RTN-3": 1.3e3,
    "GPTQ-3": 53.85,
    "OBQ-3": 69.32,
}


@dataclass
class Config(base.Config):
    """Setting; the defaults are the full run (about 15 CPU-minutes on one thread)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    width: int = 128
    layers: int = 4
    heads: int = 4
    context: int = 128
    steps: int = 800
    batch: int = 32
    lr: float = 2e-3
    warmup: int = 100
    train_chars: int | None = None
    test_chars: int = 50_000
    calibration: int = 128
    bits: tuple[int, ...] = (4, 3)
    group_size: int = 32
    act_order: bool = True
    obq: bool = True
    hf: bool = False
    hf_steps: int = 400
    figure_dpi: int = 90

    @classmethod
    def quick(cls) -> Config:
        """One small model (width 64, 2 blocks, 500 steps) on a slice of the text."""
        return cls(
            seeds=(0,),
            width=64,
            layers=2,
            heads=4,
            context=64,
            steps=500,
            batch=16,
            lr=5e-3,
            warmup=30,
            train_chars=400_000,
            test_chars=20_000,
            calibration=32,
            group_size=16,
            hf_steps=60,
        )

    def validate(self) -> None:
        need = self.need
        need(
            len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds),
            "seeds",
            "distinct, at least one",
        )
        for key in ("width", "layers", "heads", "context", "steps", "batch", "calibration"):
            need(getattr(self, key) >= 1, key, "must be >= 1")
        need(self.width % self.heads == 0, "width", "must be a multiple of heads")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.warmup >= 0, "warmup", "must be >= 0")
        need(
            self.train_chars is None or self.train_chars > self.context,
            "train_chars",
            "must exceed the context",
        )
        need(self.test_chars > self.context, "test_chars", "must exceed the context")
        need(
            len(self.bits) > 0 and all(2 <= b <= 8 for b in self.bits), "bits", "values from 2 to 8"
        )
        need(self.group_size >= 1, "group_size", "must be >= 1")
        need(self.hf_steps >= 0, "hf_steps", "must be >= 0")
        need(20 <= self.figure_dpi <= 300, "figure_dpi", "must be in [20, 300]")


# --------------------------------------------------------------------------- the methods
def method_names(cfg: Config) -> list[str]:
    """Row labels in table order."""
    names = ["float32"]
    for b in cfg.bits:
        names += [
            f"RTN-{b}",
            f"RTN-{b} g{cfg.group_size}",
            f"GPTQ-{b}",
            f"GPTQ-{b} g{cfg.group_size}",
        ]
        if cfg.act_order:
            names.append(f"GPTQ-{b} act-order")
        if cfg.obq:
            names.append(f"OBQ-{b}")
    return [*names, "OBS 50%", "OBS 2:4", "OBS 50% + GPTQ-4"]


def _quantizer(name: str, cfg: Config, blocks: str):
    from ..quantize import GPTQ, OBQ, RTN, Joint

    common = {"layers": [blocks]}
    if name == "OBS 50% + GPTQ-4":
        return Joint(4, sparsity=0.5, **common)
    kind, _, rest = name.partition("-")
    bits = int(rest.split()[0])
    if f"g{cfg.group_size}" in rest:
        common["group_size"] = cfg.group_size
    if "act-order" in rest:
        common["act_order"] = True
    return {"RTN": RTN, "GPTQ": GPTQ, "OBQ": OBQ}[kind](bits, **common)


def _prune(model: nn.Module, name: str, calib, blocks: str) -> dict[str, Any]:
    """Layer-wise OBS (the library's pruner) of the block layers to 50 % or 2:4."""
    import fnmatch

    from ..curvature.calibration import supported_layers
    from ..masking import Mask
    from ..models.transformer import SequenceCrossEntropy
    from ..problem import Problem
    from ..pruners.layerwise import LayerwiseOBS

    paths = [p for p in supported_layers(model) if fnmatch.fnmatchcase(p, blocks)]
    mask = Mask.ones(model, [f"{p}.weight" for p in paths])
    nm = (2, 4) if name == "OBS 2:4" else None
    pruner = LayerwiseOBS(nm=nm, dtype=torch.float32)
    new, info = pruner(Problem(model, SequenceCrossEntropy(), calib), mask, None if nm else 0.5)
    return {"sparsity": new.sparsity(), "error": info.predicted_increase}


def _compress(model: nn.Module, name: str, cfg: Config, calib, blocks: str) -> dict[str, Any]:
    """Apply method ``name`` to ``model`` in place; what it reported."""
    if name.startswith("OBS") and "GPTQ" not in name:
        return _prune(model, name, calib, blocks)
    report = _quantizer(name, cfg, blocks).apply(model, [x for x, _ in calib])
    rel = [r.relative_error for r in report.layers.values()]
    return {
        "error": report.error,
        "mean_relative_error": sum(rel) / len(rel),
        "layer_relative_errors": {k: r.relative_error for k, r in report.layers.items()},
        "layer_rtn_relative_errors": {
            k: r.error_rtn / r.output_energy for k, r in report.layers.items()
        },
        "skipped": report.skipped,
        "seconds": report.seconds,
    }


# --------------------------------------------------------------------------- one model
class LogitsOnly(nn.Module):
    """A ``transformers`` LM as ``x -> logits`` (so losses and Problems can use it)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


def _evaluate_all(model, cfg, text, names, calib, blocks, tick, tag) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for name in names:
        work = model if name == "float32" else copy.deepcopy(model)
        info = {} if name == "float32" else _compress(work, name, cfg, calib, blocks)
        info["perplexity"] = perplexity(work, text.test, cfg.context)
        rows[name] = info
        tick(f"{tag}: {name} perplexity {info['perplexity']:.3f}")
    return rows


def _calibration(text, cfg: Config, seed: int) -> list:
    from ..data.stdlib_text import random_windows

    gen = torch.Generator().manual_seed(10_000 + seed)
    x, y = random_windows(text.train, cfg.calibration, cfg.context, gen)
    return list(zip(x.split(32), y.split(32)))


def _run_seed(cfg: Config, text, seed: int, tick) -> dict[str, Any]:
    from ..data.stdlib_text import VOCAB_SIZE
    from ..models.transformer import CharTransformer, TransformerConfig

    tcfg = TransformerConfig(VOCAB_SIZE, cfg.context, cfg.width, cfg.layers, cfg.heads)
    model = CharTransformer(tcfg, seed=seed)
    curve = fit(
        model,
        text.train,
        steps=cfg.steps,
        batch=cfg.batch,
        context=cfg.context,
        lr=cfg.lr,
        seed=seed,
        warmup=cfg.warmup,
    )
    tick(f"seed {seed}: trained (loss {curve[-1][1]:.3f})")
    calib = _calibration(text, cfg, seed)
    rows = _evaluate_all(
        model, cfg, text, method_names(cfg), calib, "blocks.*", tick, f"seed {seed}"
    )
    return {"curve": curve, "rows": rows, "params": sum(p.numel() for p in model.parameters())}


def _run_hf(cfg: Config, text, tick) -> dict[str, Any]:
    """The GPT-2-architecture model (transformers Conv1D projections): float, RTN/GPTQ, OBS."""
    from ..data.stdlib_text import VOCAB_SIZE
    from ..models.hf_gpt2 import gpt2_char_model

    seed = cfg.seeds[0]
    try:
        inner = gpt2_char_model(VOCAB_SIZE, cfg.context, cfg.width, cfg.layers, cfg.heads, seed)
    except ImportError as exc:
        tick("GPT-2 path skipped")
        return {"skipped": str(exc)}
    model = LogitsOnly(inner)
    curve = fit(
        model,
        text.train,
        steps=cfg.hf_steps,
        batch=cfg.batch,
        context=cfg.context,
        lr=cfg.lr,
        seed=seed,
        warmup=cfg.warmup,
    )
    calib = _calibration(text, cfg, seed)
    names = ["float32", *[f"{m}-{b}" for b in cfg.bits for m in ("RTN", "GPTQ")], "OBS 50%"]
    rows = _evaluate_all(
        model, cfg, text, names, calib, "model.transformer.h.*", lambda s: None, "hf"
    )
    tick("GPT-2 (transformers Conv1D) path")
    return {"curve": curve, "rows": rows}


# --------------------------------------------------------------------------- the experiment
def run(config: Config, out_dir: str | Path, progress: Progress | None = None) -> Result:
    """Run the reproduction into ``out_dir`` (see the module docstring) and return the result."""
    from ..data.stdlib_text import load_stdlib_text

    cfg = config
    names = method_names(cfg)
    total = len(cfg.seeds) * (1 + len(names)) + (1 if cfg.hf else 0) + 1
    session = Session(cfg, out_dir, total, progress, log)
    text = load_stdlib_text({"train": cfg.train_chars, "test": cfg.test_chars, "val": 10_000})
    runs = {seed: _run_seed(cfg, text, seed, session.tick) for seed in cfg.seeds}
    hf = _run_hf(cfg, text, session.tick) if cfg.hf else None
    session.write_json(
        "runs.json",
        {"seeds": {str(s): r for s, r in runs.items()}, "hf": hf, "text": text.summary()},
    )
    result = session.result(NAME, TITLE)
    result.notes = _notes(cfg, text, runs)
    _analyse(cfg, runs, hf, result)
    from .quantise_transformer_figures import figures

    return session.finish(result, figures(cfg, runs, session.out, method_names(cfg), PAPER))


# --------------------------------------------------------------------------- analysis
def _ppl(runs, name: str) -> tuple[float, float]:
    return mean_sd([r["rows"][name]["perplexity"] for r in runs.values()])


def _table(cfg: Config, runs) -> list[dict[str, Any]]:
    base_ppl = _ppl(runs, "float32")[0]
    out = []
    for name in method_names(cfg):
        m, sd = _ppl(runs, name)
        errs = [r["rows"][name].get("mean_relative_error") for r in runs.values()]
        err = mean_sd([e for e in errs if e is not None])[0]
        paper = PAPER.get(name)
        out.append(
            {
                "method": name,
                "perplexity": round(m, 4),
                "sd": round(sd, 4),
                "increase_%": round(100 * (m / base_ppl - 1), 2),
                "mean_layer_relative_error": None if err != err else float(f"{err:.4g}"),
                "paper_OPT-125M": paper,
            }
        )
    return out


def _claim_less(runs, a: str, b: str, paper: str, tag: str) -> Claim:
    pa, pb = _ppl(runs, a), _ppl(runs, b)
    return Claim(
        name=f"{a} below {b} {tag}",
        held=pa[0] < pb[0],
        detail=f"perplexity {a} {fmt(pa, 3)}, {b} {fmt(pb, 3)}",
        paper=paper,
    )


def _analyse(cfg: Config, runs, hf, result: Result) -> None:
    tag = seeds_tag(len(runs))
    claims = result.claims
    for b in cfg.bits:
        if f"RTN-{b}" in PAPER:
            claims.append(
                _claim_less(
                    runs,
                    f"GPTQ-{b}",
                    f"RTN-{b}",
                    f"OPT-125M: GPTQ-{b} {PAPER[f'GPTQ-{b}']:g}, RTN-{b} {PAPER[f'RTN-{b}']:g}",
                    tag,
                )
            )
    if 4 in cfg.bits:
        f, r, g = (_ppl(runs, n)[0] for n in ("float32", "RTN-4", "GPTQ-4"))
        share = (g - f) / (r - f) if r > f else float("nan")
        paper_share = (PAPER["GPTQ-4"] - PAPER["float32"]) / (PAPER["RTN-4"] - PAPER["float32"])
        claims.append(
            Claim(
                name=f"GPTQ-4 keeps at most half of RTN-4's perplexity increase {tag}",
                held=share <= 0.5,
                detail=f"GPTQ-4's increase over float32 is {share:.0%} of RTN-4's "
                f"({g - f:+.4f} vs {r - f:+.4f})",
                paper=f"OPT-125M: {paper_share:.0%} ({PAPER['GPTQ-4'] - PAPER['float32']:+.2f} vs "
                f"{PAPER['RTN-4'] - PAPER['float32']:+.2f})",
            )
        )
    if {3, 4} <= set(cfg.bits):
        order = ["float32", "GPTQ-4", "RTN-4", "GPTQ-3", "RTN-3"]
        vals = [_ppl(runs, n)[0] for n in order]
        claims.append(
            Claim(
                name="the paper's ordering float32 < GPTQ-4 < RTN-4 and GPTQ-4 < GPTQ-3 < RTN-3 "
                + tag,
                held=vals[0] < vals[1] < vals[2] and vals[1] < vals[3] < vals[4],
                detail=", ".join(f"{n} {v:.4f}" for n, v in zip(order, vals)),
                paper=", ".join(f"{n} {PAPER[n]:g}" for n in order),
            )
        )
    if cfg.obq:
        for b in cfg.bits:
            if f"OBQ-{b}" in PAPER:
                claims.append(
                    Claim(
                        name=f"GPTQ-{b} not worse than OBQ-{b} {tag}",
                        held=_ppl(runs, f"GPTQ-{b}")[0] <= _ppl(runs, f"OBQ-{b}")[0],
                        detail=f"GPTQ-{b} {fmt(_ppl(runs, f'GPTQ-{b}'), 3)}, OBQ-{b} "
                        f"{fmt(_ppl(runs, f'OBQ-{b}'), 3)}",
                        paper=f"OPT-125M: GPTQ-{b} {PAPER[f'GPTQ-{b}']:g}, "
                        f"OBQ-{b} {PAPER[f'OBQ-{b}']:g}",
                    )
                )
    result.tables["perplexity"] = _table(cfg, runs)
    if hf is not None:
        result.tables["gpt2_conv1d"] = _hf_table(hf)


def _hf_table(hf: dict[str, Any]) -> list[dict[str, Any]]:
    if "skipped" in hf:
        return [{"method": "skipped", "perplexity": None, "note": hf["skipped"]}]
    return [
        {
            "method": name,
            "perplexity": round(row["perplexity"], 4),
            "skipped_layers": ", ".join(row.get("skipped", {})) or "",
        }
        for name, row in hf["rows"].items()
    ]


def _notes(cfg: Config, text, runs) -> list[str]:
    summ = text.summary()
    params = next(iter(runs.values()))["params"]
    return [
        f"Text: Python {summ['root']} standard library, {summ['train_files']} training files "
        f"({summ['train_chars']:,} characters), held-out test files cut to "
        f"{summ['test_chars']:,} characters (digest {summ['digest']}); fixed split by file.",
        f"Model: {cfg.layers} pre-LN blocks, width {cfg.width}, {cfg.heads} heads, context "
        f"{cfg.context}, {params:,} parameters; AdamW lr {cfg.lr:g}, {cfg.steps} steps of "
        f"{cfg.batch} windows. Seeds {list(cfg.seeds)} set initialisation, batches and "
        "calibration windows.",
        f"Quantised: the {6 * cfg.layers} nn.Linear layers of the blocks (embeddings and head in "
        f"float32, as GPTQ keeps OPT's). Calibration: {cfg.calibration} random training windows "
        f"of {cfg.context} characters, block-by-block. Groups of {cfg.group_size} columns stand "
        f"for GPTQ's 128 at OPT-125M's width 768 (1/6 of the width; ours {cfg.group_size}/"
        f"{cfg.width}). Perplexity per character over non-overlapping {cfg.context}-character "
        "windows of the test text; the paper's numbers are per BPE token on WikiText2, so only "
        "orderings and relative increases compare.",
    ]
