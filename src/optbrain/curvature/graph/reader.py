"""Reading any ``nn.Module`` as a graph of registry layers and glue functions (torch.fx).

The model is traced symbolically (in eval mode) with every module that has a registry rule as a
leaf: its ``forward`` is not traced into, the rule knows it. Custom modules and parameter-free
``torch.nn`` modules without a rule are traced through, so what their ``forward`` calls becomes
glue (:mod:`.glue`). A leaf whose rule offers ``decompose(module)`` is replaced by the traced
decomposition (an equivalent module of functional calls on the same parameters, e.g. multi-head
attention).

The result, :class:`ModelGraph`, lists the nodes in forward order with what each is:

* ``input`` — the model input (the first ``placeholder``; the model must take one tensor);
* ``leaf`` — a registry layer, with its parameters (clean names, the parameter, the 0/1 multiplier
  of an attached optbrain mask);
* ``glue`` — a function or method call (:class:`.glue.Glue`);
* ``param`` — a parameter read by a ``forward`` (``get_attr``), e.g. a positional embedding;
* ``const`` — a buffer or constant read by a ``forward``;
* ``output``.

Anything the reader cannot follow raises :class:`GraphReadError`, which names the node: the
estimators then fall back to their ``torch.func`` path and log why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ...errors import UnsupportedModuleError
from ...masking import masked_parameter
from ...paramdict import clean_name
from ...problem import eval_mode
from ..rules import GENERIC_ESTIMATORS, Rule
from ..rules.base import registered_rule
from . import glue as G

log = logging.getLogger(__name__)


class GraphReadError(UnsupportedModuleError):
    """The graph reader cannot follow a model; ``node`` names the place (or is None).
    ``generic_ok`` is False where the generic engine cannot run the model either (packed
    sequences): then no estimator can, and they refuse with this reason."""

    def __init__(self, message: str, node: str | None = None, *, generic_ok: bool = True):
        where = f" at {node!r}" if node else ""
        advice = f"; use one of {', '.join(GENERIC_ESTIMATORS)}" if generic_ok else ""
        super().__init__(
            f"the structured graph engine cannot read this model{where}: {message}{advice}"
        )
        self.node = node
        self.reason = message
        self.generic_ok = generic_ok


#: functions whose output no engine can differentiate per sample (torch.func cannot batch them)
_PACKING = ("pack_padded_sequence", "pack_sequence", "pack_padded", "_pack_padded_sequence")


ParamBinding = tuple[str, Tensor, "Tensor | None"]  # clean name, parameter, mask multiplier


@dataclass
class GNode:
    """One node of the graph (see the module docstring for ``kind``)."""

    node: fx.Node
    kind: str
    module: nn.Module | None = None
    rule: Rule | None = None
    glue: G.Glue | None = None
    params: dict[str, ParamBinding] = field(default_factory=dict)
    param: ParamBinding | None = None
    value: Any = None  # const nodes: the buffer or constant

    @property
    def name(self) -> str:
        return self.node.name


@dataclass
class ModelGraph:
    """A traced model: ``nodes`` in forward order, keyed ``by_name``; ``chain`` when every node
    between input and output is a single-input leaf applied to the previous one."""

    module: fx.GraphModule
    nodes: list[GNode]
    by_name: dict[str, GNode]

    def leaves(self) -> list[GNode]:
        return [n for n in self.nodes if n.kind == "leaf"]

    def parameter_uses(self) -> dict[int, int]:
        """id(parameter) → number of places that read it (leaves and ``get_attr`` nodes; slices
        of one ``get_attr`` are checked for overlap by the sweep)."""
        uses: dict[int, int] = {}
        for n in self.nodes:
            bound = list(n.params.values()) + ([n.param] if n.param else [])
            for _, p, _ in bound:
                uses[id(p)] = uses.get(id(p), 0) + 1
        return uses

    def is_chain(self) -> bool:
        """Input → single-input leaves, each reading the previous node → output."""
        body = [n for n in self.nodes if n.kind not in ("input", "output")]
        prev = next(n for n in self.nodes if n.kind == "input").node
        for n in body:
            if (
                n.kind != "leaf"
                or n.node.args != (prev,)
                or n.node.kwargs
                or len(n.node.users) != 1
            ):
                return False
            prev = n.node
        out = next(n for n in self.nodes if n.kind == "output").node
        return out.args == (prev,)


class _Tracer(fx.Tracer):
    """Registry layers are leaves; everything else is traced through (decomposable leaves are
    replaced by their decomposition). ``extra_leaves``: module types kept as leaves although
    they have no rule (a reader other than the curvature engine knows them)."""

    def __init__(self, extra_leaves: tuple[type, ...] = ()):
        super().__init__()
        self.extra_leaves = extra_leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Sequential, parametrize.ParametrizationList)):
            return False  # trace into: a masked parameter read by a forward is where(mask, w, 0)
        if self.extra_leaves and isinstance(m, self.extra_leaves):
            return True
        rule = registered_rule(m)
        if rule is not None:
            return getattr(rule, "decompose", None) is None
        if type(m).__module__.startswith("torch.nn") and not any(
            True for _ in m.parameters(recurse=False)
        ):
            return False  # e.g. nn.Softmax: trace into its functional call
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        rule = registered_rule(m)
        decompose = getattr(rule, "decompose", None) if rule is not None else None
        if decompose is not None:
            return decompose(m).forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)


def _param_of(m: nn.Module, attr: str) -> tuple[Tensor, Tensor | None] | None:
    """The stored parameter ``attr`` of ``m`` (dotted paths reach submodules) and the 0/1
    multiplier of an attached optbrain mask, or None if the attribute is None."""
    *path, last = attr.split(".")
    for part in path:
        m = getattr(m, part)
    try:
        return masked_parameter(m, last)
    except ValueError as exc:
        raise GraphReadError(
            f"{type(m).__name__}.{last} has a parametrization that is not an optbrain mask"
        ) from exc


def _trace(model: nn.Module, extra_leaves: tuple[type, ...] = ()) -> fx.GraphModule:
    tracer = _Tracer(extra_leaves)
    try:
        with eval_mode(model):
            graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: fall back, and say why
        if _packs(exc):
            raise GraphReadError(
                "its forward packs sequences (torch.nn.utils.rnn.pack_padded_sequence): no "
                "engine differentiates packed sequences per sample; pass padded batches instead "
                "(equal lengths, or a loss that ignores the padded steps)",
                generic_ok=False,
            ) from exc
        raise GraphReadError(f"torch.fx cannot trace it ({type(exc).__name__}: {exc})") from exc
    return fx.GraphModule(tracer.root, graph)


def _packs(exc: BaseException) -> bool:
    """Whether the traceback of a tracing failure passes through sequence packing."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in _PACKING:
            return True
        tb = tb.tb_next
    return False


