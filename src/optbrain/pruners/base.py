"""What every pruner shares: the call contract, the step record and the default mask.

A *pruner* is any object with

* ``pruner(problem, mask=None, sparsity=None, *, scores=None) -> (Mask, PruneInfo)``: one step to
  the *total* target ``sparsity`` (a fraction in [0, 1) of the masked entries, or an int count),
  starting from ``mask`` (default: :meth:`default_mask`), updating the model's stored weights in
  place (zeroing, or a compensating update) and returning the new mask, not attached;
  ``scores`` are saliencies already computed by ``pruner.scores(problem, mask)`` for this state
  (pruners that re-rank as they delete refuse them);
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
        why.setdefault(name, "not in the mask given")
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
    ) -> tuple[Mask, PruneInfo]: ...

    def scores(self, problem: Problem, mask: Mask | None = None) -> ParamDict: ...

    def default_mask(self, model: nn.Module) -> Mask: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def default_mask(model: nn.Module) -> Mask:
    """The mask attached to ``model``, or every default-prunable weight kept
    (:func:`optbrain.prunable.prunable_names`) when none is attached."""
    mask = current_mask(model)
    return mask if len(mask) else Mask.ones(model)


class PrunerBase:
    """Default mask and checkpoint interface of a pruner that keeps nothing between calls."""

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
