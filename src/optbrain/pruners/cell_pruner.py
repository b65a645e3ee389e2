"""Pruning whole cells (Optimal Cell Damage): the lowest-saliency inputs, units or channels lose
all their weights.

:class:`CellPruner` honours the pruner contract (:mod:`optbrain.pruners.base`), so
``iterative_prune`` and the CLI drive it like any other pruner, but its target counts *cells*
(``counts = "cells"``): ``sparsity`` — or, the same target, ``units`` — as a float in [0, 1) is
the fraction of the cells (of the saliency's kinds) removed in total, an int in [0, cells) the
number of removed cells. A cell counts as removed when all its fan-out weights are pruned
(:func:`removed_cells`, which Unit-OBS counts with too). Removing a cell masks its fan-out weights
(inputs) or its fan-in row, bias entry and fan-out weights (units and channels), and zeroes them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..cells import Cell, cell_mask
from ..errors import EmptyLayerError
from ..masking import Mask
from ..paramdict import ParamDict
from ..problem import Problem
from ..saliency.ocd import OCD, CellSaliencies, describe, problem_example
from ..selection import TargetExceededError, split_target, target_count
from ..update import ZeroUpdate
from . import adaptive
from .adaptive import AdaptiveSteps, StepResult, as_steps
from .base import PruneInfo, PrunerBase

log = logging.getLogger(__name__)


@dataclass
class CellPruneInfo(PruneInfo):
    """:class:`~optbrain.pruner.PruneInfo` (weight counts) plus the cell counts of the step.

    ``predicted_increase`` is the sum of the removed cells' saliencies (interactions between
    cells ignored, as OBD ignores them between weights). ``removed`` lists the newly removed cells
    as ``(kind, layer, index)``.
    """

    cells_total: int = 0
    cells_removed: int = 0
    removed: list[tuple[str, str, int]] = field(default_factory=list)


class CellPruner(PrunerBase):
    """Remove the cells of lowest saliency (``saliency``: an :class:`~optbrain.saliency.OCD`).

    ``pruner(problem, mask=None, sparsity=0.5)`` returns ``(new_mask, info)``; the mask (default:
    the attached one, or all weights kept) must hold the fan-out weights of the cells. A cell whose
    fan-out weights are all pruned counts as removed (also when weight pruning left it so) and stays
    removed. The last remaining cell of a layer (or the last input) is never removed: a target that
    needs it raises :class:`~optbrain.errors.EmptyLayerError`. Ties are broken by cell order.

    ``scope="global"`` ranks all cells together (saliencies are objective increases, comparable
    across layers); ``"layer"`` removes the same fraction of every layer's cells (the inputs form
    one group), lowest saliency first within each: the total target is split over the layers in
    proportion to their cell counts with the counts adding up to it exactly, a layer that already
    lost more than its share keeping those and the others removing fewer.

    ``steps`` (default None: one step): an :class:`~optbrain.pruners.AdaptiveSteps` splits a large
    removal into sub-steps with the cell saliencies re-estimated where the measured objective
    departs from the prediction (counted in cells; :mod:`optbrain.pruners.adaptive`); an int k > 1
    takes k geometric sub-steps. ``measure``: record the objective before and after.
    """

    counts = "cells"
    accepts_scores = True
    removes_cells = True

    def __init__(
        self,
        saliency: OCD,
        update=None,
        scope: str = "global",
        *,
        steps: AdaptiveSteps | int | None = None,
        measure: bool = True,
    ):
        if scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', not {scope!r}")
        self.saliency = saliency
        self.update = update if update is not None else ZeroUpdate()
        self.scope = scope
        self.steps = as_steps(steps)
        self.measure = bool(measure) or self.steps is not None

    # ------------------------------------------------------------------ scores
    def cell_scores(self, problem: Problem, mask: Mask | None = None) -> CellSaliencies:
        """The cells' saliencies at the current weights (removed cells score 0)."""
        return self.saliency(problem, self._cells(problem))

    def scores(self, problem: Problem, mask: Mask | None = None) -> ParamDict:
        """Cell saliencies broadcast onto the mask's weights (see ``CellSaliencies.to_params``)."""
        mask = mask if mask is not None else self.default_mask(problem.model)
        return self.cell_scores(problem, mask).to_params({k: mask[k] for k in mask.names})

    # ------------------------------------------------------------------ pruning
    def __call__(
        self,
        problem: Problem,
        mask: Mask | None = None,
        sparsity: float | int | None = None,
        *,
        scores: CellSaliencies | ParamDict | None = None,
        units: float | int | None = None,
    ) -> tuple[Mask, CellPruneInfo]:
        """``scores``: saliencies already computed by :meth:`cell_scores` or :meth:`scores`;
        ``units``: the same target as ``sparsity`` (cells), under the name Unit-OBS uses."""
        if units is not None and sparsity is not None:
            raise ValueError("give either sparsity or units (both count cells here), not both")
        mask = mask if mask is not None else self.default_mask(problem.model)
        found = self._cells(problem)
        before = removed_cells(found, mask)
        what = "units" if units is not None else "sparsity"
        target = target_count(units if units is not None else sparsity, len(found), what)
        state = self._saliencies(problem, found, scores) if scores is not None else None
        stepper = _CellStepper(self, found)
        if self.steps is None:
            out = adaptive.one_step(stepper, problem, mask, target, state, measure=self.measure)
        else:
            out = adaptive.run(self.steps, stepper, problem, mask, target, len(found), state)
        new = out.mask
        after = removed_cells(found, new)
        picked = [c for c, b, a in zip(found, before, after) if a and not b]
        info = CellPruneInfo.step(
            problem.model,
            mask,
            new,
            out.predicted,
            out.biggest,
            cells_total=len(found),
            cells_removed=sum(after),
            removed=[(c.kind, c.layer, c.index) for c in picked],
            **out.info_fields(),
        )
        log.debug("removed %d cells: %s", len(picked), ", ".join(map(describe, picked)))
        return new, info

    def _select(
        self, problem: Problem, mask: Mask, found: list[Cell], sal: CellSaliencies, target: int
    ) -> StepResult:
        """Remove cells up to ``target`` removed in all (one step from ``sal``), zero them."""
        removed = removed_cells(found, mask)
        already = sum(removed)
        if self.scope == "global":
            chosen = choose(found, sal.values, removed, target)
        else:
            if target < already:
                raise TargetExceededError(
                    f"target of {target} removed cells is below the {already} already removed"
                )
            parts = list(groups(found).values())
            wants = split_target(
                [sum(removed[i] for i in g) for g in parts], [len(g) for g in parts], target
            )
            chosen = []
            for group, want in zip(parts, wants):
                chosen += choose(
                    [found[i] for i in group],
                    sal.values[group],
                    [removed[i] for i in group],
                    want,
                    offset=group,
                )
            chosen.sort()
        picked = [found[i] for i in chosen]
        new = cell_mask(mask, [c for c in picked if c.kind == "input"], "fan_out")
        new = cell_mask(new, [c for c in picked if c.kind != "input"], "both")
        weights = sal.to_params({k: mask[k] for k in mask.names})
        self.update(problem, mask, new, weights)
        values = sal.values[chosen] if chosen else torch.zeros(0, dtype=torch.float64)
        return StepResult(new, float(values.sum()), float(values.max()) if chosen else 0.0)

    def _cells(self, problem: Problem) -> list[Cell]:
        return self.saliency.cells(problem.model, problem_example(problem))

    def _saliencies(self, problem: Problem, found: list[Cell], scores) -> CellSaliencies:
        if scores is None:
            return self.saliency(problem, found)
        if isinstance(scores, CellSaliencies):
            if list(scores.cells) != found:
                raise ValueError("scores were computed for other cells than the model's")
            return scores
        empty = CellSaliencies(tuple(found), torch.zeros(len(found)), self.saliency.method)
        return empty.from_params(scores)

    # ------------------------------------------------------------------ state
    def __repr__(self) -> str:
        extra = f", steps={self.steps!r}" if self.steps is not None else ""
        return f"CellPruner({self.saliency!r}, {self.update!r}, scope={self.scope!r}{extra})"


