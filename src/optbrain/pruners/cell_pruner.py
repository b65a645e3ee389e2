"""Pruning whole cells (Optimal Cell Damage): the lowest-saliency inputs, units or channels lose
all their weights.

:class:`CellPruner` has the interface of :class:`optbrain.pruner.Pruner`, so ``iterative_prune``
and the CLI drive it like any other pruner, but its target counts *cells*: ``sparsity`` as a float
in [0, 1) is the fraction of the cells (of the saliency's kinds) removed in total, an int the number
of removed cells. Removing a cell masks its fan-out weights (inputs) or its fan-in row, bias entry
and fan-out weights (units and channels), and zeroes them.
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
    """

    def __init__(self, saliency: OCD, update=None, scope: str = "global"):
        if scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', not {scope!r}")
        self.saliency = saliency
        self.update = update if update is not None else ZeroUpdate()
        self.scope = scope

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
    ) -> tuple[Mask, CellPruneInfo]:
        """``scores``: saliencies already computed by :meth:`cell_scores` or :meth:`scores`."""
        mask = mask if mask is not None else self.default_mask(problem.model)
        found = self._cells(problem)
        removed = removed_cells(found, mask)
        sal = self._saliencies(problem, found, scores)
        target = target_count(sparsity, len(found))
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
        info = CellPruneInfo.step(
            problem.model,
            mask,
            new,
            float(values.sum()),
            float(values.max()) if chosen else 0.0,
            cells_total=len(found),
            cells_removed=already + len(chosen),
            removed=[(c.kind, c.layer, c.index) for c in picked],
        )
        log.debug("removed %d cells: %s", len(picked), ", ".join(map(describe, picked)))
        return new, info

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
        return f"CellPruner({self.saliency!r}, {self.update!r}, scope={self.scope!r})"


def removed_cells(found: list[Cell], mask: Mask) -> list[bool]:
    """For each cell: are all its fan-out weights pruned in ``mask``?"""
    missing = sorted({s.name for c in found for s in c.fan_out if s.name not in mask})
    if missing:
        raise ValueError(
            f"the mask has no entry for {missing}, the fan-out weights of the cells; start from "
            "optbrain.Mask.ones(model) or include those weights"
        )
    tensors = {n: mask[n] for n in {s.name for c in found for s in c.fan_out}}
    return [not any(bool(tensors[s.name][s.index()].any()) for s in c.fan_out) for c in found]


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
