"""``optbrain quantize --task module:function``: quantise a user's trained model and export it.

The task is the one ``optbrain prune`` takes (:mod:`optbrain.tasks`): a function returning the
model, the loss and the loaders. The inputs of the training loader (its first
``calibration_batches`` batches, or all) are the calibration data; the validation and test
loaders (or the training loader when there are none) are evaluated before and after. Writes into
``out_dir``: ``quantized.pt`` (:func:`~optbrain.quantize.export.save_quantized`; load it with
``optbrain.quantize.load_quantized(<a fresh model>, path)``), ``report.json`` and ``report.md``.
Existing files there are replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..jsonio import write_json, write_text
from .base import Quantizer
from .export import ExportInfo, save_quantized
from .gptq import GPTQ
from .joint import Joint
from .obq import OBQ
from .result import QuantReport
from .rtn import RTN

__all__ = ["METHODS", "QuantizeResult", "make_quantizer", "quantize_task"]

METHODS = ("rtn", "gptq", "obq")
FILES = ("quantized.pt", "report.json", "report.md")


@dataclass
class QuantizeResult:
    """What :func:`quantize_task` did and wrote; ``str(result)`` is the summary table."""

    report: QuantReport
    export: ExportInfo
    before: dict[str, float]
    after: dict[str, float]
    out_dir: Path
    seconds: float
    table: str = field(default="", repr=False)

    def __str__(self) -> str:
        return self.table


def make_quantizer(
    method: str, bits: int, *, sparsity: float | None = None, **options: Any
) -> Quantizer:
    """The quantiser ``method`` (``rtn``, ``gptq``, ``obq``); with ``sparsity`` the joint
    prune-then-quantise compressor with that quantiser."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if sparsity is not None:
        if method == "rtn":
            raise ValueError("joint pruning + quantisation (--sparsity) needs gptq or obq")
        return Joint(bits, sparsity=sparsity, quantizer=method, **options)
    return {"rtn": RTN, "gptq": GPTQ, "obq": OBQ}[method](bits, **options)


def _metrics(task, loaders: dict) -> dict[str, float]:
    from ..train import evaluate

    out: dict[str, float] = {}
    for split, loader in loaders.items():
        for k, v in evaluate(task.model, loader, task.loss_fn).items():
            out[f"{split}_{k}"] = v
    return out


def quantize_task(
    task,
    method: str = "gptq",
    bits: int = 4,
    out_dir: str | Path = Path("optbrain-runs") / "quantize",
    *,
    calibration_batches: int | None = None,
    sparsity: float | None = None,
    overwrite: bool = False,
    **options: Any,
) -> QuantizeResult:
    """Quantise the task's model in place (``options``: those of the quantiser, e.g.
    ``group_size``, ``act_order``, ``sym``, ``damping``, ``sequential``) and write ``out_dir``."""
    from ..tasks import as_task, load_task

    start = time.perf_counter()
    out = Path(out_dir)
    existing = [f for f in FILES if (out / f).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds {', '.join(existing)}; choose another --out or pass --overwrite"
        )
    if calibration_batches is not None and calibration_batches < 1:
        raise ValueError(f"calibration_batches must be >= 1, not {calibration_batches!r}")
    quantizer = make_quantizer(method, bits, sparsity=sparsity, **options)
    task = load_task(task) if isinstance(task, str) else as_task(task)
    loaders = task.loaders() or {"train": task.train_loader}
    calib = [b[0] for b in itertools.islice(task.train_loader, calibration_batches)]
    before = _metrics(task, loaders)
    report = quantizer.apply(task.model, calib)
    after = _metrics(task, loaders)
    export = save_quantized(task.model, report, out / "quantized.pt", overwrite=True)
    result = QuantizeResult(report, export, before, after, out, time.perf_counter() - start)
    result.table = _summary(result, quantizer)
    write_json(
        out / "report.json",
        {
            "task": task.name,
            "quantizer": quantizer.describe(),
            "before": before,
            "after": after,
            "export": export.to_dict(),
            "report": report.to_dict(),
            "seconds": result.seconds,
        },
    )
    write_text(out / "report.md", f"# Quantised {task.name}\n\n{result.table}\n")
    return result


def _summary(result: QuantizeResult, quantizer: Quantizer) -> str:
    e = result.export
    lines = [
        f"{quantizer!r}",
        "",
        result.report.table(),
        "",
        "| metric | before | after |",
        "|---|---|---|",
    ]
    for k in result.before:
        lines.append(f"| {k} | {result.before[k]:.6g} | {result.after.get(k, float('nan')):.6g} |")
    lines += [
        "",
        f"File {e.path}: {e.bytes:,} bytes on disk ({e.ratio:.1%} of the float model's "
        f"{e.float_bytes:,}); {e.quantized_weights:,} weights packed at "
        f"{e.bits_per_weight:.2f} bits each (codes, scales and zero points).",
        f"Load: optbrain.quantize.load_quantized(<a fresh model of the same architecture>, "
        f"{str(e.path)!r})",
    ]
    return "\n".join(lines)