class _CellStepper:
    """The adaptive rule's view of a :class:`CellPruner`, counting removed cells."""

    noun = "removed cells"

    def __init__(self, pruner: CellPruner, found: list[Cell]):
        self.pruner, self.found = pruner, found

    def estimate(self, problem: Problem, mask: Mask) -> CellSaliencies:
        return self.pruner.saliency(problem, self.found)

    def step(self, problem: Problem, mask: Mask, total: int, sal: CellSaliencies) -> StepResult:
        return self.pruner._select(problem, mask, self.found, sal, total)

    def done(self, mask: Mask) -> int:
        return sum(removed_cells(self.found, mask))

    def veto(self, sal: CellSaliencies, mask: Mask, trial: Mask) -> CellSaliencies:
        """The saliencies with the cells ``trial`` removes beyond ``mask`` set to +inf."""
        before, after = removed_cells(self.found, mask), removed_cells(self.found, trial)
        values = sal.values.clone()
        for i, (b, a) in enumerate(zip(before, after)):
            if a and not b:
                values[i] = torch.inf
        return CellSaliencies(sal.cells, values, sal.method)


def removed_cells(found: list[Cell], mask: Mask, strict: bool = True) -> list[bool]:
    """For each cell: are all its fan-out weights pruned in ``mask``? (The one definition of a
    removed cell, for OCD's and Unit-OBS's ``units``.) A fan-out weight the mask does not name
    raises ``ValueError``, or with ``strict=False`` counts as kept."""
    missing = sorted({s.name for c in found for s in c.fan_out if s.name not in mask})
    if missing and strict:
        raise ValueError(
            f"the mask has no entry for {missing}, the fan-out weights of the cells; start from "
            "optbrain.Mask.ones(model) or include those weights"
        )
    tensors = {n: mask[n] for n in {s.name for c in found for s in c.fan_out} if n in mask}
    return [
        all(s.name in tensors and not bool(tensors[s.name][s.index()].any()) for s in c.fan_out)
        for c in found
    ]


