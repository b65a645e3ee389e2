"""The sequential Optimal Brain Surgeon pruner (Hassibi & Stork 1993; Unit-OBS, Stahlberger &
Riedmiller 1997; NNSYSID's weight-decay and nuisance-parameter rules, PAPERS.md §2–4).

One inverse curvature serves a whole sequence of deletions: delete the alive candidate of least
saliency, move every alive coordinate by the OBS update (biases and other parameters outside the
mask included: they compensate but are never deleted), shrink H⁻¹ to the remaining coordinates
(:meth:`~optbrain.curvature.inverse.InverseHessian.eliminate`), re-rank, repeat. On a
quadratic objective (least squares with a linear model, where the Gauss–Newton matrix is the exact
and constant Hessian) every step's saliency is the exact increase of E.

Away from a quadratic the compensating update can hurt: with a nearly singular (damped,
α = 10⁻⁶) Gauss–Newton matrix it moves weights far along near-null directions, where the quadratic
model no longer holds. The *safeguard* (``safeguard=True``; on in the preset
:func:`~optbrain.pruners.obs`) keeps the update only where the measured objective says it helps
(:func:`safeguarded`): after a (sub-)step it compares E at the updated weights with E at plain
zeroing of the same weights, and when the update does not win it takes the best of the shortened
updates (a line search on its length, t ∈ {½, ¼, ⅛}) and plain zeroing (t = 0), so a step never
ends above plain zeroing. A shortened update also raises the damping of the next sub-step's
inverse tenfold (Levenberg–Marquardt; lowered tenfold again, not below the original, after an
update kept whole; not with ``weight_decay``, whose damping is the decay). With ``steps`` (an
:class:`~optbrain.pruners.AdaptiveSteps`, also on in the preset) a large deletion is split into
sub-steps with the inverse re-estimated at the current weights wherever the measured increase
departs from the prediction, as for OBD (:mod:`optbrain.pruners.adaptive`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import EmptyLayerError, TargetUnreachableError, UnsupportedArgumentError
from ..masking import Mask
from ..paramdict import ParamDict, named_parameters, restored_on_error
from ..problem import Problem
from ..saliency.obs import (
    check_regularizer,
    check_weight_decay,
    group_saliency,
    group_step,
    obs_saliencies,
    resolve_inverse,
)
from ..selection import TargetExceededError, check_min_kept, target_count
from . import adaptive
from .adaptive import AdaptiveSteps, StepResult, as_steps, measured_objective
from .base import PruneInfo, PrunerBase
from .cell_pruner import CellPruneInfo, removed_cells

log = logging.getLogger(__name__)

GROUPS = ("weight", "unit")


class _Session:
    """One inverse and the coordinate vector it acts on, with the pruner's bookkeeping."""

    def __init__(
        self, pruner: OBSPruner, problem: Problem, params, mask: Mask, cells, inverse=None
    ):
        self.inv = (inverse or pruner.inverse).inverse(problem, mask)
        check_regularizer(self.inv, pruner.weight_decay)
        self.coords = self.inv.coords
        self.theta = self.inv.gather(params)
        dev = self.theta.device
        self.mask_names = mask.names
        self.prunable = torch.zeros(self.coords.size, dtype=torch.bool, device=dev)
        self.name_rows = {}  # masked name -> rows of its alive entries (the min_kept guard)
        self.vetoed = torch.zeros(self.coords.size, dtype=torch.bool, device=dev)
        for n in mask.names:
            self.name_rows[n] = self.coords.rows[n][self.coords.positions[n]].to(dev)
            self.prunable[self.name_rows[n]] = True
        self.fan_in = [self._slab_rows(c.fan_in) for c in cells]
        self.fan_out = [self._slab_rows(c.fan_out) for c in cells]
        self.hidden = torch.tensor([c.kind != "input" for c in cells], dtype=torch.bool)
        # the ghost rule's input connections: the producing layer's weight row (fan_in[0]), not
        # the bias or a following BatchNorm's parameters
        self.in_weights = [self._slab_rows(c.fan_in[:1]) for c in cells]
        model_params = named_parameters(problem.model, trainable_only=False)
        self.fixed_in = [self._fixed_live(c.fan_in[:1], model_params) for c in cells]

    def _fixed_live(self, slabs, model_params) -> bool:
        """Whether a slab outside the problem's parameters (held fixed) has a nonzero entry."""
        return any(
            bool((model_params[s.name].detach()[s.index()] != 0).any())
            for s in slabs
            if s.name not in self.coords.rows and s.name in model_params
        )

    def _slab_rows(self, slabs) -> Tensor:
        """Rows of the alive coordinates in ``slabs`` (parameters outside the problem skipped)."""
        parts = []
        for s in slabs:
            if s.name not in self.coords.rows:
                continue  # not a coordinate (a restricted Problem.params): held fixed
            shape = self.coords.shapes[s.name]
            flat = torch.arange(int(torch.tensor(shape).prod()), device=self.theta.device)
            rows = self.coords.rows[s.name].to(flat.device)[flat.reshape(shape)[s.index()]]
            parts.append(rows.reshape(-1))
        if not parts:
            return torch.empty(0, dtype=torch.long, device=self.theta.device)
        rows = torch.cat(parts)
        return rows[rows >= 0]

    def removed_cells(self) -> int:
        """Cells without an alive fan-out coordinate (the Unit-OBS count of ``units``)."""
        return sum(int(self.alive(rows).numel() == 0) for rows in self.fan_out)

    def alive(self, rows: Tensor) -> Tensor:
        return rows[self.inv.alive[rows]]

    def copy(self) -> _Session:
        """An independent copy of the inverse and θ (the rest is read-only and shared)."""
        out = copy.copy(self)
        out.inv = self.inv.copy()
        out.theta = self.theta.clone()
        return out

    def delete(self, rows: Tensor, delta: Tensor | None) -> None:
        """Apply δθ (if any), set ``rows`` exactly to 0 and eliminate them from H⁻¹."""
        if delta is not None:
            self.theta += delta
        self.theta[rows] = 0
        self.inv.eliminate(rows)

    def deleted(self) -> dict[str, Tensor]:
        """Flat positions, per masked parameter, of the rows eliminated so far."""
        gone = ~self.inv.alive & self.prunable
        out = {}
        for n in self.mask_names:
            rows = self.coords.rows[n][self.coords.positions[n]].to(gone.device)
            out[n] = self.coords.positions[n][gone[rows].to(self.coords.positions[n].device)]
        return out

    def write_back(self, params) -> None:
        """Store θ in the model's parameters (in place, in their dtype)."""
        values = self.coords.scatter(self.theta)
        with torch.no_grad():
            for n in self.coords.names:
                p, pos = params[n], self.coords.positions[n]
                flat = p.detach().reshape(-1).clone()
                flat[pos.to(p.device)] = (
                    values[n]
                    .reshape(-1)[pos.to(values[n].device)]
                    .to(device=p.device, dtype=p.dtype)
                )
                p.copy_(flat.reshape(p.shape))


