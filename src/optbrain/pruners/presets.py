"""The named pruning methods: one factory each, and the one table (:data:`METHODS`) that the
command line, the tasks, the demo and the experiments read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..curvature import GGNDiagonal
from ..curvature.base import DiagonalCurvature
from ..saliency import OBD, SNIP, Magnitude, Random
from ..selection import selector_for as _selector
from .adaptive import AdaptiveSteps
from .cell_pruner import CellPruner
from .composed import Pruner
from .generalization import ebd, esp, gamma_obd, gamma_obs, validation_obd
from .layerwise import LayerwiseOBS
from .surgeon import OBSPruner

ADAPTIVE = AdaptiveSteps()
"""The default sub-step rule of the methods that re-estimate their curvature (OBD, OCD, OBS)."""


def obd(
    curvature: DiagonalCurvature | None = None,
    weight_decay: float = 0.0,
    scope: str = "global",
    *,
    steps: AdaptiveSteps | int | None = ADAPTIVE,
    min_kept: int = 1,
) -> Pruner:
    """Optimal Brain Damage: s = ½ h w² (default h: exact GGN diagonal), zero the deleted.

    ``steps``: by default a large deletion is split into sub-steps with re-estimated curvature
    where the measured objective departs from the prediction (:class:`AdaptiveSteps`; a deletion
    whose prediction holds is one step, the paper's OBD); ``steps=None`` always takes one step,
    an int k > 1 takes k even geometric sub-steps. ``min_kept``: entries every masked parameter
    keeps (0 lets a layer lose every weight; a target that needs it raises EmptyLayerError).
    """
    return Pruner(
        OBD(curvature or GGNDiagonal(), weight_decay), _selector(scope, min_kept), steps=steps
    )


def magnitude(scope: str = "global", *, min_kept: int = 1) -> Pruner:
    """Magnitude pruning (OBD with H = I): one step (its ranking does not change as entries go)."""
    return Pruner(Magnitude(), _selector(scope, min_kept))


def random(seed: int = 0, scope: str = "global", *, min_kept: int = 1) -> Pruner:
    """Random deletion (a control)."""
    return Pruner(Random(seed), _selector(scope, min_kept))


def snip(batches: int | None = 1, scope: str = "global", *, min_kept: int = 1) -> Pruner:
    """SNIP connection sensitivity |w ∂E/∂w| (``batches=None``: all of the data), one step."""
    return Pruner(SNIP(batches), _selector(scope, min_kept))


def ocd(
    curvature: DiagonalCurvature | str | None = None,
    kinds: tuple[str, ...] = ("input",),
    method: str = "sum",
    scope: str = "global",
    *,
    steps: AdaptiveSteps | int | None = ADAPTIVE,
) -> CellPruner:
    """Optimal Cell Damage: remove whole cells (default: input variables) of lowest saliency.

    ``method="sum"``: a cell's saliency is the sum of the OBD saliencies of its fan-out weights
    (Cibas et al.); ``"gate"``: ½ sᵀGs (or ½ sᵀHs with ``curvature="hessian"``) for its fan-out
    weights s. ``sparsity`` counts cells (fraction or number); ``scope="layer"`` removes the same
    fraction of every layer's cells. See :class:`~optbrain.pruners.CellPruner`. ``steps``: as
    for :func:`obd`, counted in cells (default: adaptive sub-steps; ``None``: one step). The last
    cell of a layer (or the last input) is never removed (EmptyLayerError).
    """
    from ..saliency.ocd import OCD

    return CellPruner(OCD(curvature, kinds, method), scope=scope, steps=steps)


def obs(
    inverse=None,
    weight_decay: float = 0.0,
    ghost_rule: bool = False,
    *,
    steps: AdaptiveSteps | int | None = ADAPTIVE,
    safeguard: bool = True,
    min_kept: int = 1,
) -> OBSPruner:
    """Optimal Brain Surgeon: delete one weight at a time by L_q = w_q²/(2[H⁻¹]_qq), move all other
    weights (biases included) by the OBS update, re-rank. See :class:`~optbrain.pruners.OBSPruner`.

    Safeguarded by default: the update is kept only where it lowers the measured objective against
    plain zeroing (``safeguard``), and a large deletion is split into sub-steps with H⁻¹
    re-estimated where the measured increase departs from the prediction (``steps``).
    ``safeguard=False, steps=None, min_kept=0`` is the paper's procedure.
    """
    return OBSPruner(
        inverse,
        weight_decay=weight_decay,
        ghost_rule=ghost_rule,
        steps=steps,
        safeguard=safeguard,
        min_kept=min_kept,
    )


def unit_obs(
    inverse=None, *, steps: AdaptiveSteps | int | None = ADAPTIVE, safeguard: bool = True
) -> OBSPruner:
    """Unit-OBS: delete whole inputs / hidden units (all their outgoing weights) by group OBS.
    ``sparsity`` counts weights; ``pruner(problem, units=k)`` removes k cells (in one step).
    Safeguarded and sub-stepped like :func:`obs`."""
    return OBSPruner(inverse, groups="unit", steps=steps, safeguard=safeguard)


def layerwise_obs(**kwargs) -> LayerwiseOBS:
    """Layer-wise OBS (OBC's exact greedy solver for small layers, SparseGPT's blocked solver for
    large ones) on calibration inputs; ``kwargs`` go to :class:`~optbrain.pruners.LayerwiseOBS`
    (``method``, ``nm``, ``damping``, ``blocksize``, ``sequential``, ...); ``min_kept`` defaults
    to 1 here (no layer loses every weight)."""
    kwargs.setdefault("min_kept", 1)
    return LayerwiseOBS(**kwargs)


@dataclass(frozen=True)
class Method:
    """A named method: its factory, a one-line summary, what ``sparsity`` counts (``"weights"``
    or ``"cells"``), whether the factory takes a ``seed``, whether ``PruneInfo.predicted_increase``
    predicts the change of the objective E (``predicts_objective``; layer-wise OBS predicts layer
    reconstruction errors, magnitude and random predict nothing), whether it needs a
    ``validation`` set (validation-set OBD), and the options a whole-task run (``optbrain prune``,
    :func:`optbrain.prune`) passes on top of the factory's defaults."""

    name: str
    factory: Callable[..., Any]
    summary: str
    counts: str = "weights"
    seeded: bool = False
    predicts_objective: bool = False
    needs_validation: bool = False
    task_options: dict[str, Any] = field(default_factory=dict)
    needs_retraining: bool = False

    def make(self, seed: int = 0, *, task: bool = False, **options) -> Any:
        """A fresh pruner; ``task=True`` applies :attr:`task_options` first."""
        kwargs = dict(self.task_options) if task else {}
        kwargs.update(options)
        if self.seeded:
            kwargs.setdefault("seed", seed)
        return self.factory(**kwargs)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "obd",
            obd,
            "Optimal Brain Damage, s = ½hw² with the exact Gauss-Newton diagonal",
            predicts_objective=True,
        ),
        Method("magnitude", magnitude, "magnitude pruning, s = ½w² (OBD with H = I)"),
        Method("random", random, "random deletion (a control)", seeded=True, needs_retraining=True),
        Method(
            "snip",
            snip,
            "SNIP connection sensitivity |w dE/dw|",
            task_options={"batches": None},  # all of the training data, like OBD's curvature
            needs_retraining=True,
        ),
        Method(
            "ocd",
            ocd,
            "Optimal Cell Damage: whole input variables (sparsity = fraction of the inputs)",
            counts="cells",
            predicts_objective=True,
        ),
        Method(
            "obs",
            obs,
            "Optimal Brain Surgeon with weight compensation (dense inverse)",
            predicts_objective=True,
        ),
        Method(
            "unit_obs",
            unit_obs,
            "Unit-OBS: whole inputs and hidden units by group OBS",
            predicts_objective=True,
        ),
        Method(
            "layerwise_obs",
            layerwise_obs,
            "layer-wise OBS (OBC / SparseGPT) on calibration inputs, weights updated",
        ),
        Method(
            "gamma_obd",
            gamma_obd,
            "γOBD: the estimated change of the test error (Pedersen, Hansen & Larsen)",
        ),
        Method("gamma_obs", gamma_obs, "γOBS ranking (NNSYSID's weight-decay OBS saliency)"),
        Method(
            "esp",
            esp,
            "ESP: OBD plus the first-order term, for nets not at a minimum (Tresp et al.)",
            predicts_objective=True,
        ),
        Method("ebd", ebd, "Early Brain Damage: ESP plus ½g²/h (Tresp et al.)"),
        Method(
            "validation_obd",
            validation_obd,
            "validation-set OBD: the change of the validation error (Larsen et al.)",
            needs_validation=True,
        ),
    )
}

#: The methods measured best (docs/benchmarks.md, "One-shot pruning of every named method"): for
#: pruning without retraining and for pruning followed by retraining. ``method="auto"`` (the
#: default of :func:`optbrain.prune` and ``optbrain prune``) means one of them.
RECOMMENDED: dict[str, str] = {"one_shot": "layerwise_obs", "retrained": "obd"}


def recommended(retrain_epochs: int) -> str:
    """The method ``"auto"`` stands for: :data:`RECOMMENDED` one-shot when ``retrain_epochs`` is
    0, else the one measured best with retraining."""
    return RECOMMENDED["one_shot" if retrain_epochs == 0 else "retrained"]


PRESETS: dict[str, Callable[..., Any]] = {name: m.factory for name, m in METHODS.items()}
"""Name → factory (the table before :data:`METHODS` carried summaries)."""


def make(name: str, seed: int = 0, *, task: bool = False, **options) -> Any:
    """The pruner of the named method (see :data:`METHODS`); ``ValueError`` lists the names."""
    try:
        method = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None
    return method.make(seed, task=task, **options)
