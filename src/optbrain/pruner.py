"""Pruner = saliency + selector + update; presets for the classic methods."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .curvature import GGNDiagonal
from .curvature.base import DiagonalCurvature
from .masking import Mask, current_mask
from .paramdict import ParamDict
from .problem import Problem
from .saliency import OBD, SNIP, Magnitude, Random
from .saliency.base import Saliency
from .selection import GlobalSelector, LayerSelector
from .update import ZeroUpdate


@dataclass
class PruneInfo:
    """What one prune step did. ``predicted_increase`` is the sum of the deleted saliencies: the
    objective increase the saliency's model predicts for this step."""

    sparsity: float
    pruned: int
    newly_pruned: int
    total: int
    predicted_increase: float
    max_deleted_saliency: float
    per_parameter: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (kept, total)

    def to_dict(self) -> dict:
        return asdict(self)


class Pruner:
    """One pruning step: compute saliencies, select the next entries to delete, update weights.

    ``pruner(problem, mask=None, sparsity=0.5)`` returns ``(new_mask, info)``; ``sparsity`` is the
    total target (required by the global and per-layer selectors, an optional cap for the threshold
    selector). ``mask=None`` starts
    from the mask attached to the model (or all weights kept: every parameter named ``weight``).
    The update is applied to the stored weights in place (zeroing for OBD); the mask is returned,
    not attached: ``optbrain.masking.attach(model, mask)`` does that (``iterative_prune`` does it
    for you).
    """

    def __init__(self, saliency: Saliency, selector=None, update=None):
        self.saliency = saliency
        self.selector = selector if selector is not None else GlobalSelector()
        self.update = update if update is not None else ZeroUpdate()

    def __call__(
        self,
        problem: Problem,
        mask: Mask | None = None,
        sparsity: float | int | None = None,
        *,
        scores: ParamDict | None = None,
    ) -> tuple[Mask, PruneInfo]:
        """``scores`` may pass saliencies already computed by :meth:`scores` for this state."""
        mask = mask if mask is not None else default_mask(problem.model)
        sub = self._restricted(problem, mask)
        if scores is None:
            scores = self.saliency(sub)
        new = self.selector({k: scores[k] for k in mask.names}, mask, sparsity)
        deleted = {k: mask[k] & ~new[k] for k in mask.names}
        predicted, biggest = 0.0, float("-inf")
        for k, d in deleted.items():
            if d.any():
                vals = scores[k].detach().to(torch.float64)[d.to(scores[k].device)]
                predicted += float(vals.sum())
                biggest = max(biggest, float(vals.max()))
        self.update(sub, mask, new, scores)
        info = PruneInfo(
            sparsity=new.sparsity(),
            pruned=new.pruned(),
            newly_pruned=new.pruned() - mask.pruned(),
            total=new.total(),
            predicted_increase=predicted,
            max_deleted_saliency=biggest if biggest > float("-inf") else 0.0,
            per_parameter={k: (int(new[k].sum()), new[k].numel()) for k in new.names},
        )
        return new, info

    def scores(self, problem: Problem, mask: Mask | None = None) -> ParamDict:
        """The saliencies the pruner would use, without pruning."""
        mask = mask if mask is not None else default_mask(problem.model)
        return self.saliency(self._restricted(problem, mask))

    def state_dict(self) -> dict:
        """State of stateful parts (e.g. a random saliency's generator), for checkpoints."""
        return {
            name: part.state_dict()
            for name, part in (
                ("saliency", self.saliency),
                ("selector", self.selector),
                ("update", self.update),
            )
            if hasattr(part, "state_dict")
        }

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            getattr(self, name).load_state_dict(value)

    @staticmethod
    def _restricted(problem: Problem, mask: Mask) -> Problem:
        if problem.params is not None:
            missing = [n for n in mask.names if n not in problem.params]
            if missing:
                raise KeyError(f"the problem's params exclude masked parameter(s) {missing}")
            return problem
        sub = Problem(problem.model, problem.loss_fn, problem.data, list(mask.names))
        sub._n, sub._reduction = problem.n_samples, problem.reduction
        return sub

    def __repr__(self) -> str:
        return f"Pruner({self.saliency!r}, {self.selector!r}, {self.update!r})"


