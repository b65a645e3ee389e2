"""Which engine an estimator takes on a model, and why.

Three engines compute the same quantities:

* ``chain`` — the structured back-propagation over an ``nn.Sequential`` of registry layers
  (:mod:`.backprop`, the most optimised);
* ``graph`` — the same sweep over any module torch.fx can trace with registry layers as leaves
  (:mod:`.graph`: residual additions, concatenations, custom ``forward`` functions, attention);
* ``generic`` — ``torch.func`` per-sample Jacobian products or Hessian-vector products: any
  differentiable module, exact, but up to hundreds of times slower.

:func:`choose` picks the first that applies and returns a :class:`Path` saying which and why;
:func:`explain` does it for every estimator, so a user can ask before a long run (``optbrain
curvature`` and ``optbrain prune`` print it). A fall-back is logged, never silent.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

from torch import nn

from ..errors import UnsupportedModuleError
from ..problem import Problem
from .chain import Link, build_chain, shared_parameters
from .graph.reader import GraphReadError, ModelGraph, describe, read_graph

log = logging.getLogger(__name__)

COLUMN_MODES = ("ggn", "ef", "mc", "hessian")


@dataclass(frozen=True)
class Path:
    """The engine an estimator takes (``"chain"``, ``"graph"``, ``"generic"``) and why."""

    engine: str
    reason: str
    chain: list[Link] | None = None
    graph: ModelGraph | None = None

    def __str__(self) -> str:
        return f"{self.engine}: {self.reason}"


_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _signature(model: nn.Module) -> tuple:
    """What a cached graph depends on: the module tree and the parameter objects."""
    return (
        tuple((name, type(m), id(m)) for name, m in model.named_modules()),
        tuple(id(p) for p in model.parameters()),
        tuple(
            id(getattr(m, "parametrizations", None))
            for m in model.modules()
            if hasattr(m, "parametrizations")
        ),
    )


def graph_of(model: nn.Module) -> ModelGraph:
    """The model's graph (traced once per model structure; GraphReadError if it cannot be)."""
    sig = _signature(model)
    hit = _GRAPHS.get(model)
    if hit is not None and hit[0] == sig:
        if isinstance(hit[1], GraphReadError):
            raise hit[1]
        return hit[1]
    try:
        graph = read_graph(model)
    except GraphReadError as exc:
        _GRAPHS[model] = (sig, exc)
        raise
    _GRAPHS[model] = (sig, graph)
    return graph


def choose(problem: Problem, estimator: str, mode: str) -> Path:
    """The engine for ``mode`` (a sweep mode of :mod:`.backprop`) on the problem's model."""
    model = problem.model
    try:
        chain = build_chain(model, estimator)
    except UnsupportedModuleError:
        chain = None
    if chain is not None:
        shared = shared_parameters(chain)
        if not shared or mode not in COLUMN_MODES:
            return Path("chain", "an nn.Sequential chain of registry layers", chain=chain)
        return Path(
            "generic",
            "tied parameters (one parameter used by several layers): their per-sample gradients "
            "need the cross terms between the uses",
        )
    try:
        graph = graph_of(model)
    except GraphReadError as exc:
        return Path("generic", exc.reason)
    if mode == "hessian" and not _hessian_ready(graph):
        return Path(
            "generic",
            "the exact Hessian diagonal through a graph needs the second derivatives of every "
            "non-linear function; the graph engine has them only for chains",
        )
    if mode in COLUMN_MODES:
        tied = [k for k, v in graph.parameter_uses().items() if v > 1]
        if tied:
            names = sorted({b[0] for n in graph.nodes for b in _bindings(n) if id(b[1]) in tied})
            return Path(
                "generic",
                f"tied parameters {names}: their per-sample gradients need the cross terms "
                "between the uses",
            )
    return Path("graph", f"torch.fx graph ({describe(graph)})", graph=graph)


def _bindings(n):
    return list(n.params.values()) + ([n.param] if n.param else [])


def _hessian_ready(graph: ModelGraph) -> bool:
    return False


def explain(problem: Problem) -> dict[str, Path]:
    """For every estimator of :data:`optbrain.curvature.ESTIMATORS`: the engine it takes on the
    problem's model and why, e.g. ``{"ggn": Path("graph", "torch.fx graph (Linear×3, add×2)")}``."""
    from . import ESTIMATORS

    out = {}
    for key, cls in ESTIMATORS.items():
        out[key] = cls().path(problem)
    return out


def estimator_in(obj, depth: int = 3):
    """The curvature estimator a pruner or saliency uses (an object with ``path`` and
    ``diagonal``), found through its ``saliency``/``curvature``/``estimator`` attributes; None for
    methods without one (magnitude, random, layer-wise OBS)."""
    if obj is None or depth < 0:
        return None
    if callable(getattr(obj, "path", None)) and callable(getattr(obj, "diagonal", None)):
        return obj
    for attr in ("saliency", "curvature", "estimator"):
        found = estimator_in(getattr(obj, attr, None), depth - 1)
        if found is not None:
            return found
    return None


def engine_of(obj, problem: Problem) -> Path | None:
    """The engine the curvature estimator inside ``obj`` (a pruner, a saliency or an estimator)
    takes on ``problem``'s model, or None when ``obj`` uses no curvature diagonal."""
    est = estimator_in(obj)
    return None if est is None else est.path(problem)
