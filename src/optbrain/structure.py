"""Physical removal of inputs, hidden units and conv channels: a smaller dense model.

:func:`remove` deletes the cells you name; :func:`remove_dead_units` deletes the units that weight
pruning left dead. Both work on a deep copy (the model passed in is never changed), bake attached
optbrain masks on that copy, and return a :class:`Removal` whose ``model`` is **the user's own
module, smaller**: same class, same ``forward``, same parameter names; its weights, biases,
BatchNorm statistics and parameters read by the forward are sliced, and its layers' sizes
(``in_features``, ``out_channels``, ``hidden_size``, ...) set to match.

*What can be followed* is the model's unit graph (:mod:`optbrain.cellgraph`): any model
torch.fx can trace, read by the one graph reader of :mod:`optbrain.curvature.graph`. Units of
Linear, Conv1d/2d/3d, Embedding and recurrent layers (``nn.RNN``/``GRU``/``LSTM``, multi-layer
and bidirectional) anywhere in the graph; element-wise activations, BatchNorm, pooling, dropout
and reshapes between layers; residual additions and other element-wise joins couple the units
they join into one group, concatenations and splits place units side by side: a group goes as a
whole, so a channel stays if any member still needs it. Units that reach the model output, or
that a ``LayerNorm``, softmax, matmul or unknown function mixes with others, are not removable
(:class:`~optbrain.cellgraph.UnitRemovalError` names the node when you ask for one). A removal a
node cannot follow (a size written into the code, a split that would fall between other units,
hidden sizes of a recurrent module's layers that would differ) raises
:class:`~optbrain.cellgraph.CellGraphError` naming the node.

*Exactness.* Deleting a cell deletes its outgoing weights, so the new model computes what the
masked model computes once those fan-out weights are zero (:func:`optbrain.cells.cell_mask` with
``part="fan_out"``). :func:`remove_dead_units` only deletes units whose removal changes nothing:
dead fan-out (every outgoing weight zero; for a recurrent unit its ``weight_hh`` column in every
gate as well as whatever reads the layer) and constant units (:mod:`optbrain.cellgraph.dead`),
whose constant is folded into the readers' biases. The equality holds for the model in eval mode.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import masking
from .cellgraph import CellGraphError, UnitGraph, UnitRemovalError, unit_graph
from .cellgraph import dead as _dead
from .cellgraph import removal as _removal
from .cellgraph.base import AxisRec
from .cells import Cell
from .errors import EmptyLayerError
from .masking import Mask

__all__ = ["INPUTS", "Removal", "remove", "remove_dead_units"]

logger = logging.getLogger(__name__)

#: key of a :func:`remove` spec that names input variables (features, or channels of a Conv)
INPUTS = "inputs"


@dataclass
class Removal:
    """What :func:`remove` / :func:`remove_dead_units` built.

    ``model``: the new, smaller dense module (no masks attached). ``kept_inputs``: original indices
    of the input variables the new model reads, so ``removal.select_inputs(x)`` gives it the right
    data. ``kept``: per layer with cells (module path; ``path.l1`` / ``path.l0_reverse`` for the
    layers and directions of a recurrent module), original indices of the units/channels kept.
    ``removed_inputs`` / ``removed``: what was deleted (original indices; a coupled group is listed
    under each of its layers). ``folded``: per layer, deleted units whose constant output was
    folded into the readers' biases. ``unfolded``: constant units left in place because their
    contribution could not be folded exactly (conv channels without ``input_shape``, a constant
    channel feeding a padded convolution, a reader without a bias to hold it). ``kept_dead``: dead
    units left in place because a node cannot follow their removal, or to keep a recurrent
    module's layers and directions at one size (the reason is logged). ``mask``: the
    attached/given mask restricted to what is left, in the new model's names (attach it to keep
    pruning).
    """

    model: nn.Module
    kept_inputs: Tensor
    kept: dict[str, Tensor]
    removed_inputs: list[int] = field(default_factory=list)
    removed: dict[str, list[int]] = field(default_factory=dict)
    folded: dict[str, list[int]] = field(default_factory=dict)
    unfolded: dict[str, list[int]] = field(default_factory=dict)
    mask: Mask = field(default_factory=Mask)
    params_before: int = 0
    params_after: int = 0

    #: the model flattens its input first: ``kept_inputs`` index the flattened features
    flattens_input: bool = False
    kept_dead: dict[str, list[int]] = field(default_factory=dict)
    #: the axis of one input sample along which the input variables lie
    input_axis: int = 0

    def select_inputs(self, x: Tensor) -> Tensor:
        """The input variables (along ``input_axis`` of each sample) that the new model reads;
        ``x`` is flattened from dim 1 first when the model flattens its input."""
        if self.flattens_input:
            x = x.flatten(1)
            return x.index_select(1, self.kept_inputs.to(x.device))
        return x.index_select(self.input_axis + 1, self.kept_inputs.to(x.device))


# --------------------------------------------------------------------------- public API
def remove(
    model: nn.Module,
    spec: Iterable[Cell] | Mapping[str, Iterable[int]],
    *,
    mask: Mask | Mapping[str, Tensor] | None = None,
    example: Tensor | None = None,
    input_shape: Sequence[int] | None = None,
) -> Removal:
    """A copy of ``model`` without the given inputs, hidden units and channels.

    ``spec``: cells from :func:`optbrain.cells.cells`, or a mapping from a layer key (the module
    producing the units, e.g. ``"0"``; ``"rnn.l1"`` for layer 1 of a multi-layer recurrent
    module) to unit/channel indices, with the key :data:`INPUTS` (``"inputs"``) for input
    variables. A unit coupled to others (by a residual addition, say) takes its whole group with
    it. The new model equals the masked model with these cells' fan-out weights zeroed. ``mask``
    is applied (on the copy) on top of any attached mask; ``example`` / ``input_shape`` give the
    input shape where the first layer does not (:func:`optbrain.cells.cells`).

    Raises :class:`~optbrain.errors.EmptyLayerError` if every input or every unit of a layer
    would go, ``KeyError`` / ``IndexError`` for unknown layers or indices,
    :class:`~optbrain.cellgraph.UnitRemovalError` (a ``KeyError``) for a unit that is not
    removable and :class:`~optbrain.cellgraph.CellGraphError` where a node cannot follow the
    removal (both name the node).
    """
    work, cur_mask = _prepared_copy(model, mask)
    ug = unit_graph(work, example, input_shape)
    state = _State.start(ug, cur_mask, _count(model))
    roots = _parse_spec(spec, ug)
    _check_not_empty(ug, roots)
    _removal.check(ug, roots)
    _rebuild(ug, roots, [], state)
    return state.result(work)


def remove_dead_units(
    model: nn.Module,
    mask: Mask | Mapping[str, Tensor] | None = None,
    *,
    inputs: bool = False,
    input_shape: Sequence[int] | None = None,
    example: Tensor | None = None,
) -> Removal:
    """A copy of ``model`` without the units/channels that pruning left dead; outputs unchanged.

    A unit is dead when all its outgoing weights are zero (for a recurrent unit: its column of
    ``weight_hh`` in every gate and of whatever reads the layer), or when it outputs a constant
    (all its incoming weights zero, or a BatchNorm scale of zero), which is folded into the
    readers' biases, then deleted. A group of coupled units goes only when all of it is dead.
    Deleting units can kill others, so this repeats until nothing changes. ``mask`` (optional) is
    applied on the copy on top of any attached mask; plain zero weights count as pruned too.
    ``inputs=True`` also deletes inputs whose outgoing weights are all zero (the new model then
    reads ``Removal.kept_inputs`` only). ``input_shape`` (one sample's shape) or ``example`` (a
    batch): conv channels with a dead fan-in need it to compute their constant output map;
    without it they stay (listed in ``Removal.unfolded``). Raises
    :class:`~optbrain.errors.EmptyLayerError` when every unit of a layer (or every input) is
    dead: the network output would not depend on its input.
    """
    work, cur_mask = _prepared_copy(model, mask)
    state: _State | None = None
    left: dict[tuple[str, int], str] = {}  # (layer, original index) -> why it stays
    while True:
        ug = unit_graph(work, example, input_shape)
        state = state or _State.start(ug, cur_mask, _count(model))
        drop, folds = _dead_round(ug, state, left, inputs)
        if not drop:
            break
        _check_not_empty(ug, drop, dead=True)
        drop = _checked(ug, drop, state, left)
        if not drop:
            break
        kept_folds = [f for r, fs in folds.items() if r in drop for f in fs]
        _rebuild(ug, drop, kept_folds, state, {r for r in folds if r in drop})
    result = state.result(work)
    _log_left(result, left)
    return result


# --------------------------------------------------------------------------- preparation
def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _deepcopy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy``, also of a masked recurrent layer whose last forward ran with autograd
    (it caches the masked weights, non-leaf tensors deepcopy refuses, in ``_flat_weights``; the
    cache is rebuilt by the next forward)."""
    saved = []
    for m in model.modules():
        flat = getattr(m, "_flat_weights", None) if isinstance(m, nn.RNNBase) else None
        if flat and any(w is not None and not w.is_leaf for w in flat):
            saved.append((m, flat))
            m._flat_weights = [None if w is None else w.detach() for w in flat]
    try:
        return copy.deepcopy(model)
    finally:
        for m, flat in saved:
            m._flat_weights = flat


