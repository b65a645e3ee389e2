"""Physical removal of inputs, hidden units and conv channels: a smaller dense model.

:func:`remove` deletes the cells you name; :func:`remove_dead_units` deletes the units that weight
pruning left dead. Both work on a deep copy (the model passed in is never changed), bake attached
optbrain masks on that copy, and return a :class:`Removal` with the new ``nn.Module``.

*Exactness.* Deleting a cell deletes its outgoing weights, so the new model computes what the
masked model computes once those fan-out weights are zero (:func:`optbrain.cells.cell_mask` with
``part="fan_out"``). :func:`remove_dead_units` only deletes units whose removal changes nothing:
units with a dead fan-out (every outgoing weight zero), and units with a dead fan-in (every
incoming weight zero, or a BatchNorm scale of zero), which output a constant; that constant's
contribution to the next layer is folded into the next layer's bias. The equality holds for the
model in eval mode (BatchNorm running statistics); BatchNorm layers are sliced with their units.

What can be followed is what :func:`optbrain.cells.layer_chain` follows: ``nn.Sequential`` chains
of Linear / Conv1d-3d (``groups=1``) with per-unit layers (activations, Dropout, pooling,
BatchNorm, Flatten) between them. Recurrent layers (``nn.RNN``/``GRU``/``LSTM``), grouped or
transposed convolutions, branches, tied weights and containers with a custom ``forward`` raise
:class:`~optbrain.errors.UnsupportedModuleError`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import masking
from .cells import Cell, Layer, layer_chain
from .errors import EmptyLayerError, ShapeMismatchError
from .masking import Mask
from .problem import eval_mode

__all__ = ["INPUTS", "Removal", "remove", "remove_dead_units"]

logger = logging.getLogger(__name__)

#: key of a :func:`remove` spec that names input variables (features, or channels of a Conv)
INPUTS = "inputs"


@dataclass
class Removal:
    """What :func:`remove` / :func:`remove_dead_units` built.

    ``model``: the new, smaller dense module (no masks attached). ``kept_inputs``: original indices
    of the inputs (features of a first Linear, channels of a first Conv) the new model reads, so
    ``removal.select_inputs(x)`` gives it the right data. ``kept``: per hidden layer (module path),
    original indices of the units/channels kept. ``removed_inputs`` / ``removed``: what was deleted
    (original indices). ``folded``: per layer, deleted units whose constant output was folded into
    the next layer's bias. ``unfolded``: dead-fan-in units that were left in place because their
    contribution could not be folded exactly (conv channels without ``input_shape``, or a constant
    channel feeding a padded convolution). ``mask``: the attached/given mask restricted to what is
    left, in the new model's names (attach it to keep pruning).
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

    #: the model starts with a Flatten: ``kept_inputs`` index the flattened features
    flattens_input: bool = False

    def select_inputs(self, x: Tensor) -> Tensor:
        """The columns (dim 1: features or channels) of ``x`` that the new model reads; ``x`` is
        flattened from dim 1 first when the model starts with a ``Flatten``."""
        if self.flattens_input:
            x = x.flatten(1)
        return x.index_select(1, self.kept_inputs.to(x.device))


# --------------------------------------------------------------------------- public API
def remove(
    model: nn.Module,
    spec: Iterable[Cell] | Mapping[str, Iterable[int]],
    *,
    mask: Mask | Mapping[str, Tensor] | None = None,
) -> Removal:
    """A copy of ``model`` without the given inputs, hidden units and channels.

    ``spec``: cells from :func:`optbrain.cells.cells`, or a mapping from a hidden layer's module
    path (the layer producing the units, e.g. ``"0"``) to unit/channel indices, with the key
    :data:`INPUTS` (``"inputs"``) for input variables. The new model equals the masked model with
    these cells' fan-out weights zeroed. ``mask`` is applied (on the copy) on top of any attached
    mask. Raises :class:`~optbrain.errors.EmptyLayerError` if every input or every unit of a layer
    would go, ``KeyError`` / ``IndexError`` for unknown layers or indices.
    """
    work, cur_mask = _prepared_copy(model, mask)
    chain = layer_chain(work)
    drop_in, drop = _parse_spec(spec, chain)
    state = _State.start(chain, cur_mask, _count(model))
    _check_not_empty(chain, drop_in, drop)
    _rebuild(work, chain, drop_in, drop, {}, state)
    return state.result(work)


