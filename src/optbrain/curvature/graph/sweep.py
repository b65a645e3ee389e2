"""The structured second-order back-propagation over a graph (:mod:`.reader`).

Per chunk of samples the graph is run forward (every node's value kept until the backward sweep
has passed the node), then swept from the loss backwards in reverse topological order. Each node
receives the curvature of the objective with respect to its value from its users and hands its
inputs theirs:

* ``lecun`` / ``lecun_gn``: a diagonal d (and, in the full variant, the gradient g). At a node
  used by several others the users' diagonals **add** — LeCun, Denker & Solla's diagonal
  approximation, the same that makes a shared weight's second derivative the sum over its
  connections. Leaves step with their rule (:meth:`~optbrain.curvature.rules.Rule.lecun`), glue
  with :meth:`.glue.Glue.sq_vjp`; a parameter read by a ``forward`` gets the sum over its uses.
* ``ggn`` / ``ef`` / ``mc``: signed columns S (K × value) with H = Σ_k σ_k S_k S_kᵀ per sample: the
  loss Hessian's square root, the gradient, or sampled columns. Columns are cotangents, so at a
  fan-out they add column by column and glue passes them by its exact vector-Jacobian product;
  the result is exact on any graph. A leaf's parameter terms Σ_k σ (per-sample gradient)² come
  from its rule (:meth:`~optbrain.curvature.rules.Rule.sq_grads`) on the sample-major layout of
  its input.

Values that do not depend on the input (``static``: parameters read by the forward and what is
computed from them alone, e.g. a slice of attention's packed projection) are swept too: LeCun
treats them like any node (their diagonal sums over samples: the shared-weight rule); the column
modes square per-sample gradients where such a value meets the sample data (``F.linear``, ``x +
p``, ``x * p``, ``x @ p``) and hand the squares back along the static path, which must select
entries without repeating them (slices, views, transposes, a mask's ``where``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor, nn
from torch.fx.node import map_arg

from ...errors import NonFiniteLossError
from ...paramdict import ParamDict
from ...problem import Problem, eval_mode
from .. import losses
from .._checks import all_finite
from ..budget import samples_per_sweep, split
from ..rules import LinearRule
from . import glue as G
from .reader import GNode, GraphReadError, ModelGraph

log = logging.getLogger(__name__)

MODES = ("lecun", "lecun_gn", "ggn", "ef", "mc")
_LINEAR = LinearRule()
#: static-path functions whose vector-Jacobian product moves squared per-sample gradients back
#: exactly (each output entry is one input entry, none repeated)
_SELECTING = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "contiguous", "squeeze",
    "unsqueeze", "t", "movedim", "swapaxes", "getitem", "select", "narrow", "split", "chunk",
    "unbind", "tensor_split", "clone", "where", "to", "float", "double", "type_as", "neg",
}  # fmt: skip


@dataclass
class Layout:
    """Where the samples are in a value: dimension ``dim`` holds N·``mult`` entries, sample-major
    (sample n owns entries n·mult … n·mult + mult − 1)."""

    dim: int
    mult: int = 1


# ============================================================================ analysis
class _Plan:
    """What the sweep needs to know about a graph for one input shape: static nodes, which nodes
    lead to a wanted parameter, the sample layout of every value, the per-sample width."""

    def __init__(
        self, graph: ModelGraph, wanted: dict[str, Tensor], x: Tensor, model: nn.Module | None
    ):
        self.graph = graph
        self.static = _static_nodes(graph)
        wanted_ids = {id(p) for p in wanted.values()}
        self.wanted_ids = wanted_ids
        self.leads = _leads_to_wanted(graph, wanted_ids)
        self.layouts, self.width, self.out_width, self.kept, self.scratch = _layouts(
            graph, x, model
        )


def _plan(
    graph: ModelGraph, wanted: dict[str, Tensor], x: Tensor, model: nn.Module | None = None
) -> _Plan:
    """The plan for this graph, parameters and input shape (kept on the graph: the probe runs
    once per input shape, not once per call)."""
    key = (tuple(x.shape[1:]), x.dtype, x.device, tuple(sorted(id(p) for p in wanted.values())))
    cache = graph.__dict__.setdefault("_plans", {})
    if key not in cache:
        if len(cache) > 8:
            cache.clear()
        cache[key] = _Plan(graph, wanted, x, model)
    return cache[key]


def _inputs(gn: GNode) -> list:
    return [n for n in gn.node.all_input_nodes]


def _static_nodes(graph: ModelGraph) -> set[str]:
    dynamic: set[str] = set()
    for gn in graph.nodes:
        if gn.kind == "input" or any(n.name in dynamic for n in _inputs(gn)):
            dynamic.add(gn.name)
    return {gn.name for gn in graph.nodes if gn.name not in dynamic}


def _leads_to_wanted(graph: ModelGraph, wanted_ids: set[int]) -> set[str]:
    """Nodes at or downstream of a wanted parameter: the sweep goes no further up than them."""
    out: set[str] = set()
    for gn in graph.nodes:
        if gn.glue is not None and gn.glue.name in G.CONSTANT:
            continue
        own = [p for _, p, _ in gn.params.values()] + ([gn.param[1]] if gn.param else [])
        if any(id(p) in wanted_ids for p in own) or any(n.name in out for n in _inputs(gn)):
            out.add(gn.name)
    return out


def lecun_blocker(graph: ModelGraph, wanted: dict[str, Tensor]) -> str | None:
    """Why LeCun's recursion cannot run on the graph for these parameters — a function it has
    no rule for between a wanted parameter and the output — or None (read before any work)."""
    leads = _leads_to_wanted(graph, {id(p) for p in wanted.values()})
    for gn in graph.nodes:
        if gn.glue is None or gn.glue.name in G.CONSTANT:
            continue
        led = [getattr(a, "name", None) in leads for a in gn.node.args]
        if gn.glue.kind == "opaque" and any(led):
            return (
                f"LeCun's recursion has no rule for {gn.glue.name!r} at {gn.name!r} (the other "
                "estimators handle it)"
            )
        if getattr(gn.glue, "divide", False) and len(led) > 1 and led[1]:
            return (
                f"LeCun's recursion has no rule for a division by a value that depends on the "
                f"parameters, at {gn.name!r} (the other estimators handle it)"
            )
    return None


def _forward(graph: ModelGraph, x: Tensor) -> dict[str, object]:
    """Every node's value for input ``x`` (no autograd)."""
    env: dict[str, object] = {}

    def value(n):
        return env[n.name]

    for gn in graph.nodes:
        node = gn.node
        if gn.kind == "input":
            env[gn.name] = x
        elif gn.kind == "const":
            env[gn.name] = (
                gn.value if node.op == "get_attr" else (node.args[0] if node.args else None)
            )
        elif gn.kind == "param":
            env[gn.name] = gn.param[1].detach()
        elif gn.kind == "output":
            env[gn.name] = map_arg(node.args[0], value)
        else:
            args = map_arg(node.args, value)
            kwargs = map_arg(node.kwargs, value)
            if gn.kind == "leaf" and getattr(gn.rule, "composite", False):
                env[gn.name], env[gn.name + "#ctx"] = gn.rule.forward_ctx(gn.module, args, kwargs)
            elif gn.kind == "leaf":
                env[gn.name] = gn.rule.graph_forward(gn.module, args, kwargs)
            else:
                env[gn.name] = gn.glue.call(args, kwargs)
    return env