def _prepared_copy(model: nn.Module, mask) -> tuple[nn.Module, dict[str, Tensor]]:
    """Deep copy with attached masks baked (and ``mask`` applied); returns the combined mask."""
    work = _deepcopy(model)
    combined = masking.detach(work, bake=True).to_dict()
    if mask is not None:
        mask = mask if isinstance(mask, Mask) else Mask(mask)
        masking.apply_(work, mask)
        for name in mask:
            m = mask[name]
            combined[name] = combined[name] & m if name in combined else m
    return work, combined


def _keys_with_cells(ug: UnitGraph) -> list[str]:
    keys = []
    for p in ug.producers:
        if any(ug.groups[int(r)].removable for r in ug.roots[p.ids]) and p.key not in keys:
            keys.append(p.key)
    return keys


def _parse_spec(spec, ug: UnitGraph) -> set[int]:
    """The groups (roots) a spec names."""
    sizes = {p.key: p.ids.numel() for p in ug.producers}
    if isinstance(spec, Mapping):
        items = [(str(key), list(idx)) for key, idx in spec.items()]
        if INPUTS in sizes:
            raise ValueError(f"a layer is named {INPUTS!r}; pass Cell objects instead of a mapping")
    else:
        items = []
        for cell in spec:
            if not isinstance(cell, Cell):
                raise TypeError(
                    f"spec must hold Cell objects or be a mapping, got {type(cell).__name__}"
                )
            items.append((INPUTS if cell.kind == "input" else cell.layer, [cell.index]))
    roots: set[int] = set()
    for key, idx in items:
        if key != INPUTS and key not in sizes:
            _raise_if_blocked_layer(ug, key)
            raise KeyError(
                f"no hidden layer {key!r}; layers with cells are {_keys_with_cells(ug)} "
                f"(and {INPUTS!r})"
            )
        size = _n_inputs(ug) if key == INPUTS else sizes[key]
        for i in idx:
            i = int(i)
            if not 0 <= i < size:
                raise IndexError(f"index {i} out of range for {key!r} (size {size})")
            g = ug.input_group(i) if key == INPUTS else ug.unit_group(key, i)
            if not g.removable:
                raise UnitRemovalError(
                    _not_removable(key, i, g, ug), g.block.node if g.block else None
                )
            roots.add(g.root)
    return roots