class OBSPruner(PrunerBase):
    """Sequential Optimal Brain Surgeon, with the interface of :class:`optbrain.pruner.Pruner`.

    ``pruner(problem, mask=None, sparsity=0.5)`` computes H⁻¹ once (``inverse``, default
    ``AutoInverse(alpha=1e-6)``; ``alpha=weight_decay`` when that is > 0), then repeatedly deletes
    the alive candidate of least saliency, applies the OBS update to *all* alive parameters of the
    problem in place (deleted entries exactly 0), shrinks H⁻¹, and re-ranks, until ``sparsity`` (a
    total: fraction or count of the mask's entries, as everywhere) is reached. Returns
    ``(new_mask, PruneInfo)``; ``info.predicted_increase`` is the sum of the step saliencies (exact
    on quadratic problems). ``refresh=k`` recomputes H⁻¹ at the current weights every k deletions
    (the paper's "go back to step 2").

    ``groups="unit"`` is Unit-OBS: the candidates are the cells of
    :func:`optbrain.cells.cells` (inputs and hidden units/channels) whose fan-out still has alive
    weights; removing one is a group-OBS step on its alive fan-out weights
    (ΔE = ½ wᵀM(MᵀH⁻¹M)⁻¹Mᵀw); a hidden unit's masked fan-in weights, which no longer reach the
    output, are then zeroed and pruned as well (no ΔE). ``sparsity`` still counts weights (stop at
    the first step reaching it); ``units`` is instead the total number (int) or fraction (float)
    of cells removed after the step, as for :class:`~optbrain.pruners.CellPruner` (a cell is
    removed when all its fan-out weights are pruned). In unit mode the step record is a
    :class:`~optbrain.pruners.CellPruneInfo` with the cell counts.

    ``weight_decay=λ``: saliencies are the change of the unregularised E for a network at a
    minimum of E + (λ/2)‖w‖², E the per-sample *mean* objective (:mod:`optbrain.saliency.obs`):
    PyTorch's ``weight_decay=λ`` for a ``reduction="mean"`` loss, λ/b for ``reduction="sum"``
    with batches of b samples. If the inverse had to fall back to more damping than λ,
    :class:`~optbrain.errors.SingularCurvatureError` is raised.

    ``ghost_rule=True`` applies NNSYSID's nuisance-parameter rule to the input weights of hidden
    units (their layer's weight row; biases and BatchNorm parameters do not count): deleting the
    last live input weight of a hidden unit deletes its alive output weights in the same
    group-OBS step (the candidate is ranked by that group's ΔE), and the last alive output weight
    of a hidden unit that still has a live input weight is never deleted alone. When one weight
    is both (nets with >= 2 hidden layers) the protection wins. Parameters outside a restricted
    ``Problem(params=...)`` are held fixed; their nonzero input weights count as live.

    ``safeguard=True`` keeps the compensating update only where it lowers the measured objective
    against plain zeroing (line search on its length, Levenberg–Marquardt damping for the next
    sub-step; see the module docstring); each sub-step's ``update_scale`` and ``damping`` are in
    ``PruneInfo.sub_steps``. ``steps``: None (one step, the paper's procedure), an
    :class:`~optbrain.pruners.AdaptiveSteps` or an int k > 1 (k geometric sub-steps), each sub-step
    with H⁻¹ recomputed at the current weights (weight mode; ``units=`` takes one step).
    ``measure``: record the objective before and after in the :class:`PruneInfo`.
    ``min_kept``: in weight mode, no masked parameter keeps fewer alive entries (0: no guard; a
    target that needs more raises :class:`~optbrain.errors.EmptyLayerError`). The preset
    :func:`~optbrain.pruners.obs` turns on the safeguard, adaptive steps and ``min_kept=1``.
    """

    _why_no_scores = "it re-ranks after every deletion from its own inverse"

    def __init__(
        self,
        inverse=None,
        groups: str = "weight",
        weight_decay: float = 0.0,
        ghost_rule: bool = False,
        refresh: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        *,
        steps: AdaptiveSteps | int | None = None,
        safeguard: bool = False,
        measure: bool = True,
        min_kept: int = 0,
    ):
        if groups not in GROUPS:
            raise ValueError(f"groups must be one of {GROUPS}, not {groups!r}")
        if ghost_rule and groups != "weight":
            raise ValueError("ghost_rule applies to single-weight deletion (groups='weight')")
        if refresh is not None and (
            isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 1
        ):
            raise ValueError(f"refresh must be None or an int >= 1, not {refresh!r}")
        self.weight_decay = check_weight_decay(weight_decay)
        self.inverse = resolve_inverse(inverse, self.weight_decay)
        if getattr(self.inverse, "structured", False) and (ghost_rule or groups != "weight"):
            raise UnsupportedArgumentError(
                f"{self.inverse!r} prunes single weights in bulk: ghost_rule and groups='unit' "
                "need the dense inverse (AutoInverse)"
            )
        self.groups = groups
        self.ghost_rule = bool(ghost_rule)
        self.refresh = refresh
        self.progress = progress
        self.steps = as_steps(steps)
        self.safeguard = bool(safeguard)
        self.measure = bool(measure) or self.steps is not None or self.safeguard
        self.min_kept = check_min_kept(min_kept)

    # ------------------------------------------------------------------ public
    @property
    def removes_cells(self) -> bool:
        """Unit-OBS (``groups="unit"``) removes cells and accepts ``units=``."""
        return self.groups == "unit"

    def __call__(
        self,
        problem: Problem,
        mask: Mask | None = None,
        sparsity: float | int | None = None,
        *,
        scores: ParamDict | None = None,
        units: float | int | None = None,
    ) -> tuple[Mask, PruneInfo]:
        """One step to ``sparsity`` (weights) or ``units`` (cells, Unit-OBS). ``scores`` is
        refused (:class:`~optbrain.errors.UnsupportedArgumentError`): OBS re-ranks after every
        deletion from its own inverse."""
        if units is not None and sparsity is not None:
            raise ValueError("give either sparsity or units, not both")
        self._check_arguments(scores, units)
        mask = mask if mask is not None else self.default_mask(problem.model)
        params = self._params(problem, mask)
        kind, wanted = self._goal(problem, mask, sparsity, units)
        self._check_reachable(mask, kind, wanted)
        stepper = _Stepper(self, problem, params, kind)
        with restored_on_error(adaptive.touched(problem, mask)):
            if kind == "units" or self.steps is None:
                total = wanted if kind == "units" else mask.pruned() + wanted
                out = adaptive.one_step(stepper, problem, mask, total, measure=self.measure)
            else:
                total = mask.pruned() + wanted
                out = adaptive.run(self.steps, stepper, problem, mask, total, mask.total())
            new = out.mask
            with torch.no_grad():
                for k in new.names:
                    params[k].mul_(new[k].to(device=params[k].device, dtype=params[k].dtype))
        args = (problem.model, mask, new, out.predicted, out.biggest)
        if self.groups != "unit":
            return new, PruneInfo.step(*args, **out.info_fields())
        return new, self._cell_info(problem, mask, new, args, out.info_fields())

    def _cell_info(self, problem: Problem, mask: Mask, new: Mask, args, fields) -> CellPruneInfo:
        """The step record of Unit-OBS, with the cell counts."""
        found = self._cells(problem)
        before, after = removed_cells(found, mask, strict=False), removed_cells(found, new, False)
        gone = [c for c, b, a in zip(found, before, after) if a and not b]
        return CellPruneInfo.step(
            *args,
            cells_total=len(found),
            cells_removed=sum(after),
            removed=[(c.kind, c.layer, c.index) for c in gone],
            **fields,
        )

    def scores(self, problem: Problem, mask: Mask | None = None) -> ParamDict:
        """Saliencies of the first deletion, per masked entry: the OBS saliency (weight mode; +inf
        for entries the ghost rule keeps), or each fan-out weight's unit ΔE (unit mode; +inf for
        weights of no candidate cell). Pruned entries get 0."""
        mask = mask if mask is not None else self.default_mask(problem.model)
        params = self._params(problem, mask)
        s = _Session(self, problem, params, mask, self._cells(problem))
        if self.groups == "unit":
            vec = torch.full_like(s.theta, torch.inf)
            _, rows, vals = self._unit_candidates(s)
            for r, val in zip(rows, vals):
                vec[r] = val
        else:
            vec, _ = self._weight_candidates(s)
        vec = torch.where(s.inv.alive, vec, torch.zeros_like(vec))
        out = s.coords.scatter(vec)
        return {k: out[k] for k in mask.names}

    def __repr__(self) -> str:
        extra = "".join(
            f", {k}={v!r}"
            for k, v in (
                ("steps", self.steps),
                ("safeguard", self.safeguard),
                ("min_kept", self.min_kept),
            )
            if v
        )
        return (
            f"OBSPruner(inverse={self.inverse!r}, groups={self.groups!r}, "
            f"weight_decay={self.weight_decay!r}, ghost_rule={self.ghost_rule!r}, "
            f"refresh={self.refresh!r}{extra})"
        )

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _params(problem: Problem, mask: Mask):
        params = problem.parameters()
        missing = [n for n in mask.names if n not in params]
        if missing:
            raise KeyError(f"the problem's params exclude masked parameter(s) {missing}")
        return params

    def _goal(self, problem: Problem, mask: Mask, sparsity, units) -> tuple[str, int]:
        """("weights", deletions wanted) or ("units", total cells removed wanted)."""
        if units is not None:
            return "units", target_count(units, len(self._cells(problem)), "units")
        target = target_count(sparsity, mask.total())
        already = mask.pruned()
        if target < already:
            raise TargetExceededError(
                f"target of {target} pruned entries is below the {already} already pruned"
            )
        return "weights", target - already

    def _check_reachable(self, mask: Mask, kind: str, wanted: int) -> None:
        """``min_kept``: a weight target that needs a parameter below it raises EmptyLayerError."""
        if kind != "weights" or not self.min_kept:
            return
        room = sum(max(int(mask[n].sum()) - self.min_kept, 0) for n in mask.names)
        if wanted > room:
            reachable = mask.pruned() + room
            raise EmptyLayerError(
                f"pruning {mask.pruned() + wanted} of {mask.total()} entries would leave a layer "
                f"with fewer than {self.min_kept} kept; at most {reachable} "
                f"({reachable / mask.total():.4%}) can be pruned while every masked parameter "
                f"keeps {self.min_kept}; pass min_kept=0 to allow a layer to lose every weight"
            )

    def _cells(self, problem: Problem):
        if self.groups == "weight" and not self.ghost_rule:
            return []
        from ..cells import cells

        kinds = ("input", "unit", "channel") if self.groups == "unit" else ("unit", "channel")
        return cells(problem.model, kinds)

    def _weight_candidates(self, s: _Session) -> tuple[Tensor, dict[int, Tensor]]:
        """Saliency per row (+inf: not a candidate) and the ghost groups keyed by trigger row.

        Ghost rule, for each hidden unit with live input weights (alive coordinates of its
        layer's weight row, or nonzero entries of it outside the problem): its last alive output
        weight is protected (+inf). A unit whose only live input weight q is prunable gets the
        candidate q ranked by ΔE of deleting q with its alive outputs. Protection wins: when q is
        also another unit's protected last output (nets with >= 2 hidden layers), q stays +inf,
        so no unit is ever left with live inputs and no output, whatever the loop order."""
        sal = obs_saliencies(s.inv, s.theta, self.weight_decay)
        sal = torch.where(s.prunable & ~s.vetoed, sal, torch.inf)
        if self.min_kept:  # a parameter down to min_kept alive entries loses no more
            for rows in s.name_rows.values():
                if int(s.inv.alive[rows].sum()) <= self.min_kept:
                    sal[rows] = torch.inf
        groups: dict[int, Tensor] = {}
        if not self.ghost_rule:
            return sal, groups
        protected: set[int] = set()
        triggers: list[tuple[int, Tensor]] = []
        for i, hidden in enumerate(s.hidden.tolist()):
            if not hidden:
                continue
            out_alive = s.alive(s.fan_out[i])
            in_alive = s.alive(s.in_weights[i])
            live_in = in_alive.numel() + int(s.fixed_in[i])
            if live_in and out_alive.numel() == 1:  # never deleted alone: it would make a ghost
                protected.add(int(out_alive[0]))
            if (
                live_in == 1
                and in_alive.numel() == 1
                and bool(s.prunable[in_alive].all())
                and out_alive.numel()
                and bool(s.prunable[out_alive].all())
            ):
                triggers.append((int(in_alive[0]), torch.cat([in_alive, out_alive])))
        if protected:
            sal[torch.tensor(sorted(protected), device=sal.device)] = torch.inf
        for q, group in triggers:
            if q in protected:
                continue
            groups[q] = group
            sal[q] = group_saliency(s.inv, s.theta, group, self.weight_decay)
        return sal, groups

    def _unit_candidates(self, s: _Session) -> tuple[list[int], list[Tensor], list[float]]:
        """Candidate cells (index, alive fan-out rows, group ΔE)."""
        idx, rows, vals = [], [], []
        for i, fout in enumerate(s.fan_out):
            alive = s.alive(fout)
            if alive.numel() == 0 or not bool(s.prunable[alive].all()):
                continue
            idx.append(i)
            rows.append(alive)
            vals.append(group_saliency(s.inv, s.theta, alive, self.weight_decay))
        return idx, rows, vals

    def _run(
        self,
        problem: Problem,
        params,
        mask: Mask,
        goal: tuple[str, int],
        s: _Session | None = None,
        inverse=None,
    ):
        """The greedy loop from session ``s`` (made here when None) until ``goal`` is met."""
        kind, wanted = goal
        cells = self._cells(problem)
        current = mask  # the mask the session's inverse excludes
        s = s if s is not None else _Session(self, problem, params, current, cells, inverse)
        if getattr(s.inv, "prunes_in_bulk", False):
            return self._run_bulk(problem, params, current, wanted, s, inverse)
        already = s.removed_cells()
        if kind == "units":  # a total: the cells still to remove
            if wanted < already:
                raise TargetExceededError(
                    f"target of {wanted} removed cells is below the {already} already removed"
                )
            wanted -= already
        steps: list[float] = []
        done = 0  # weights (kind "weights") or cells (kind "units") deleted
        since_refresh = 0
        while done < wanted:
            if self.refresh is not None and since_refresh == self.refresh:
                s.write_back(params)
                current = current.with_pruned(s.deleted())
                s = _Session(self, problem, params, current, cells, inverse)
                since_refresh = 0
            before = int((~s.inv.alive & s.prunable).sum())
            if self.groups == "unit":
                loss = self._unit_step(s)
            else:
                loss = self._weight_step(s)
            if loss is None:
                raise TargetUnreachableError(
                    f"no candidate left after deleting {done} of the {wanted} requested "
                    f"{kind} (the remaining ones are protected or outside the mask)"
                )
            steps.append(loss)
            since_refresh += 1
            gone = int((~s.inv.alive & s.prunable).sum()) - before
            done = s.removed_cells() - already if kind == "units" else done + gone
            if self.progress is not None:
                self.progress(min(done, wanted), wanted)
        s.write_back(params)
        return current.with_pruned(s.deleted()), steps

    def _run_bulk(self, problem, params, current: Mask, wanted: int, s: _Session, inverse):
        """The greedy loop of a structured inverse (block-diagonal, K-FAC): its ``prune`` takes
        many deletions at once (``refresh`` deletions per inverse when set)."""
        steps: list[float] = []
        done = 0
        while done < wanted:
            if done and self.refresh is not None:
                s.write_back(params)
                current = current.with_pruned(s.deleted())
                s = _Session(self, problem, params, current, [], inverse)
            take = wanted - done if self.refresh is None else min(self.refresh, wanted - done)
            candidates = s.prunable & ~s.vetoed & s.inv.alive
            caps = []
            if self.min_kept:
                for rows in s.name_rows.values():
                    alive = int(s.inv.alive[rows].sum())
                    caps.append((rows, max(alive - self.min_kept, 0)))
            rows, losses = s.inv.prune(s.theta, candidates, take, caps)
            if rows.numel() < take:
                raise TargetUnreachableError(
                    f"no candidate left after deleting {done + rows.numel()} of the {wanted} "
                    "requested weights (the remaining ones are protected or outside the mask)"
                )
            steps += losses
            done += rows.numel()
            if self.progress is not None:
                self.progress(done, wanted)
        s.write_back(params)
        return current.with_pruned(s.deleted()), steps

    def _weight_step(self, s: _Session) -> float | None:
        sal, groups = self._weight_candidates(s)
        q = int(torch.argmin(sal))
        if not bool(torch.isfinite(sal[q])):
            return None
        rows = groups.get(q, torch.tensor([q], device=s.theta.device))
        loss, delta = group_step(s.inv, s.theta, rows, self.weight_decay)
        s.delete(rows, delta)
        return loss

    def _unit_step(self, s: _Session) -> float | None:
        cells, rows, vals = self._unit_candidates(s)
        if not rows:
            return None
        best = min(range(len(vals)), key=lambda i: (vals[i], i))
        loss, delta = group_step(s.inv, s.theta, rows[best], self.weight_decay)
        s.delete(rows[best], delta)
        c = cells[best]
        if s.hidden[c]:  # its fan-in no longer reaches the output: zero and prune it too
            dead = s.alive(s.fan_in[c])
            dead = dead[s.prunable[dead]]
            if dead.numel():
                s.delete(dead, None)
        return loss