def _layouts(
    graph: ModelGraph, x: Tensor, model: nn.Module | None = None
) -> tuple[dict[str, Layout], int, int]:
    """The sample layout of every tensor value, from two probe runs (one and two samples), the
    largest per-sample number of entries and the output's. A value whose samples are not
    separable (mixed with each other, interleaved, or along several dimensions) raises
    GraphReadError, and so does a graph whose output differs from ``model``'s own (a forward
    that branched on types or values while it was traced)."""
    x1 = x[:1]
    x2 = torch.cat([x1, x[1:2] if x.shape[0] > 1 else _another_sample(x1)])
    with torch.no_grad(), eval_mode(graph.module):
        e1, e2 = _forward(graph, x1), _forward(graph, x2)
    if model is not None:
        _check_faithful(model, x2, e2[_output(graph).name])
    out: dict[str, Layout] = {}
    width, kept, scratch = 1, 0, 0
    for gn in graph.nodes:
        v1, v2 = e1.get(gn.name), e2.get(gn.name)
        if gn.kind == "output" or not isinstance(v1, Tensor):
            continue
        diff = [i for i, (a, b) in enumerate(zip(v1.shape, v2.shape)) if a != b]
        if v1.dim() != v2.dim() or len(diff) > 1:
            raise GraphReadError(
                "a value's shape changes with the batch size in several ways", gn.name
            )
        if not diff:
            continue
        d = diff[0]
        mult = v1.shape[d]
        if v2.shape[d] != 2 * mult:
            raise GraphReadError("a value's size is not proportional to the batch size", gn.name)
        if v1.is_floating_point() and not _close(v2.narrow(d, 0, mult), v1):
            _not_separable(graph, e1, e2, gn.name)
        out[gn.name] = Layout(d, mult)
        width, kept = max(width, v1.numel()), kept + v1.numel()
    for gn in graph.leaves():  # per-sample gradients a rule holds (recurrent weights, kernels)
        arg = gn.node.args[0] if gn.node.args else None
        x = e1.get(arg.name) if hasattr(arg, "name") else None
        if isinstance(x, Tensor):
            width = max(width, gn.rule.column_cost(gn.module, x))
            scratch = max(scratch, gn.rule.scratch_cost(gn.module, x))
    result = _output(graph).name
    out_width = e1[result].numel() if isinstance(e1.get(result), Tensor) else 1
    return out, width, out_width, kept, scratch