def _raise_if_blocked_layer(ug: UnitGraph, key: str) -> None:
    """A layer that has no units in the graph because a block stopped the walk at it."""
    for gn in ug.graph.nodes:
        target = gn.node.target if gn.kind == "leaf" else None
        if target is not None and (key == target or key.startswith(f"{target}.l")):
            reasons = {b.reason for b in ug.rec.uf.blocks.values() if b.node == gn.name}
            if reasons:
                raise UnitRemovalError(
                    f"layer {key!r} has no removable units: {sorted(reasons)[0]}", gn.name
                )


def _n_inputs(ug: UnitGraph) -> int:
    if ug.flattens_input:
        return ug.input_ids.numel()
    if ug.input_axis is None:
        raise CellGraphError("the model's input variables are not cells (see optbrain.cells)")
    return ug.input_ids.shape[ug.input_axis]


def _not_removable(key: str, i: int, g, ug: UnitGraph) -> str:
    kind = next((p.kind for p in ug.producers if p.key == key), "unit")
    what = f"input {i}" if key == INPUTS else f"{kind} {i} of layer {key!r}"
    if g.block is None:
        return f"{what} is not a cell"
    last = (
        " (it is the last layer: its outputs are not cells)"
        if "model output" in g.block.reason
        else ""
    )
    return f"{what} cannot be removed: {g.block.reason}{last}"