def remove_dead_units(
    model: nn.Module,
    mask: Mask | Mapping[str, Tensor] | None = None,
    *,
    inputs: bool = False,
    input_shape: Sequence[int] | None = None,
) -> Removal:
    """A copy of ``model`` without the units/channels that pruning left dead; outputs unchanged.

    A unit is dead when all its outgoing weights are zero (deleted), or all its incoming weights
    are zero or a BatchNorm scale on it is zero (it outputs a constant, which is folded into the
    next layer's bias, then deleted). Deleting units can kill others, so this repeats until nothing
    changes. ``mask`` (optional) is applied on the copy on top of any attached mask; plain zero
    weights count as pruned too. ``inputs=True`` also deletes inputs whose outgoing weights are all
    zero (the new model then reads ``Removal.kept_inputs`` only). ``input_shape`` is the shape of
    one input sample (e.g. ``(1, 8, 8)``): conv channels with a dead fan-in need it to compute
    their constant output map; without it they stay (listed in ``Removal.unfolded``).
    Raises :class:`~optbrain.errors.EmptyLayerError` when every unit of a layer (or every input)
    is dead: the network output would not depend on its input.
    """
    work, cur_mask = _prepared_copy(model, mask)
    chain = layer_chain(work)
    shapes = _output_shapes(work, chain, input_shape) if input_shape is not None else {}
    state = _State.start(chain, cur_mask, _count(model))
    blocked: set[tuple[str, int]] = set()  # (layer, original index) left in place
    while True:
        chain = layer_chain(work)
        drop_in = _dead_inputs(chain) if inputs else set()
        drop: dict[int, set[int]] = {}
        folds: dict[int, dict[int, Tensor]] = {}
        for k in range(len(chain) - 1):
            dead_out, dead_in = _dead_units(chain, k)
            candidates = {
                j for j in dead_in - dead_out if (chain[k].path, state.orig(k, j)) not in blocked
            }
            fold, stuck = _fold_contributions(work, chain, k, candidates, shapes.get(chain[k].path))
            for j in stuck:
                blocked.add((chain[k].path, state.orig(k, j)))
                state.unfolded.setdefault(chain[k].path, []).append(state.orig(k, j))
            if dead_out or fold:
                drop[k] = dead_out | set(fold)
                folds[k] = fold
        if not drop_in and not drop:
            break
        _check_not_empty(chain, drop_in, drop, dead=True)
        _rebuild(work, chain, drop_in, drop, folds, state)
    result = state.result(work)
    for path, idx in result.unfolded.items():
        logger.info(
            "left %d dead-fan-in unit(s) of layer %r in place: their constant output cannot be "
            "folded exactly (conv channels need input_shape=; padded convolutions see edges)",
            len(idx),
            path,
        )
    return result


# --------------------------------------------------------------------------- preparation
def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _prepared_copy(model: nn.Module, mask) -> tuple[nn.Module, dict[str, Tensor]]:
    """Deep copy with attached masks baked (and ``mask`` applied); returns the combined mask."""
    work = copy.deepcopy(model)
    combined = masking.detach(work, bake=True).to_dict()
    if mask is not None:
        mask = mask if isinstance(mask, Mask) else Mask(mask)
        masking.apply_(work, mask)
        for name in mask:
            m = mask[name]
            combined[name] = combined[name] & m if name in combined else m
    return work, combined


def _parse_spec(spec, chain: list[Layer]) -> tuple[set[int], dict[int, set[int]]]:
    hidden = {layer.path: k for k, layer in enumerate(chain[:-1])}
    drop_in: set[int] = set()
    drop: dict[int, set[int]] = {}
    if isinstance(spec, Mapping):
        items = [(str(key), list(idx)) for key, idx in spec.items()]
        if INPUTS in hidden:
            raise ValueError(f"a layer is named {INPUTS!r}; pass Cell objects instead of a mapping")
    else:
        items = []
        for cell in spec:
            if not isinstance(cell, Cell):
                raise TypeError(
                    f"spec must hold Cell objects or be a mapping, got {type(cell).__name__}"
                )
            items.append((INPUTS if cell.kind == "input" else cell.layer, [cell.index]))
    for key, idx in items:
        if key == INPUTS:
            target, size, what = drop_in, chain[0].n_in, "inputs"
        elif key in hidden:
            k = hidden[key]
            target, size, what = drop.setdefault(k, set()), chain[k].n_out, f"layer {key!r}"
        elif key == chain[-1].path:
            raise KeyError(f"layer {key!r} is the last layer: its outputs are not cells")
        else:
            raise KeyError(
                f"no hidden layer {key!r}; hidden layers are {list(hidden)} (and {INPUTS!r})"
            )
        for i in idx:
            i = int(i)
            if not 0 <= i < size:
                raise IndexError(f"index {i} out of range for {what} (size {size})")
            target.add(i)
    return drop_in, {k: v for k, v in drop.items() if v}


