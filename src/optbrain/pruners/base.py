"""What every pruner shares: the call contract, the step record and the default mask.

A *pruner* is any object with

* ``pruner(problem, mask=None, sparsity=None, *, scores=None, units=None) -> (Mask, PruneInfo)``:
  one step to the *total* target ``sparsity`` (a fraction in [0, 1) or an int count in
  [0, total), of what the pruner's :attr:`~PrunerBase.counts` names: ``"weights"``, the masked
  entries, or ``"cells"``, the inputs/units/channels it removes), starting from ``mask``
  (default: :meth:`default_mask`), updating the model's stored weights in place (zeroing, or a
  compensating update) and returning the new mask, not attached;
* ``scores``: saliencies already computed by ``pruner.scores(problem, mask)`` for this state.
  Only pruners with ``accepts_scores = True`` use them (one ranking per step: OBD, magnitude,
  random, SNIP, OCD); those that re-rank after every deletion (OBS, layer-wise OBS) raise
  :class:`UnsupportedArgumentError` rather than ignore them;
* ``units``: the total number (int) or fraction (float) of *cells* removed after the step, for
  the pruners that remove cells (``removes_cells``: Unit-OBS and OCD; a cell is removed when all
  its fan-out weights are pruned, :func:`~optbrain.pruners.cell_pruner.removed_cells`); the
  others raise :class:`UnsupportedArgumentError`. For OCD (``counts == "cells"``) ``units`` and
  ``sparsity`` are the same target; for Unit-OBS ``sparsity`` counts weights. Both return a
  :class:`~optbrain.pruners.CellPruneInfo` with the cell counts;
* ``scores(problem, mask=None) -> ParamDict``: the saliencies of the first deletion;
* ``default_mask(model) -> Mask``: the mask a step starts from when none is given — the one the
  loop uses, so a pruner decides it in exactly one place;
* ``state_dict()`` / ``load_state_dict(state)`` for checkpoints.

:class:`PrunerBase` provides the default mask and the stateless checkpoint interface.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

from torch import nn

from ..errors import UnsupportedArgumentError
from ..masking import Mask, current_mask
from ..paramdict import ParamDict
from ..problem import Problem
from ..prunable import partition


@dataclass
class PruneInfo:
    """What one prune step did.

    ``predicted_increase`` is the sum of the deleted saliencies: the objective increase the
    saliency's model predicts for this step (summed over sub-steps, each predicted at its own
    weights). ``per_parameter`` maps each masked name to ``(kept, total)``; ``excluded`` lists the
    model's trainable parameters that the mask does not cover (never pruned), with the reason
    (:mod:`optbrain.prunable`).

    Measured (:mod:`optbrain.pruners.adaptive`; None when the pruner was built with
    ``measure=False``): ``objective_before`` and ``objective_after`` are E =
    ``Problem.objective()`` on the problem's data before and after the step (+inf when the
    deletion made the loss non-finite), ``measured_increase`` their difference — the quantity
    ``predicted_increase`` predicts. ``re_estimates`` counts the saliency (or inverse) estimates
    after the first, ``rejected`` the trial sub-steps undone because their measured increase
    departed from the prediction, and ``sub_steps`` lists the accepted sub-steps (count,
    predicted, measured, within the tolerance, extras such as OBS's safeguard).
    """

    sparsity: float
    pruned: int
    newly_pruned: int
    total: int
    predicted_increase: float
    max_deleted_saliency: float
    per_parameter: dict[str, tuple[int, int]] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    objective_before: float | None = None
    objective_after: float | None = None
    measured_increase: float | None = None
    re_estimates: int = 0
    rejected: int = 0
    sub_steps: list[dict] = field(default_factory=list)

    @classmethod
    def step(
        cls, model: nn.Module, old: Mask, new: Mask, predicted: float, biggest: float, **extra
    ) -> PruneInfo:
        """The record of a step from ``old`` to ``new`` on ``model``."""
        return cls(
            sparsity=new.sparsity(),
            pruned=new.pruned(),
            newly_pruned=new.pruned() - old.pruned(),
            total=new.total(),
            predicted_increase=float(predicted),
            max_deleted_saliency=float(biggest),
            per_parameter={k: (int(new[k].sum()), new[k].numel()) for k in new.names},
            excluded=excluded(model, new),
            **extra,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def excluded(model: nn.Module, mask: Mask) -> dict[str, str]:
    """Trainable parameters of ``model`` that ``mask`` leaves out, with the reason."""
    part = partition(model)
    why = dict(part.excluded)
    for name in part.prunable:
        why.setdefault(name, "not in the mask the step ran on (given, or the method's default)")
    return {k: v for k, v in why.items() if k not in mask}


@runtime_checkable
class PrunerProtocol(Protocol):
    """The call contract every pruner honours (see the module docstring)."""

    def __call__(
        self,
        problem: Problem,
        mask: Mask | None = None,
        sparsity: float | int | None = None,
        *,
        scores: ParamDict | None = None,
        units: float | int | None = None,
    ) -> tuple[Mask, PruneInfo]: ...

    def scores(self, problem: Problem, mask: Mask | None = None) -> ParamDict: ...

    def default_mask(self, model: nn.Module) -> Mask: ...

    counts: str
    accepts_scores: bool

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def default_mask(model: nn.Module) -> Mask:
    """The mask attached to ``model``, or every default-prunable weight kept
    (:func:`optbrain.prunable.prunable_names`) when none is attached."""
    mask = current_mask(model)
    return mask if len(mask) else Mask.ones(model)


class PrunerBase:
    """Default mask, checkpoint interface and argument checks of a pruner.

    Class attributes a pruner sets: ``counts`` (what ``sparsity`` counts: ``"weights"`` or
    ``"cells"``), ``accepts_scores`` (whether precomputed ``scores`` are used);
    ``removes_cells`` (whether ``units=`` is accepted) may be a property.
    """

    counts: str = "weights"
    accepts_scores: bool = False
    removes_cells: bool = False
    _why_no_scores = "it computes its own saliencies"

    def _check_arguments(self, scores, units) -> None:
        """Refuse ``scores`` / ``units`` this pruner cannot use (never ignore them silently)."""
        name = type(self).__name__
        if scores is not None and not self.accepts_scores:
            raise UnsupportedArgumentError(
                f"{name} cannot use precomputed scores ({self._why_no_scores}); call it without "
                "scores="
            )
        if units is not None and not self.removes_cells:
            raise UnsupportedArgumentError(
                f"{name} removes weights, not cells: units= needs a cell pruner "
                "(optbrain.unit_obs() or optbrain.ocd())"
            )

    def default_mask(self, model: nn.Module) -> Mask:
        """The mask a step starts from when none is given: :func:`default_mask`."""
        return default_mask(model)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            name = type(self).__name__
            raise ValueError(f"{name} has no state to load; got keys {sorted(state)}")


Stateless = PrunerBase  # the name used before the pruners package