def _check_not_empty(ug: UnitGraph, roots: set[int], dead: bool = False) -> None:
    why = (
        " (all of them are dead: the network output no longer depends on its input)" if dead else ""
    )
    ids = ug.input_ids
    if ids is not None and ids.numel():
        r = ug.roots[ids]
        if bool(torch.isin(r, torch.tensor(sorted(roots), dtype=torch.long)).all()):
            n = _n_inputs(ug) if (ug.flattens_input or ug.input_axis is not None) else r.numel()
            raise EmptyLayerError(f"removing every input ({n}) is not possible{why}")
    for p in ug.producers:
        if all(int(r) in roots for r in ug.roots[p.ids]):
            what = "channel" if p.kind == "channel" else "unit"
            raise EmptyLayerError(
                f"removing every {what} of layer {p.key!r} ({p.ids.numel()}) is not possible{why}"
            )


# --------------------------------------------------------------------------- dead units
def _dead_round(ug: UnitGraph, state: _State, left, inputs: bool):
    """(groups to drop, folds per group) for one round of :func:`remove_dead_units`."""
    drop: set[int] = set()
    candidates = []
    for g in ug.groups.values():
        if not g.removable or _is_left(ug, g, state, left):
            continue
        if g.inputs and not inputs:
            continue
        if _dead.dead_fan_out(g):
            drop.add(g.root)
        elif not g.inputs:
            candidates.append(g)
    folds: dict[int, list] = {}
    for root in _dead.constant_groups(ug, candidates):
        got = _dead.fold(ug, ug.groups[root])
        if isinstance(got, str):
            state.leave(left, ug, root, got, unfolded=True)
            continue
        drop.add(root)
        folds[root] = got
    return _balanced(ug, drop, state, left), folds


def _is_left(ug: UnitGraph, g, state: _State, left) -> bool:
    return any((key, state.orig(key, j)) in left for key, j in g.members)


def _balanced(ug: UnitGraph, drop: set[int], state: _State, left) -> set[int]:
    """Drop groups until every recurrent module loses as many units in each layer/direction."""
    while True:
        per_module: dict[int, dict[str, list[tuple[int, int]]]] = {}
        for p in ug.producers:
            if p.recurrent is None:
                continue
            hits = [(j, int(r)) for j, r in enumerate(ug.roots[p.ids].tolist()) if r in drop]
            per_module.setdefault(id(p.module), {})[p.key] = hits
        excess = []
        for per_key in per_module.values():
            low = min(len(v) for v in per_key.values())
            for hits in per_key.values():
                excess += [r for _, r in hits[low:]]
        if not excess:
            return drop
        for r in excess:
            drop.discard(r)
            why = "its recurrent module keeps one hidden_size for all layers and directions"
            state.leave(left, ug, r, why)


def _checked(ug: UnitGraph, drop: set[int], state: _State, left) -> set[int]:
    """``drop`` less the groups whose removal a node cannot follow (each recorded in ``left``)."""
    try:
        _removal.check(ug, drop)
        return drop
    except CellGraphError:
        pass
    ok: set[int] = set()
    for root in sorted(drop):
        try:
            _removal.check(ug, ok | {root})
            ok.add(root)
        except CellGraphError as exc:
            state.leave(left, ug, root, str(exc))
    return _balanced(ug, ok, state, left) if ok else ok


def _log_left(result: Removal, left) -> None:
    for path, idx in result.unfolded.items():
        logger.info(
            "left %d constant unit(s) of layer %r in place: their constant output cannot be "
            "folded exactly (conv channels need input_shape=; padded convolutions see edges)",
            len(idx),
            path,
        )
    for (key, j), why in left.items():
        if j in result.kept_dead.get(key, []):
            logger.info("left dead unit %d of layer %r in place: %s", j, key, why)