def _another_sample(x1: Tensor) -> Tensor:
    """A second probe sample when the data give only one: the entries of ``x1`` rotated (the
    same kind of values, in other places), or shifted where that changes nothing."""
    other = x1.flatten(1).roll(1, 1).view_as(x1)
    if torch.equal(other, x1) and x1.is_floating_point():
        other = x1 * 0.5 + 0.25
    return other


def _close(a: Tensor, b: Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (1 + float(b.abs().max())))


def _not_separable(graph: ModelGraph, e1: dict, e2: dict, name: str) -> None:
    """Raise for a value whose first sample changes when a second sample joins the batch:
    refused by every engine when the model's output does too (no per-sample curvature
    exists), else left to the generic engine (a layout only this engine cannot follow)."""
    out = _output(graph).name
    o1, o2 = e1.get(out), e2.get(out)
    mixes = isinstance(o1, Tensor) and o1.is_floating_point() and not _close(o2[:1], o1)
    if mixes:
        raise GraphReadError(
            "the model's output for one sample depends on the other samples of the batch (e.g. "
            "a mean or a normalisation over the batch): a per-sample curvature does not exist",
            name,
            generic_ok=False,
        )
    raise GraphReadError(
        "samples are not independent or not sample-major in this value (e.g. a reshape "
        "merging time-major positions with samples)",
        name,
    )


def _check_faithful(model: nn.Module, x: Tensor, traced) -> None:
    """The traced graph computes the model's output (tracing fixes every Python-level decision
    of the forward: ``isinstance(out, tuple)`` on a layer's output, a branch on a flag read from
    a value, ...)."""
    with torch.no_grad(), eval_mode(model):
        own = model(x)
    same = (
        isinstance(own, Tensor)
        and isinstance(traced, Tensor)
        and own.shape == traced.shape
        and torch.allclose(own, traced, rtol=1e-4, atol=1e-6 * (1 + float(own.abs().max())))
    )
    if not same:
        raise GraphReadError(
            "the traced graph does not compute the model's output (the forward decides "
            "something at trace time, e.g. isinstance(layer_output, tuple) or a branch on a "
            "flag, that differs when it runs)"
        )


# ============================================================================ canonical layouts
def canon(t: Tensor, lay: Layout, lead: int = 0) -> Tensor:
    """``t`` (``lead`` leading axes, then a value of layout ``lay``) with the samples on axis
    ``lead`` and, for ``mult`` > 1, each sample's entries on axis ``lead + 1``."""
    t = t.movedim(lead + lay.dim, lead)
    if lay.mult > 1:
        t = t.unflatten(lead, (-1, lay.mult))
    return t


# ============================================================================ the sweep
def probe(problem: Problem, graph: ModelGraph) -> None:
    """Read the sample layout of every value on the problem's first batch (and check that the
    graph computes the model's output) before any work: GraphReadError where the sweep cannot
    follow it. The plan is kept, so the run that follows does not repeat it, and a graph probed
    once for these parameters is not probed again (no batch is drawn: a later input shape is
    checked when the run plans for it)."""
    wanted = problem.parameters()
    probed = graph.__dict__.setdefault("_probed", set())
    key = tuple(sorted(id(p) for p in wanted.values()))
    if key in probed:
        return
    x = next(iter(problem.batches()), (None,))[0]
    if not isinstance(x, Tensor) or x.shape[0] == 0:
        return
    with torch.no_grad(), eval_mode(problem.model):
        _plan(graph, wanted, x, problem.model)
    probed.add(key)


