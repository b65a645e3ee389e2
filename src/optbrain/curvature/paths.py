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

from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from ..problem import Problem
from .chain import Link, build_chain, shared_parameters
from .graph.reader import GraphReadError, ModelGraph, describe, read_graph
from .graph.sweep import lecun_blocker, probe

log = logging.getLogger(__name__)

COLUMN_MODES = ("ggn", "ef", "mc", "hessian")


@dataclass(frozen=True)
class Path:
    """The engine an estimator takes (``"chain"``, ``"graph"``, ``"generic"``) and why;
    ``"refused"`` where no engine can run the model (the estimator raises with the reason)."""

    engine: str
    reason: str
    chain: list[Link] | None = None
    graph: ModelGraph | None = None

    def __str__(self) -> str:
        return f"{self.engine}: {self.reason}"


_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_PLAIN = (bool, int, float, str, type(None))


def _signature(model: nn.Module) -> tuple:
    """What a cached graph depends on: the module tree, the parameter objects, the attached
    masks (their storage and in-place version: the graph holds their 0/1 multipliers) and every
    plain Python attribute of a module (a flag the ``forward`` branches on decides the trace)."""
    return (
        tuple((name, type(m), id(m)) for name, m in model.named_modules()),
        tuple(id(p) for p in model.parameters()),
        tuple(
            (id(mk), mk.data_ptr(), mk._version)
            for m in model.modules()
            if hasattr(m, "parametrizations")
            for plist in m.parametrizations.values()
            for mk in (getattr(p, "mask", None) for p in plist)
            if isinstance(mk, Tensor)
        ),
        tuple(
            (k, v)
            for m in model.modules()
            for k, v in vars(m).items()
            if isinstance(v, _PLAIN) and not k.startswith("_") and k != "training"
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
        path = _chain_path(chain, mode)
        if path is not None:
            return path
    return _graph_path(problem, mode)


def _chain_path(chain: list[Link], mode: str) -> Path | None:
    """The chain engine, the generic one with the reason, or None (the graph engine decides)."""
    refused = _refusal(((lk.prefix, lk.module, lk.rule) for lk in chain), mode)
    if refused:
        return Path("generic", refused)
    curved = _mixing_layers(chain) if mode in ("lecun", "hessian") else []
    if mode == "hessian" and curved:
        return Path(
            "generic",
            f"the exact Hessian diagonal through {', '.join(curved)} needs its second "
            "derivatives, which the chain engine's sweep does not carry",
        )
    if curved:
        return None
    if not shared_parameters(chain) or mode not in COLUMN_MODES:
        return Path("chain", "an nn.Sequential chain of registry layers", chain=chain)
    return Path(
        "generic",
        "tied parameters (one parameter used by several layers): their per-sample gradients "
        "need the cross terms between the uses",
    )


def _graph_path(problem: Problem, mode: str) -> Path:
    try:
        graph = graph_of(problem.model)
    except GraphReadError as exc:
        return Path("generic" if exc.generic_ok else "refused", exc.reason)
    refused = _refusal(((gn.name, gn.module, gn.rule) for gn in graph.leaves()), mode)
    if refused is None and mode.startswith("lecun"):
        refused = lecun_blocker(graph, problem.parameters())
    if refused:
        return Path("generic", refused)
    if mode == "hessian" and not _hessian_ready(graph):
        return Path(
            "generic",
            "the exact Hessian diagonal through a graph needs the second derivatives of every "
            "non-linear function; the graph engine has none (only the chain engine has them, "
            "for chains)",
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
    try:
        probe(problem, graph)
    except GraphReadError as exc:
        return Path("generic" if exc.generic_ok else "refused", exc.reason)
    return Path("graph", f"torch.fx graph ({describe(graph)})", graph=graph)


def _refusal(layers, mode: str) -> str | None:
    """The first layer (name, module, rule) whose rule refuses its configuration, as a reason."""
    for name, module, rule in layers:
        reason = rule.refusal(module, mode) if rule is not None else None
        if reason is not None:
            return f"{name or type(module).__name__}: {reason}"
    return None


def _mixing_layers(chain: list[Link] | None) -> list[str]:
    """Layers of the chain whose second derivatives mix their inputs (LayerNorm)."""
    return sorted({type(lk.module).__name__ for lk in chain or [] if lk.rule.mixes_curvature})


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