# --------------------------------------------------------------------------- rebuilding
@dataclass
class _State:
    """Bookkeeping over rebuild rounds: original indices, masks, what was removed/folded."""

    orig_in: Tensor
    flattens_input: bool
    input_axis: int
    orig_units: dict[str, Tensor]
    keys: list[str]
    mask: dict[str, Tensor]
    params_before: int
    removed_inputs: list[int] = field(default_factory=list)
    removed: dict[str, list[int]] = field(default_factory=dict)
    folded: dict[str, list[int]] = field(default_factory=dict)
    unfolded: dict[str, list[int]] = field(default_factory=dict)
    dead_left: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def start(cls, ug: UnitGraph, mask: dict[str, Tensor], params_before: int) -> _State:
        n_in = 0
        if ug.input_ids is not None and (ug.flattens_input or ug.input_axis is not None):
            n_in = _n_inputs(ug)
        return cls(
            torch.arange(n_in),
            ug.flattens_input,
            ug.input_axis or 0,
            {p.key: torch.arange(p.ids.numel()) for p in ug.producers},
            _keys_with_cells(ug),
            mask,
            params_before,
        )

    def orig(self, key: str, j: int) -> int:
        return int(self.orig_units[key][j])

    def leave(self, left: dict, ug: UnitGraph, root: int, why: str, unfolded: bool = False):
        """Keep a dead group in place (recorded with the reason)."""
        for key, j in ug.groups[root].members:
            orig = self.orig(key, j)
            if (key, orig) in left:
                continue
            left[(key, orig)] = why
            (self.unfolded if unfolded else self.dead_left).setdefault(key, []).append(orig)

    def _still_there(self, path: str, units: list[int]) -> list[int]:
        return sorted(set(units) - set(self.removed.get(path, [])))

    def result(self, model: nn.Module) -> Removal:
        return Removal(
            model=model,
            kept_inputs=self.orig_in.clone(),
            flattens_input=self.flattens_input,
            input_axis=self.input_axis,
            kept={k: self.orig_units[k].clone() for k in self.keys},
            removed_inputs=sorted(self.removed_inputs),
            removed={p: sorted(v) for p, v in self.removed.items() if v},
            folded={p: sorted(v) for p, v in self.folded.items() if v},
            unfolded={p: u for p, v in self.unfolded.items() if (u := self._still_there(p, v))},
            kept_dead={p: u for p, v in self.dead_left.items() if (u := self._still_there(p, v))},
            mask=Mask(self.mask),
            params_before=self.params_before,
            params_after=_count(model),
        )


def _rebuild(
    ug: UnitGraph, roots: set[int], folds: list, state: _State, folded: set[int] = frozenset()
) -> None:
    """Fold constants, slice the model's tensors and masks, and record what went."""
    gone = torch.tensor(sorted(roots), dtype=torch.long)
    with torch.no_grad():
        for module, attr, delta in folds:
            _add_to_bias(ug, module, attr, delta)
    for root in folded:
        for key, j in ug.groups[root].members:
            state.folded.setdefault(key, []).append(state.orig(key, j))
    for p in ug.producers:
        drop = torch.isin(ug.roots[p.ids], gone)
        if bool(drop.any()):
            orig = state.orig_units[p.key]
            state.removed.setdefault(p.key, []).extend(orig[drop].tolist())
            state.orig_units[p.key] = orig[~drop]
    if ug.input_ids is not None and state.orig_in.numel():
        line = ug.input_ids.reshape(-1) if ug.flattens_input else ug._input_line()
        drop = torch.isin(ug.roots[line], gone)
        if bool(drop.any()):
            state.removed_inputs.extend(state.orig_in[drop].tolist())
            state.orig_in = state.orig_in[~drop]
    for name, slicer in _removal.apply(ug, roots).items():
        if name in state.mask:
            state.mask[name] = slicer(state.mask[name])
    logger.debug("removed %d group(s)", len(roots))


def _add_to_bias(ug: UnitGraph, m: nn.Module, attr: str, delta: Tensor) -> None:
    bias = getattr(m, attr, None)
    if bias is None:
        weight = m.weight
        setattr(m, attr, nn.Parameter(torch.zeros_like(delta), requires_grad=weight.requires_grad))
        logger.info("%s had no bias: created one to hold folded constants", type(m).__name__)
        for rec in list(ug.rec.axes.values()):  # slice the new bias with the layer's rows
            if rec.owner is m and rec.attr == "weight" and rec.axis == 0:
                name = rec.name[: -len("weight")] + attr
                new = AxisRec(name, m, attr, 0, rec.ids, "fan_in", rec.node, True, rec.layer)
                ug.rec.axes[(id(getattr(m, attr)), 0)] = new
        bias = getattr(m, attr)
    bias.add_(delta.to(bias.dtype))