class Stateless:
    """Checkpoint interface of a pruner that keeps nothing between calls."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            name = type(self).__name__
            raise ValueError(f"{name} has no state to load; got keys {sorted(state)}")


def default_mask(model) -> Mask:
    """The mask attached to ``model``, or all weights kept when none is attached."""
    mask = current_mask(model)
    return mask if len(mask) else Mask.ones(model)


def _selector(scope: str):
    if scope == "global":
        return GlobalSelector()
    if scope == "layer":
        return LayerSelector()
    raise ValueError(f"scope must be 'global' or 'layer', not {scope!r}")


def obd(
    curvature: DiagonalCurvature | None = None,
    weight_decay: float = 0.0,
    scope: str = "global",
) -> Pruner:
    """Optimal Brain Damage: s = ½ h w² (default h: exact GGN diagonal), zero the deleted."""
    return Pruner(OBD(curvature or GGNDiagonal(), weight_decay), _selector(scope))


def magnitude(scope: str = "global") -> Pruner:
    """Magnitude pruning (OBD with H = I)."""
    return Pruner(Magnitude(), _selector(scope))


def random(seed: int = 0, scope: str = "global") -> Pruner:
    """Random deletion (a control)."""
    return Pruner(Random(seed), _selector(scope))


def snip(batches: int | None = 1, scope: str = "global") -> Pruner:
    """SNIP connection sensitivity |w ∂E/∂w|."""
    return Pruner(SNIP(batches), _selector(scope))


def ocd(
    curvature: DiagonalCurvature | str | None = None,
    kinds: tuple[str, ...] = ("input",),
    method: str = "sum",
    scope: str = "global",
):
    """Optimal Cell Damage: remove whole cells (default: input variables) of lowest saliency.

    ``method="sum"``: a cell's saliency is the sum of the OBD saliencies of its fan-out weights
    (Cibas et al.); ``"gate"``: ½ sᵀGs (or ½ sᵀHs with ``curvature="hessian"``) for its fan-out
    weights s. ``sparsity`` counts cells (fraction or number); ``scope="layer"`` removes the same
    fraction of every layer's cells. See :mod:`optbrain.cell_pruner`.
    """
    from .cell_pruner import CellPruner
    from .saliency.ocd import OCD

    return CellPruner(OCD(curvature, kinds, method), scope=scope)


def obs(inverse=None, weight_decay: float = 0.0, ghost_rule: bool = False):
    """Optimal Brain Surgeon: delete one weight at a time by L_q = w_q²/(2[H⁻¹]_qq), move all other
    weights (biases included) by the OBS update, re-rank. See :class:`optbrain.surgeon.OBSPruner`.
    """
    from .surgeon import OBSPruner

    return OBSPruner(inverse, weight_decay=weight_decay, ghost_rule=ghost_rule)


def unit_obs(inverse=None):
    """Unit-OBS: delete whole inputs / hidden units (all their outgoing weights) by group OBS.
    ``sparsity`` counts weights; ``pruner(problem, units=k)`` removes k cells."""
    from .surgeon import OBSPruner

    return OBSPruner(inverse, groups="unit")


def layerwise_obs(**kwargs):
    """Layer-wise OBS (OBC's exact greedy solver for small layers, SparseGPT's blocked solver for
    large ones) on calibration inputs; ``kwargs`` go to :class:`optbrain.layerwise.LayerwiseOBS`
    (``method``, ``nm``, ``damping``, ``blocksize``, ``sequential``, ...)."""
    from .layerwise import LayerwiseOBS

    return LayerwiseOBS(**kwargs)


PRESETS = {
    "obd": obd,
    "magnitude": magnitude,
    "random": random,
    "snip": snip,
    "ocd": ocd,
    "obs": obs,
    "unit_obs": unit_obs,
    "layerwise_obs": layerwise_obs,
}