class _Stepper:
    """The adaptive rule's view of an :class:`OBSPruner`: estimate = a session (H⁻¹ at the current
    weights, with the current Levenberg–Marquardt damping), step = the greedy loop on a copy of it,
    then the safeguard."""

    noun = "pruned entries"

    def __init__(self, pruner: OBSPruner, problem: Problem, params, kind: str):
        self.pruner, self.params, self.kind = pruner, params, kind
        self.cells = pruner._cells(problem)
        self.inverse = pruner.inverse

    def estimate(self, problem: Problem, mask: Mask) -> _Session:
        return _Session(self.pruner, problem, self.params, mask, self.cells, self.inverse)

    def step(self, problem: Problem, mask: Mask, total: int, s: _Session) -> StepResult:
        start = {k: p.detach().clone() for k, p in self.params.items()}
        wanted = total if self.kind == "units" else total - mask.pruned()
        new, losses = self.pruner._run(
            problem, self.params, mask, (self.kind, wanted), s.copy(), self.inverse
        )
        result = StepResult(new, sum(losses), max(losses) if losses else 0.0)
        if self.pruner.safeguard and losses:
            scale, result.objective = safeguarded(problem, self.params, start, new)
            damping = self._adjust_damping(scale)
            result.extra = {"update_scale": scale, "damping": damping}
        return result

    @staticmethod
    def done(mask: Mask) -> int:
        return mask.pruned()

    @staticmethod
    def veto(s: _Session, mask: Mask, trial: Mask) -> _Session:
        """A copy of the session whose candidates exclude the entries ``trial`` deleted beyond
        ``mask`` (weight mode)."""
        out = s.copy()
        out.vetoed = s.vetoed.clone()
        for n in mask.names:
            gone = torch.nonzero((mask[n] & ~trial[n]).reshape(-1)).reshape(-1)
            if gone.numel() and n in s.coords.rows:
                rows = s.coords.rows[n].to(gone.device)[gone]
                out.vetoed[rows[rows >= 0].to(out.vetoed.device)] = True
        return out

    def _adjust_damping(self, scale: float) -> float | None:
        """Levenberg–Marquardt: ×10 after a shortened update, ÷10 (not below the pruner's own)
        after a whole one. Returns the damping this sub-step's inverse used (None: the estimator
        has none that can be changed, or ``weight_decay`` fixes it)."""
        attr = _damping_attribute(self.inverse)
        if attr is None or self.pruner.weight_decay > 0:
            return None
        base = getattr(self.pruner.inverse, attr)
        now = getattr(self.inverse, attr)
        new = now * DAMPING_FACTOR if scale < 1.0 else max(base, now / DAMPING_FACTOR)
        if new != now:
            self.inverse = copy.copy(self.inverse)
            setattr(self.inverse, attr, new)
        return now