def run(
    problem: Problem,
    graph: ModelGraph,
    mode: str,
    *,
    estimator: str,
    wanted: dict[str, Tensor],
    samples: int = 1,
    generator: torch.Generator | None = None,
    tick: Callable[[int, int], None] | None = None,
) -> ParamDict:
    """Accumulate the parameter diagonal of ``mode`` over the problem's data."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    problem.prepare()
    acc: dict[int, Tensor] = {}
    done = 0
    plan: _Plan | None = None
    chunk: int | None = None
    with problem.together(f"{estimator}: the curvature sweep"), torch.no_grad():
        with eval_mode(problem.model):
            for x, y in problem.batches():
                if plan is None:
                    plan = _plan(graph, wanted, x, problem.model)
                    if not mode.startswith("lecun"):
                        k = {"ef": 1, "mc": samples}.get(mode, plan.out_width)
                        chunk = samples_per_sweep(
                            k, plan.width, plan.kept, x.shape[0], plan.scratch
                        )
                for xc, yc in split(x, y, chunk):
                    env = _forward(graph, xc)
                    out = env[_output(graph).name]
                    if not isinstance(out, Tensor):
                        raise GraphReadError("the model output is not one tensor")
                    if not all_finite([out]):
                        raise NonFiniteLossError(
                            f"{estimator}: the model output contains NaN or inf"
                        )
                    _one(problem, plan, env, yc, mode, acc, samples, generator)
                    del env
                done += x.shape[0]
                if tick is not None:
                    tick(done, problem.progress_total())
    problem.progress_done(tick, done)
    out: ParamDict = {}
    for name, p in wanted.items():
        v = acc.get(id(p))
        out[name] = torch.zeros_like(p) if v is None else v
    problem.all_reduce_(out)  # sums over the samples of every rank
    n_total = problem.counted(done)
    return {name: v / n_total for name, v in out.items()}


def _output(graph: ModelGraph) -> GNode:
    out = next(n for n in graph.nodes if n.kind == "output")
    arg = out.node.args[0]
    if not hasattr(arg, "name"):
        raise GraphReadError("the model output is not one tensor")
    return graph.by_name[arg.name]


def _one(problem, plan, env, y, mode, acc, samples, generator) -> None:
    graph = plan.graph
    out_node = _output(graph)
    out = env[out_node.name]
    lay = plan.layouts.get(out_node.name)
    if lay is None or lay.dim != 0 or lay.mult != 1:
        raise GraphReadError("the model output does not have the samples on its first axis")
    if mode.startswith("lecun"):
        d = losses.hessian_diagonal(problem, out, y)  # the objective's 1/N: applied at the end
        g = losses.output_grads(problem, out, y) if mode == "lecun" else None
        _LeCunSweep(plan, env, acc).run(out_node, d, g)
        return
    if mode == "ggn":
        cols, sign = losses.hessian_factor(problem, out, y)
    elif mode == "ef":
        cols, sign = losses.output_grads(problem, out, y)[None], None
    else:
        cols, sign = losses.mc_factor(problem, out, y, samples, generator), None
    _ColumnSweep(plan, env, acc, sign).run(out_node, cols)


# ---------------------------------------------------------------------------- helpers
def _slots(plan: _Plan, gn: GNode, args: tuple) -> tuple[list[int], list[int], list]:
    """Positions of the flattened-argument tensors that lead to a wanted parameter, split into
    sample-dependent ones and static ones, and the fx nodes at those positions."""
    nodes = list(gn.node.args)
    dyn, stat = [], []
    for i, a in enumerate(nodes):
        if hasattr(a, "name") and a.name in plan.leads and isinstance(args[i], Tensor):
            (stat if a.name in plan.static else dyn).append(i)
    return dyn, stat, nodes


def _accumulate(acc: dict[int, Tensor], binding, value: Tensor) -> None:
    _, p, mult = binding
    if mult is not None:
        value = value * mult
    key = id(p)
    if key in acc:
        acc[key] += value
    else:
        acc[key] = value.to(p.dtype) if value.dtype != p.dtype else value


def _check_args(gn: GNode) -> None:
    """Only positional node arguments carry tensors the sweep follows (keywords: constants)."""
    for v in gn.node.kwargs.values():
        if hasattr(v, "name") or (
            isinstance(v, (list, tuple)) and any(hasattr(a, "name") for a in v)
        ):
            raise GraphReadError("a tensor passed by keyword", gn.name)


def _list_arg(gn: GNode) -> bool:
    """cat/stack take their tensors as one list argument."""
    return bool(gn.node.args) and isinstance(gn.node.args[0], (list, tuple))


class _Sweep:
    """What both sweeps share: the reverse walk and the hand-over of states to inputs."""

    def __init__(self, plan: _Plan, env: dict, acc: dict[int, Tensor]):
        self.plan, self.env, self.acc = plan, env, acc
        self.state: dict[str, object] = {}

    def run(self, out_node: GNode, *init) -> None:
        self.seed(out_node, *init)
        for gn in reversed(self.plan.graph.nodes):
            if gn.name not in self.state or gn.kind in ("output", "input", "const"):
                continue
            st = self.state.pop(gn.name)
            if gn.kind == "param":
                self.param(gn, st)
            elif gn.kind == "leaf":
                self.leaf(gn, st)
            else:
                self.glue(gn, st)
            self.env.pop(gn.name, None)
            self.env.pop(gn.name + "#ctx", None)

    def args_of(self, gn: GNode) -> tuple[tuple, dict]:
        def value(n):
            return self.env[n.name]

        return map_arg(gn.node.args, value), map_arg(gn.node.kwargs, value)

    def give(self, node, value) -> None:
        """Add a state to fx node ``node``."""
        raise NotImplementedError

    def merge(self, a, b):
        """The sum of two states of one value."""
        raise NotImplementedError

    def give_part(self, node, index: int, value) -> None:
        """A state for element ``index`` of a tuple-valued node (what ``getitem`` users hand)."""
        if node.name not in self.plan.leads or value is None:
            return
        parts = self.state.setdefault(node.name, {})
        parts[index] = value if index not in parts else self.merge(parts[index], value)

    def give_arg(self, arg, state) -> None:
        """Hand ``state`` to a call argument: a node, or a tuple of nodes (an LSTM's (h0, c0))."""
        if state is None:
            return
        if isinstance(arg, (tuple, list)):
            for a, s in zip(arg, state):
                self.give_arg(a, s)
        elif hasattr(arg, "name"):
            self.give(arg, state)

    def need(self, arg) -> bool:
        if isinstance(arg, (tuple, list)):
            return any(self.need(a) for a in arg)
        return hasattr(arg, "name") and arg.name in self.plan.leads

    def wanted_attrs(self, gn: GNode) -> set[str]:
        return {a for a, (_, p, _) in gn.params.items() if id(p) in self.plan.wanted_ids}

    def composite(self, gn: GNode, st, run) -> None:
        """A layer with several inputs and outputs (recurrent layers): its rule does the step."""
        args, kwargs = self.args_of(gn)
        ctx = self.env[gn.name + "#ctx"]
        need = [self.need(a) for a in gn.node.args]
        states, params = run(gn.module, args, ctx, st, need, self.wanted_attrs(gn))
        for attr, v in params.items():
            _accumulate(self.acc, gn.params[attr], v)
        for arg, s in zip(gn.node.args, states):
            self.give_arg(arg, s)

    def element(self, gn: GNode, st) -> bool:
        """``getitem`` of a tuple-valued node: hand the state to that element."""
        if gn.glue is None or gn.glue.name != "getitem":
            return False
        src = gn.node.args[0]
        if not hasattr(src, "name") or not isinstance(self.env.get(src.name), (tuple, list)):
            return False
        self.give_part(src, gn.node.args[1], st)
        return True


# ============================================================================ LeCun
class _LeCunSweep(_Sweep):
    """States are (d, g): the diagonal and, in the full variant, the gradient."""

    def seed(self, out_node: GNode, d: Tensor, g: Tensor | None) -> None:
        self.full = g is not None
        self.state[out_node.name] = (d, g)

    def give(self, node, value) -> None:
        if node.name not in self.plan.leads or value is None:
            return
        prev = self.state.get(node.name)
        self.state[node.name] = value if prev is None else self.merge(prev, value)

    def merge(self, a, b):
        if isinstance(a, dict):
            return {i: self.merge(a[i], b[i]) if i in a and i in b else a.get(i, b.get(i))
                    for i in set(a) | set(b)}  # fmt: skip
        return (a[0] + b[0], None if a[1] is None else a[1] + b[1])

    def param(self, gn: GNode, st) -> None:
        if id(gn.param[1]) in self.plan.wanted_ids:
            _accumulate(self.acc, gn.param, st[0])

    def leaf(self, gn: GNode, st) -> None:
        if getattr(gn.rule, "composite", False):
            full = self.full

            def run(m, args, ctx, st, need, want):
                return gn.rule.graph_lecun(m, args, ctx, st, full, need, want)

            self.composite(gn, st, run)
            return
        args, kwargs = self.args_of(gn)
        if len(gn.node.args) != 1 or kwargs:
            raise GraphReadError(f"{type(gn.module).__name__} called with several inputs", gn.name)
        d, g = st
        x, yv = args[0], self.env[gn.name]
        src = gn.node.args[0]
        need = src.name in self.plan.leads
        contrib, d_in, g_in = gn.rule.lecun(gn.module, x, yv, d, g, need)
        for attr, v in contrib.items():
            if attr in gn.params and id(gn.params[attr][1]) in self.plan.wanted_ids:
                _accumulate(self.acc, gn.params[attr], v)
        if need:
            self.give(src, (d_in, g_in))

    def glue(self, gn: GNode, st) -> None:
        if self.element(gn, st):
            return
        _check_args(gn)
        args, kwargs = self.args_of(gn)
        out = self.env[gn.name]
        if isinstance(out, (tuple, list)):  # split/chunk/unbind: per-element states
            self._multi(gn, st, args, kwargs, out)
            return
        d, g = st
        if _list_arg(gn):
            self._listed(gn, args, kwargs, d, g)
            return
        dyn, stat, nodes = _slots(self.plan, gn, args)
        slots = dyn + stat
        if not slots:
            return
        if gn.glue.kind == "opaque":
            raise GraphReadError(
                f"LeCun's recursion has no rule for {gn.glue.name!r} (the other estimators "
                "handle it)",
                gn.name,
            )
        try:
            ds = gn.glue.sq_vjp(args, kwargs, out, slots, d, g)
            gs = (
                gn.glue.vjp(args, kwargs, slots, g[None], out=out)
                if g is not None
                else [None] * len(slots)
            )
        except NotImplementedError as exc:
            raise GraphReadError(f"LeCun's recursion cannot pass {exc}", gn.name) from exc
        for s, di, gi in zip(slots, ds, gs):
            self.give(nodes[s], (di, None if gi is None else gi[0]))

    def _listed(self, gn, args, kwargs, d, g) -> None:
        tensors = list(args[0])
        nodes = list(gn.node.args[0])
        slots = [i for i, n in enumerate(nodes) if hasattr(n, "name") and n.name in self.plan.leads]
        if not slots:
            return
        fn = gn.glue

        def call(*ts):
            full = list(tensors)
            for s, t in zip(slots, ts):
                full[s] = t
            return fn.call((full, *args[1:]), kwargs)

        ds = _vjp_list(call, [tensors[s] for s in slots], d)
        gs = (
            _vjp_list(call, [tensors[s] for s in slots], g)
            if g is not None
            else [None] * len(slots)
        )
        for s, di, gi in zip(slots, ds, gs):
            self.give(nodes[s], (di, gi))

    def _multi(self, gn, st, args, kwargs, out) -> None:
        """A function returning several tensors (split, chunk, unbind): the users (getitem)
        have handed per-element states; route them back like one tensor."""
        parts = st  # dict index -> (d, g)
        d = [parts.get(i, (torch.zeros_like(o), None))[0] for i, o in enumerate(out)]
        g = None
        if self.full:
            g = [
                parts[i][1] if i in parts and parts[i][1] is not None else torch.zeros_like(o)
                for i, o in enumerate(out)
            ]
        src = gn.node.args[0]
        if not (hasattr(src, "name") and src.name in self.plan.leads):
            return

        def call(t):
            return tuple(gn.glue.call((t, *args[1:]), kwargs))

        _, pull = torch.func.vjp(call, args[0])
        di = pull(tuple(d))[0]
        gi = pull(tuple(g))[0] if g is not None else None
        self.give(src, (di, gi))


def _vjp_list(call, tensors: list[Tensor], cot: Tensor) -> list[Tensor]:
    _, pull = torch.func.vjp(call, *tensors)
    return list(pull(cot))


# ============================================================================ columns
class _ColumnSweep(_Sweep):
    """States are column stacks (K × value)."""

    def __init__(self, plan, env, acc, sign):
        super().__init__(plan, env, acc)
        self.sign = sign
        self.sq_static: dict[str, Tensor] = {}  # static node -> squared per-sample sums

    def seed(self, out_node: GNode, cols: Tensor) -> None:
        self.state[out_node.name] = cols

    def give(self, node, value) -> None:
        if node.name in self.plan.leads and value is not None:
            prev = self.state.get(node.name)
            self.state[node.name] = value if prev is None else self.merge(prev, value)

    def merge(self, a, b):
        if isinstance(a, dict):
            return {i: self.merge(a[i], b[i]) if i in a and i in b else a.get(i, b.get(i))
                    for i in set(a) | set(b)}  # fmt: skip
        return a + b

    # parameters read by the forward get squared sums (and how often each entry was used)
    def param(self, gn: GNode, st) -> None:
        sq, cover = st
        if bool((cover > 1.5).any()):
            raise GraphReadError(
                "a parameter is used at several places (tied, or overlapping slices); its "
                "per-sample gradients would need the cross terms between the uses",
                gn.name,
            )
        if id(gn.param[1]) in self.plan.wanted_ids:
            _accumulate(self.acc, gn.param, sq)

    def _static_give(self, node, sq: Tensor, cover: Tensor) -> None:
        if node.name not in self.plan.leads:
            return
        prev = self.state.get(node.name)
        self.state[node.name] = (sq, cover) if prev is None else (prev[0] + sq, prev[1] + cover)

    def leaf(self, gn: GNode, cols) -> None:
        if getattr(gn.rule, "composite", False):
            sign = self.sign

            def run(m, args, ctx, st, need, want):
                return gn.rule.graph_columns(m, args, ctx, st, sign, need, want)

            self.composite(gn, cols, run)
            return
        if gn.name in self.plan.static:
            raise GraphReadError("a registry layer applied to parameters only", gn.name)
        args, kwargs = self.args_of(gn)
        if len(gn.node.args) != 1 or kwargs:
            raise GraphReadError(f"{type(gn.module).__name__} called with several inputs", gn.name)
        x = args[0]
        src = gn.node.args[0]
        if any(id(p) in self.plan.wanted_ids for _, p, _ in gn.params.values()):
            xc, cc = self._canonical(gn, src, x, cols)
            sq = gn.rule.sq_grads(gn.module, xc, cc, self.sign)
            for attr, v in sq.items():
                if attr in gn.params and id(gn.params[attr][1]) in self.plan.wanted_ids:
                    _accumulate(self.acc, gn.params[attr], v)
        if src.name in self.plan.leads:
            self.give(src, gn.rule.vjp(gn.module, x, cols))

    def _canonical(self, gn: GNode, src, x: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
        """Input and columns with the samples on the first axis (per-sample sums need it)."""
        lay_in = self.plan.layouts.get(src.name)
        lay_out = self.plan.layouts.get(gn.name)
        if lay_in is None or lay_out is None:
            raise GraphReadError("a layer whose input does not depend on the samples", gn.name)
        if (lay_in.dim, lay_in.mult) == (0, 1) and (lay_out.dim, lay_out.mult) == (0, 1):
            return x, cols
        if not gn.rule.last_dim:
            raise GraphReadError(
                f"{type(gn.module).__name__} gets its samples on axis {lay_in.dim} (merged "
                f"{lay_in.mult}-fold); only layers acting on the last axis allow that",
                gn.name,
            )
        return canon(x, lay_in), canon(cols, lay_out, lead=1)

    def glue(self, gn: GNode, cols) -> None:
        if gn.name not in self.plan.static and self.element(gn, cols):
            return
        _check_args(gn)
        args, kwargs = self.args_of(gn)
        out = self.env[gn.name]
        if gn.name in self.plan.static:  # a static path: squared sums travel back
            self._static(gn, cols, args, kwargs)
            return
        if isinstance(out, (tuple, list)):
            self._multi(gn, cols, args, kwargs, out)
            return
        if _list_arg(gn):
            self._listed(gn, args, kwargs, cols)
            return
        dyn, stat, nodes = _slots(self.plan, gn, args)
        for s in stat:
            sq = self._param_squares(gn, args, kwargs, s, cols)
            self._static_give(nodes[s], sq, torch.ones_like(sq))
        if dyn:
            for s, c in zip(dyn, gn.glue.vjp(args, kwargs, dyn, cols, out=out)):
                self.give(nodes[s], c)

    def _listed(self, gn, args, kwargs, cols) -> None:
        tensors = list(args[0])
        nodes = list(gn.node.args[0])
        slots = [i for i, n in enumerate(nodes) if hasattr(n, "name") and n.name in self.plan.leads]
        if any(nodes[s].name in self.plan.static for s in slots):
            raise GraphReadError("a parameter concatenated with sample data", gn.name)

        def call(*ts):
            full = list(tensors)
            for s, t in zip(slots, ts):
                full[s] = t
            return gn.glue.call((full, *args[1:]), kwargs)

        _, pull = torch.func.vjp(call, *[tensors[s] for s in slots])
        got = torch.func.vmap(pull)(cols)
        for s, c in zip(slots, got):
            self.give(nodes[s], c)

    def _multi(self, gn, parts, args, kwargs, out) -> None:
        src = gn.node.args[0]
        if not (hasattr(src, "name") and src.name in self.plan.leads):
            return
        k = next(iter(parts.values())).shape[0]
        cots = tuple(
            parts[i] if i in parts else torch.zeros((k, *o.shape), dtype=o.dtype, device=o.device)
            for i, o in enumerate(out)
        )

        def call(t):
            return tuple(gn.glue.call((t, *args[1:]), kwargs))

        _, pull = torch.func.vjp(call, args[0])
        (ci,) = torch.func.vmap(pull)(cots)
        self.give(src, ci)

    # ------------------------------------------------------------------ static paths
    def _static(self, gn: GNode, st, args, kwargs) -> None:
        """Hand squared per-sample sums (and use counts) back through a selecting function."""
        sq, cover = st
        if gn.glue.name not in _SELECTING:
            raise GraphReadError(
                f"a parameter passes through {gn.glue.name!r} before it meets the samples; the "
                "squared per-sample gradients cannot be handed back through it",
                gn.name,
            )
        dyn, stat, nodes = _slots(self.plan, gn, args)
        if isinstance(self.env[gn.name], (tuple, list)):
            raise GraphReadError("a split parameter", gn.name)
        if stat:
            got = gn.glue.vjp(args, kwargs, stat, torch.stack([sq, cover]))
            for s, c in zip(stat, got):
                self._static_give(nodes[s], c[0], c[1])

    def _param_squares(self, gn: GNode, args, kwargs, slot: int, cols: Tensor) -> Tensor:
        """Σ_k Σ_n σ (per-sample gradient of static argument ``slot``)², where it meets samples."""
        g = gn.glue
        if g.kind == "linear":
            return self._linear_squares(gn, args, kwargs, slot, cols)
        if g.kind == "matmul" and slot == 1 and args[1].dim() == 2:
            w = args[1].transpose(0, 1)
            x = args[0]
            sq = self._linear_with(gn, x, w, None, cols)["weight"]
            return sq.transpose(0, 1)
        if g.name in ("add", "sub", "mul", "div") and not (g.name == "div" and slot == 1):
            coef = 1.0
            if g.name == "sub" and slot == 1:
                coef = -1.0
            per = cols * coef if g.name in ("add", "sub") else cols * args[1 - slot]
            return self._square_per_sample(gn, per, args[slot].shape)
        raise GraphReadError(
            f"a parameter meets the samples in {g.name!r}; its per-sample gradients are not "
            "known to the graph engine",
            gn.name,
        )

    def _linear_squares(self, gn, args, kwargs, slot, cols) -> Tensor:
        x, w, b = G.LinearFn.parts(args, kwargs)
        sq = self._linear_with(gn, x, w, b, cols)
        return sq["weight"] if slot == 1 else sq["bias"]

    def _linear_with(self, gn, x, w, b, cols) -> dict[str, Tensor]:
        src = gn.node.args[0]
        lay_in = self.plan.layouts[src.name]
        lay_out = self.plan.layouts[gn.name]
        xc, cc = canon(x, lay_in), canon(cols, lay_out, lead=1)
        return _LINEAR.sq_grads(SimpleNamespace(weight=w, bias=b), xc, cc, self.sign)

    def _square_per_sample(self, gn: GNode, per: Tensor, shape: torch.Size) -> Tensor:
        """Σ_k Σ_n σ (Σ over the broadcast entries of ``per`` for sample n)² for a static
        argument of ``shape`` broadcast to the output (``per``: K × output)."""
        lay = self.plan.layouts[gn.name]
        out_shape = per.shape[1:]
        sshape = (1,) * (len(out_shape) - len(shape)) + tuple(shape)
        if sshape[lay.dim] != 1:
            raise GraphReadError("a parameter extends along the samples' axis", gn.name)
        dims = [1 + i for i, (a, b) in enumerate(zip(sshape, out_shape))
                if a == 1 and b != 1 and i != lay.dim]  # fmt: skip
        if dims:
            per = per.sum(dims, keepdim=True)
        t = canon(per, lay, lead=1)  # K × N × [mult ×] rest
        if lay.mult > 1:
            t = t.sum(2)
        t = t.reshape(t.shape[0], t.shape[1], *shape)
        t2 = t.square()
        if self.sign is not None:
            t2 = t2 * self.sign.reshape(*self.sign.shape, *([1] * len(shape)))
        return t2.sum((0, 1))
