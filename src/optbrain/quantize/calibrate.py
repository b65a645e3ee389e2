"""Sequential calibration: the layers are quantised in stages, each stage's Hessians computed on
the outputs of the stages already quantised (GPTQ's block-by-block procedure, PAPERS.md §14.5).

A *stage* is a set of layers calibrated together, and the module whose call contains all their
calls. ``sequential``:

* ``"block"`` (default): one stage per block of the model (the transformer blocks: the children
  of the ``nn.ModuleList``/``nn.Sequential`` that holds the most layers, found automatically, or
  the module paths given as ``blocks``; found among all the model's layers, not only those
  quantised), and one stage per layer outside every block (an output
  head); stages in module order. Within a block every layer is calibrated on the block's input
  from the quantised earlier blocks, as in GPTQ;
* ``"layer"``: one stage per layer: every layer sees all layers before it quantised;
* ``"none"``: one stage: every H from the unquantised model.

Each stage runs the model on the calibration batches with forward hooks on its layers. Once the
stage's module has been called as often as on the first batch, the forward pass is cut short
(the rest of the model cannot change the stage's Hessians), so calibrating block i costs
about i + 1 blocks' forward passes, not the whole model's. Batches are inputs ``x``, ``(x, y)``
pairs (``y`` ignored) or dicts of keyword arguments; tensors are moved to the model's device.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..curvature.calibration import HessianHooks, LayerHessian, is_layer
from ..distributed import SINGLE, Shards
from ..errors import CalibrationError
from ..problem import Problem, eval_mode

__all__ = ["SEQUENTIAL", "Stage", "as_batches", "find_blocks", "plan_stages", "stage_hessians"]

SEQUENTIAL = ("block", "layer", "none")


@dataclass
class Stage:
    """Layers calibrated together; ``module`` (at ``path``) contains all their calls (``None``:
    the whole model, no early stop)."""

    path: str
    module: nn.Module | None
    layers: dict[str, nn.Module]


class _Reread:
    """A problem's batches, read afresh by every stage (``Problem.batches()`` is a generator)."""

    def __init__(self, problem: Problem):
        self.problem = problem

    def __iter__(self):
        return self.problem.batches()


def as_batches(calibration: object) -> list | Iterable:
    """Calibration data as a re-iterable of batches: a :class:`~optbrain.problem.Problem` (its
    inputs), a tensor (one batch), an ``(X, Y)`` pair of tensors (one batch), or an iterable of
    batches (a one-shot iterator is read into a list, since every stage reads the data)."""
    if isinstance(calibration, Problem):
        return _Reread(calibration)
    if isinstance(calibration, Tensor):
        return [calibration]
    if (
        isinstance(calibration, tuple)
        and len(calibration) == 2
        and all(isinstance(t, Tensor) for t in calibration)
        and calibration[0].shape[:1] == calibration[1].shape[:1]
    ):
        return [calibration]
    if isinstance(calibration, (str, bytes, Mapping)) or not isinstance(calibration, Iterable):
        raise TypeError(
            f"calibration must be a tensor, an (X, Y) pair, a Problem or an iterable of batches, "
            f"not {type(calibration).__name__}"
        )
    if iter(calibration) is calibration:
        calibration = list(calibration)
    return calibration


def find_blocks(model: nn.Module, layers: Mapping[str, nn.Module]) -> list[str]:
    """Paths of the children of the ``ModuleList``/``Sequential`` container whose children hold
    the most of ``layers`` (at least two children holding some); [] if there is none."""
    best: tuple[int, int, list[str]] = (0, 0, [])
    for path, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)):
            continue
        holding = []
        covered = 0
        for name, _ in m.named_children():
            child = f"{path}.{name}" if path else name
            n = sum(1 for p in layers if p == child or p.startswith(child + "."))
            if n:
                holding.append(child)
                covered += n
        if len(holding) >= 2 and (covered, len(holding)) > best[:2]:
            best = (covered, len(holding), holding)
    return best[2]


def plan_stages(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    sequential: str = "block",
    blocks: Sequence[str] | None = None,
) -> list[Stage]:
    """The stages of ``layers`` (see the module docstring), in module order."""
    if sequential not in SEQUENTIAL:
        raise ValueError(f"sequential must be one of {SEQUENTIAL}, not {sequential!r}")
    if sequential == "none":
        return [Stage("", None, dict(layers))]
    if sequential == "layer":
        return [Stage(p, m, {p: m}) for p, m in layers.items()]
    if blocks is None:  # the model's blocks, whichever of their layers are quantised
        block_paths = find_blocks(model, {p: m for p, m in model.named_modules() if is_layer(m)})
    else:
        block_paths = list(blocks)
    modules = dict(model.named_modules())
    order = {p: i for i, p in enumerate(modules)}
    stages: list[Stage] = []
    taken: set[str] = set()
    for bp in block_paths:
        if bp not in modules:
            raise ValueError(f"block {bp!r} is not a module path of the model")
        inside = {p: m for p, m in layers.items() if p == bp or p.startswith(bp + ".")}
        inside = {p: m for p, m in inside.items() if p not in taken}
        if inside:
            stages.append(Stage(bp, modules[bp], inside))
            taken.update(inside)
    stages += [Stage(p, m, {p: m}) for p, m in layers.items() if p not in taken]
    stages.sort(key=lambda s: min(order[p] for p in s.layers))
    return stages


class _StopForward(Exception):
    """Raised by a hook to end a calibration forward pass early."""


class _CallCounter:
    def __init__(self) -> None:
        self.calls = 0
        self.limit: int | None = None

    def __call__(self, module: nn.Module, inputs: tuple, output: object) -> None:
        self.calls += 1
        if self.limit is not None and self.calls >= self.limit:
            raise _StopForward


def _device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


def _to(value: object, device: torch.device | None) -> object:
    return value.to(device) if isinstance(value, Tensor) and device is not None else value


def _forward(model: nn.Module, batch: object, device: torch.device | None) -> None:
    if isinstance(batch, Mapping):
        model(**{k: _to(v, device) for k, v in batch.items()})
        return
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    model(_to(x, device))


def _passes(model: nn.Module, batches: Iterable, stop: _CallCounter | None) -> Iterator[int]:
    """Run the model on each batch (cut short after the stage module's calls); yield counts."""
    device = _device(model)
    for i, batch in enumerate(batches):
        if stop is not None:
            stop.calls = 0
        try:
            _forward(model, batch, device)
        except _StopForward:
            pass
        if stop is not None and i == 0:
            stop.limit = stop.calls or None  # as often as on the first batch
        yield i


def stage_hessians(
    model: nn.Module, batches: Iterable, stage: Stage, shards: Shards = SINGLE
) -> dict[str, LayerHessian]:
    """H = 2XXᵀ/n of each layer of ``stage`` on ``batches`` through the current model (eval
    mode, no autograd; hooks removed and modes restored afterwards); on several ``shards``
    (ranks holding parts of the calibration set) the sums are all-reduced."""
    hooks = HessianHooks(stage.layers)
    counter = _CallCounter() if stage.module is not None else None
    seen = 0
    with shards.together("calibrating a stage"), hooks, torch.no_grad(), eval_mode(model):
        # registered after the Hessian hooks: on a one-layer stage they must record first
        handle = stage.module.register_forward_hook(counter) if counter is not None else None
        try:
            for _ in _passes(model, batches, counter):
                hooks.check()
                seen += 1
        finally:
            if handle is not None:
                handle.remove()
    if shards.count(seen) == 0:
        raise CalibrationError("the calibration data yielded no batch")
    return hooks.hessians(shards)
