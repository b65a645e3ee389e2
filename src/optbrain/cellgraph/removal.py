"""Removing groups from a model: check that every node follows, then slice in place.

:func:`check` walks the graph once more on the *smaller* values (each value's group map with
the removed entries deleted, :func:`.atoms.compact`): every function must turn the smaller
inputs into the smaller result expected (no size written into the code, no split that would
fall between other units), every layer must lose whole units of what it reads, and a recurrent
module must lose as many units in every layer and direction (one ``hidden_size``). What does not
follow raises :class:`~.base.CellGraphError` naming the node. :func:`apply` then slices every
recorded parameter and buffer of the model (weights, biases, BatchNorm statistics, a parameter
read by the forward) and sets the layers' sizes, so the model is the user's own module, smaller.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.fx.node import map_arg

from . import glue, layers
from .analysis import UnitGraph, _line_axis
from .atoms import GONE, compact
from .base import CellGraphError
from .call import Call, is_float

Slicer = Callable[[Tensor], Tensor]


def check(ug: UnitGraph, removed: set[int]) -> None:
    """Raise :class:`CellGraphError` (naming the node) unless removing the groups ``removed``
    (root ids) leaves a model every node of which still works (see the module docstring)."""
    if not removed:
        return
    gone = torch.tensor(sorted(removed), dtype=torch.long)
    _check_recurrent(ug, gone)
    env: dict[str, object] = {}
    reads = {}
    for r in ug.rec.reads:
        reads.setdefault(r.node, []).append(r)
    for order, gn in enumerate(ug.graph.nodes):
        if gn.kind == "output":
            continue
        name = gn.name
        real = ug.real.get(name)
        expected = _smaller(ug, ug.atoms.get(name), real, gone, name)
        if gn.kind in ("leaf", "glue"):
            args = map_arg(gn.node.args, lambda n: env[n.name])
            kwargs = map_arg(gn.node.kwargs, lambda n: env[n.name])
            rargs = map_arg(gn.node.args, lambda n: ug.real[n.name])
            rkwargs = map_arg(gn.node.kwargs, lambda n: ug.real[n.name])
            call = Call(gn, order, tuple(args), dict(kwargs), tuple(rargs), dict(rkwargs), real)
            _check_reads(ug, reads.get(name, []), gone)
            if not _carries(real):
                expected = _recompute(call)
            elif gn.kind == "leaf":
                why = layers.check(call, expected)
                if why:
                    raise CellGraphError(f"cannot remove these units: {why}", name)
            elif not (name in reads and glue.kind(call) == "layer"):
                why = glue.check(call, expected)
                if why:
                    raise CellGraphError(f"cannot remove these units: {gn.glue.name} {why}", name)
        env[name] = expected


def _carries(value) -> bool:
    if is_float(value):
        return True
    if isinstance(value, (tuple, list)):
        return any(_carries(v) for v in value)
    return False


def _smaller(ug: UnitGraph, atoms, real, gone: Tensor, name: str):
    """The group map of a value without the removed entries (non-atom values unchanged)."""
    if isinstance(atoms, Tensor) and is_float(real):
        groups = ug.roots[atoms]
        got = compact(groups, torch.isin(groups, gone))
        if got is None or got is GONE:
            what = "would lose every entry" if got is GONE else "would lose entries that are not"
            raise CellGraphError(
                f"cannot remove these units: this value {what}"
                + ("" if got is GONE else " whole units along one axis"),
                name,
            )
        return got
    if isinstance(atoms, (tuple, list)) and isinstance(real, (tuple, list)):
        return type(atoms)(_smaller(ug, a, r, gone, name) for a, r in zip(atoms, real))
    return atoms


def _recompute(call: Call):
    """A value without units (a size, an index): evaluated again on the smaller values."""
    try:
        if call.gn.kind == "leaf":
            return call.gn.module(*call.args, **call.kwargs)
        return call.gn.glue.call(call.args, call.kwargs)
    except Exception:  # noqa: BLE001 - any failure: the call does not follow the removal
        return call.out


def _check_reads(ug: UnitGraph, reads, gone: Tensor) -> None:
    for r in reads:
        arg = ug.graph.by_name[r.node].node.args[r.arg if isinstance(r.arg, int) else r.arg[0]]
        atoms = ug.atoms[arg.name]
        if isinstance(r.arg, tuple):
            atoms = atoms[r.arg[1]]
        got = torch.isin(ug.roots[atoms], gone)
        want = torch.isin(ug.roots[r.pattern.expand(atoms.shape)], gone)
        if not bool((got == want).all()):
            raise CellGraphError(
                "cannot remove these units: a layer reads a tensor that would lose entries "
                "other than whole units of it (e.g. a constant or a size fixed in the code "
                "beside the units)",
                r.node,
            )


def _check_recurrent(ug: UnitGraph, gone: Tensor) -> None:
    counts: dict[int, dict[str, int]] = {}
    nodes: dict[int, str] = {}
    for p in ug.producers:
        if p.recurrent is None:
            continue
        n = int(torch.isin(ug.roots[p.ids], gone).sum())
        counts.setdefault(id(p.module), {})[p.key] = n
        nodes[id(p.module)] = p.node
    for mid, per in counts.items():
        if len(set(per.values())) > 1:
            raise CellGraphError(
                "a recurrent module has one hidden_size for all its layers and directions: "
                f"remove the same number of units from each (asked: {per})",
                nodes[mid],
            )


# --------------------------------------------------------------------------- slicing
def apply(ug: UnitGraph, removed: set[int]) -> dict[str, Slicer]:
    """Slice the model's recorded parameters and buffers in place (call :func:`check` first);
    returns, per clean parameter name, the function that slices a tensor of its old shape (for
    masks)."""
    gone = torch.tensor(sorted(removed), dtype=torch.long)
    per_tensor: dict[tuple[int, str], list] = {}
    for rec in ug.rec.axes.values():
        per_tensor.setdefault((id(rec.owner), rec.attr), []).append(rec)
    slicers: dict[str, Slicer] = {}
    touched: dict[int, nn.Module] = {}
    with torch.no_grad():
        for recs in per_tensor.values():
            keeps = []
            for rec in recs:
                drop = torch.isin(ug.roots[rec.ids], gone)
                if bool(drop.any()):
                    keeps.append((rec.axis, torch.nonzero(~drop).flatten()))
            if not keeps:
                continue
            slicer = _index_slicer(keeps)
            _set(recs[0].owner, recs[0].attr, slicer, recs[0].is_param)
            slicers[recs[0].name] = slicer
            touched[id(recs[0].owner)] = recs[0].owner
        for free in ug.rec.free:
            groups = ug.roots[free.ids]
            drop = torch.isin(groups, gone)
            if not bool(drop.any()):
                continue
            slicer = _compact_slicer(drop, groups, free.name)
            _set(free.owner, free.attr, slicer, free.is_param)
            slicers[free.name] = slicer
    for m in touched.values():
        _resize(m)
    return slicers


def _index_slicer(keeps: list[tuple[int, Tensor]]) -> Slicer:
    def slicer(t: Tensor) -> Tensor:
        for axis, keep in keeps:
            t = t.index_select(axis, keep.to(t.device))
        return t

    return slicer


def _compact_slicer(drop: Tensor, groups: Tensor, name: str) -> Slicer:
    axis = _line_axis(groups)

    def slicer(t: Tensor) -> Tensor:
        if axis is not None:
            other = tuple(d for d in range(t.dim()) if d != axis)
            keep = ~drop.any(other) if other else ~drop
            return t.index_select(axis, torch.nonzero(keep).flatten().to(t.device))
        got = compact(t, drop.to(t.device))
        if got is None or got is GONE:
            raise CellGraphError(f"{name!r} cannot lose these entries")
        return got

    return slicer


def _set(owner: nn.Module, attr: str, slicer: Slicer, is_param: bool) -> None:
    old = getattr(owner, attr)
    new = slicer(old.detach()).clone()
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        setattr(owner, attr, new)


def _resize(m: nn.Module) -> None:
    """Set a layer's size attributes from its (sliced) parameters."""
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if m.groups > 1:  # depthwise: one kernel per channel
            m.groups = m.in_channels = m.out_channels = m.weight.shape[0]
        else:
            m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1]
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        ref = m.weight if m.weight is not None else m.running_mean
        if ref is not None:
            m.num_features = ref.shape[0]
    elif isinstance(m, nn.Embedding):
        m.embedding_dim = m.weight.shape[1]
    elif isinstance(m, nn.RNNBase):
        m.hidden_size = m.weight_hh_l0.shape[1]
        m.input_size = m.weight_ih_l0.shape[1]
        m._init_flat_weights()