def read_graph(model: nn.Module, extra_leaves: tuple[type, ...] = ()) -> ModelGraph:
    """Trace ``model`` and classify its nodes (see the module docstring).

    ``extra_leaves``: module types read as leaves although they have no rule (their ``rule`` is
    None and ``params`` binds all their parameters); readers other than the curvature engine
    (:mod:`optbrain.cellgraph`) use it for layers they know, e.g. ``nn.Conv3d``. The curvature
    engine never passes it."""
    gm = _trace(model, extra_leaves)
    raw_to_clean = {raw: clean_name(raw) for raw, _ in model.named_parameters()}
    first_name: dict[int, str] = {}
    for raw, p in model.named_parameters(remove_duplicate=False):
        first_name.setdefault(id(p), clean_name(raw))
    nodes: list[GNode] = []
    inputs = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            inputs += 1
            if inputs > 1 and not node.args:  # a second argument without a default
                raise GraphReadError("the model's forward takes more than one input", node.name)
            nodes.append(GNode(node, "input" if inputs == 1 else "const", value=None))
        elif node.op == "output":
            nodes.append(GNode(node, "output"))
        elif node.op == "call_module":
            nodes.append(_leaf(gm, node, first_name, extra_leaves))
        elif node.op == "get_attr":
            nodes.append(_attr(gm, node, first_name, raw_to_clean))
        else:
            g = G.glue_for(node.op, node.target) or G.opaque(node.op, node.target)
            nodes.append(GNode(node, "glue", glue=g))
    if inputs == 0:
        raise GraphReadError("the model's forward takes no input")
    return ModelGraph(gm, nodes, {n.name: n for n in nodes})


def _leaf(
    gm: fx.GraphModule, node: fx.Node, first_name: dict[int, str], extra: tuple[type, ...] = ()
) -> GNode:
    m = gm.get_submodule(node.target)
    rule = registered_rule(m)
    if rule is None and extra and isinstance(m, extra):
        params = {
            clean_name(attr): (first_name.get(id(p), f"{node.target}.{attr}"), p, None)
            for attr, p in m.named_parameters()
        }
        return GNode(node, "leaf", module=m, rule=None, params=params)
    if rule is None:
        raise GraphReadError(
            f"module type {type(m).__name__} has no rule (register one with "
            "optbrain.curvature.register)",
            node.name,
        )
    params: dict[str, ParamBinding] = {}
    for attr in rule.param_names(m):
        got = _param_of(m, attr)
        if got is None:
            continue
        p, mult = got
        params[attr] = (first_name.get(id(p), f"{node.target}.{attr}"), p, mult)
    stray = _stray_parameters(m, rule, params)
    if stray:
        raise GraphReadError(
            f"{type(m).__name__} holds parameters its rule does not cover: {stray}", node.name
        )
    return GNode(node, "leaf", module=m, rule=rule, params=params)


def _stray_parameters(m: nn.Module, rule: Rule, params: dict[str, ParamBinding]) -> list[str]:
    covered = {id(p) for _, p, _ in params.values()}
    return [n for n, p in m.named_parameters() if p.requires_grad and id(p) not in covered]


def _attr(gm, node: fx.Node, first_name: dict[int, str], raw_to_clean: dict[str, str]) -> GNode:
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part)
    if isinstance(value, nn.Parameter):
        name = first_name.get(id(value), raw_to_clean.get(node.target, node.target))
        return GNode(node, "param", param=(name, value, None))
    return GNode(node, "const", value=value)


def trainable_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


def describe(graph: ModelGraph) -> str:
    """A one-line summary: leaves by type, glue functions by name."""
    counts: dict[str, int] = {}
    for n in graph.nodes:
        key = (
            type(n.module).__name__
            if n.kind == "leaf"
            else n.glue.name
            if n.kind == "glue" and n.glue is not None
            else None
        )
        if key:
            counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k}×{v}" for k, v in sorted(counts.items()))


_ = torch  # keep the import for type checkers of Tensor subclasses