def groups(found: list[Cell]) -> dict[tuple[str, str], list[int]]:
    """Cell indices by layer (all inputs form one group)."""
    out: dict[tuple[str, str], list[int]] = {}
    for i, c in enumerate(found):
        out.setdefault(_group(c), []).append(i)
    return out


def choose(
    found: list[Cell],
    values: torch.Tensor,
    removed: list[bool],
    target: int,
    offset: list[int] | None = None,
) -> list[int]:
    """Indices of the lowest-saliency cells still present that bring the number of removed cells
    to ``target``, never the last of a layer (``offset[i]``: the index to report for cell i)."""
    already = sum(removed)
    if target < already:
        where = f" of layer {found[0].layer!r}" if offset is not None else ""
        raise TargetExceededError(
            f"target of {target} removed cells{where} is below the {already} already removed"
        )
    n = target - already
    if n == 0:
        return []
    alive: dict[tuple[str, str], int] = {}
    for c, r in zip(found, removed):
        alive[_group(c)] = alive.get(_group(c), 0) + (not r)
    order = torch.sort(values.to(torch.float64), stable=True).indices.tolist()
    chosen: list[int] = []
    for i in order:
        if len(chosen) == n:
            break
        g = _group(found[i])
        if removed[i] or alive[g] <= 1:
            continue
        chosen.append(i)
        alive[g] -= 1
    if len(chosen) < n:
        removable = len(chosen)
        raise EmptyLayerError(
            f"removing {n} more cells would remove every {_what(found)}; at most {removable} "
            "more can be removed while keeping one cell in each layer"
        )
    return sorted(chosen if offset is None else [offset[i] for i in chosen])


def _group(cell: Cell) -> tuple[str, str]:
    return ("input", "") if cell.kind == "input" else (cell.kind, cell.layer)


def _what(found: list[Cell]) -> str:
    kinds = {c.kind for c in found}
    parts = []
    if "input" in kinds:
        parts.append("input of the network")
    if kinds - {"input"}:
        parts.append("unit/channel of a layer")
    return " or every ".join(parts)