def _check_not_empty(chain, drop_in, drop, dead: bool = False) -> None:
    why = (
        " (all of them are dead: the network output no longer depends on its input)" if dead else ""
    )
    if len(drop_in) >= chain[0].n_in:
        raise EmptyLayerError(f"removing every input ({chain[0].n_in}) is not possible{why}")
    for k, units in drop.items():
        if len(units) >= chain[k].n_out:
            raise EmptyLayerError(
                f"removing every {chain[k].kind} of layer {chain[k].path!r} "
                f"({chain[k].n_out}) is not possible{why}"
            )


def _output_shapes(model, chain, input_shape) -> dict[str, tuple[int, ...]]:
    """Per-sample output shape of every layer for one input of ``input_shape``."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        layer.module.register_forward_hook(
            lambda _m, _i, out, path=layer.path: shapes.__setitem__(path, tuple(out.shape[1:]))
        )
        for layer in chain
    ]
    p = next(model.parameters())
    try:
        with torch.no_grad(), eval_mode(model):
            model(torch.zeros((1, *input_shape), dtype=p.dtype, device=p.device))
    except RuntimeError as exc:
        raise ShapeMismatchError(
            f"the model cannot run on inputs of shape {tuple(input_shape)}: {exc}"
        ) from exc
    finally:
        for h in hooks:
            h.remove()
    return shapes


# --------------------------------------------------------------------------- dead units
def _zero_rows(w: Tensor) -> Tensor:
    return (w.reshape(w.shape[0], -1) == 0).all(1)


def _dead_inputs(chain: list[Layer]) -> set[int]:
    w = chain[0].module.weight
    return _indices(_zero_rows(w.transpose(0, 1)))


def _dead_units(chain: list[Layer], k: int) -> tuple[set[int], set[int]]:
    """(dead fan-out, dead fan-in) unit indices of hidden layer ``k``."""
    layer, nxt = chain[k], chain[k + 1]
    dead_in = _zero_rows(layer.module.weight)
    for _, bn in layer.batchnorms:
        if bn.weight is not None:
            dead_in = dead_in | (bn.weight == 0)
    w = nxt.module.weight.transpose(0, 1)  # columns first
    cols = w.reshape(layer.n_out, layer.span, -1)
    dead_out = (cols == 0).flatten(1).all(1)
    return _indices(dead_out), _indices(dead_in)


def _indices(flags: Tensor) -> set[int]:
    return set(flags.nonzero().flatten().tolist())


def _fold_contributions(model, chain, k, units, out_shape) -> tuple[dict[int, Tensor], set[int]]:
    """Per unit of ``units`` (dead fan-in), its constant contribution to layer ``k+1``'s output.

    Returns (foldable unit -> contribution vector over the next layer's outputs, units that cannot
    be folded exactly).
    """
    if not units:
        return {}, set()
    layer, nxt = chain[k], chain[k + 1]
    conv = layer.kind == "channel"
    if conv and out_shape is None:
        return {}, set(units)
    w = layer.module.weight
    bias = layer.module.bias
    b = bias.detach() if bias is not None else w.new_zeros(layer.n_out)
    spatial = tuple(out_shape[1:]) if conv else ()
    probe = b.reshape(1, -1, *([1] * len(spatial))).expand(1, layer.n_out, *spatial).clone()
    with torch.no_grad(), eval_mode(model):
        z = probe
        for _, m in layer.between:
            z = m(z)
        out: dict[int, Tensor] = {}
        stuck: set[int] = set()
        s = layer.span
        for j in sorted(units):
            if isinstance(nxt.module, nn.Linear):
                zj = torch.zeros_like(z)
                zj[:, j * s : (j + 1) * s] = z[:, j * s : (j + 1) * s]
                out[j] = nn.functional.linear(zj, nxt.module.weight)[0]
                continue
            zj = torch.zeros_like(z)
            zj[:, j] = z[:, j]
            cmap = nxt.module._conv_forward(zj, nxt.module.weight, None)[0]
            flat = cmap.reshape(cmap.shape[0], -1)
            spread = (flat.amax(1) - flat.amin(1)).abs().max()
            tol = 64 * torch.finfo(flat.dtype).eps * max(1.0, float(flat.abs().max()))
            if float(spread) <= tol:
                out[j] = flat.mean(1)
            else:
                stuck.add(j)
    return out, stuck


# --------------------------------------------------------------------------- rebuilding
@dataclass
class _State:
    """Bookkeeping over rebuild rounds: original indices, masks, what was removed/folded."""

    orig_in: Tensor
    flattens_input: bool
    orig_units: dict[str, Tensor]
    paths: list[str]
    mask: dict[str, Tensor]
    params_before: int
    removed_inputs: list[int] = field(default_factory=list)
    removed: dict[str, list[int]] = field(default_factory=dict)
    folded: dict[str, list[int]] = field(default_factory=dict)
    unfolded: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def start(cls, chain: list[Layer], mask: dict[str, Tensor], params_before: int) -> _State:
        return cls(
            torch.arange(chain[0].n_in),
            chain[0].flattens_input,
            {layer.path: torch.arange(layer.n_out) for layer in chain[:-1]},
            [layer.path for layer in chain[:-1]],
            mask,
            params_before,
        )

    def orig(self, k: int, j: int) -> int:
        return int(self.orig_units[self.paths[k]][j])

    def _still_there(self, path: str, units: list[int]) -> list[int]:
        return sorted(set(units) - set(self.removed.get(path, [])))

    def result(self, model: nn.Module) -> Removal:
        return Removal(
            model=model,
            kept_inputs=self.orig_in.clone(),
            flattens_input=self.flattens_input,
            kept={p: t.clone() for p, t in self.orig_units.items()},
            removed_inputs=sorted(self.removed_inputs),
            removed={p: sorted(v) for p, v in self.removed.items() if v},
            folded={p: sorted(v) for p, v in self.folded.items() if v},
            unfolded={p: u for p, v in self.unfolded.items() if (u := self._still_there(p, v))},
            mask=Mask(self.mask),
            params_before=self.params_before,
            params_after=_count(model),
        )


def _keep(n: int, drop: set[int]) -> Tensor:
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long)


def _slice(module: nn.Module, attr: str, name: str, dim: int, keep: Tensor, state: _State) -> None:
    """Replace ``module.attr`` (parameter or buffer) by its slice; slice its mask alike."""
    old = getattr(module, attr, None)
    if old is None:
        return
    idx = keep.to(old.device)
    new = old.detach().index_select(dim, idx).clone()
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        setattr(module, attr, new)
    if name in state.mask:
        state.mask[name] = state.mask[name].index_select(dim, keep.to(state.mask[name].device))


def _name(path: str, attr: str) -> str:
    return f"{path}.{attr}" if path else attr


def _set_width(module: nn.Module, n_in: int | None = None, n_out: int | None = None) -> None:
    if isinstance(module, nn.Linear):
        module.in_features = n_in if n_in is not None else module.in_features
        module.out_features = n_out if n_out is not None else module.out_features
    else:
        module.in_channels = n_in if n_in is not None else module.in_channels
        module.out_channels = n_out if n_out is not None else module.out_channels


def _add_to_bias(layer: Layer, delta: Tensor) -> None:
    m = layer.module
    if m.bias is None:
        m.bias = nn.Parameter(torch.zeros_like(delta), requires_grad=m.weight.requires_grad)
        logger.info("layer %r had no bias: created one to hold folded constants", layer.path)
    with torch.no_grad():
        m.bias.add_(delta.to(m.bias.dtype))


def _rebuild(model, chain, drop_in, drop, folds, state: _State) -> None:
    """Slice the chain's layers in place (on the working copy)."""
    with torch.no_grad():
        for k, fold in folds.items():
            if fold:
                _add_to_bias(chain[k + 1], torch.stack(list(fold.values())).sum(0))
                orig = state.orig_units[chain[k].path]
                state.folded.setdefault(chain[k].path, []).extend(int(orig[j]) for j in fold)
        if drop_in:
            first = chain[0]
            keep = _keep(first.n_in, drop_in)
            state.removed_inputs.extend(int(state.orig_in[i]) for i in drop_in)
            state.orig_in = state.orig_in[keep]
            _slice(first.module, "weight", first.name("weight"), 1, keep, state)
            _set_width(first.module, n_in=len(keep))
        for k, units in sorted(drop.items()):
            layer, nxt = chain[k], chain[k + 1]
            keep = _keep(layer.n_out, units)
            orig = state.orig_units[layer.path]
            state.removed.setdefault(layer.path, []).extend(int(orig[j]) for j in units)
            state.orig_units[layer.path] = orig[keep]
            for attr in ("weight", "bias"):
                _slice(layer.module, attr, layer.name(attr), 0, keep, state)
            _set_width(layer.module, n_out=len(keep))
            for path, bn in layer.batchnorms:
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    _slice(bn, attr, _name(path, attr), 0, keep, state)
                bn.num_features = len(keep)
            s = layer.span
            cols = (keep[:, None] * s + torch.arange(s)[None, :]).flatten()
            _slice(nxt.module, "weight", nxt.name("weight"), 1, cols, state)
            _set_width(
                nxt.module, n_in=len(cols) if isinstance(nxt.module, nn.Linear) else len(keep)
            )
    logger.debug(
        "removed %d input(s) and %s unit(s)",
        len(drop_in),
        {chain[k].path: len(v) for k, v in drop.items()},
    )