DAMPING_FACTOR = 10.0
SCALES = (0.5, 0.25, 0.125)
"""The shortened updates tried when the whole one does not beat plain zeroing."""


def _damping_attribute(inverse) -> str | None:
    """The estimator's multiple of I added to the curvature (``alpha`` or a positive
    ``damping``), or None when it has none that can be raised."""
    if isinstance(getattr(inverse, "alpha", None), float) and inverse.alpha > 0:
        return "alpha"
    if isinstance(getattr(inverse, "damping", None), float) and inverse.damping > 0:
        return "damping"
    return None


def safeguarded(
    problem: Problem, params: dict[str, Tensor], start: dict[str, Tensor], new: Mask
) -> tuple[float, float]:
    """Keep the compensating update only where it lowers the measured objective.

    ``start``: the weights before the step, ``params``: after it (the OBS update u applied,
    deleted entries 0). With z = ``start`` with the newly deleted entries zeroed (plain zeroing),
    the weights become z + t·(u − z) for the t in {1, ½, ¼, ⅛, 0} of lowest measured E (1 when it
    is not above plain zeroing, without trying the others). Returns (t, E there); the weights
    are left at that t."""
    updated = {k: p.detach().clone() for k, p in params.items()}
    zeroed = {
        k: v * new[k].to(device=v.device, dtype=v.dtype) if k in new else v
        for k, v in start.items()
    }

    def at(t: float) -> float:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(zeroed[k] + t * (updated[k] - zeroed[k]) if t else zeroed[k])
        return measured_objective(problem)

    tried = {0.0: at(0.0), 1.0: at(1.0)}
    if tried[1.0] > tried[0.0]:
        for t in SCALES:
            tried[t] = at(t)
    best = min(tried, key=lambda t: (tried[t], -t))
    if best != 1.0:
        at(best)
        log.info(
            "OBS update shortened to %g of its length (objective %.4g, update %.4g, zeroing %.4g)",
            best,
            tried[best],
            tried[1.0],
            tried[0.0],
        )
    return best, tried[best]
