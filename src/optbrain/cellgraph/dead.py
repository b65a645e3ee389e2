"""Dead units: groups that can go without changing any output.

* **Dead fan-out**: every fan-out weight entry of the group is zero (its values reach nothing;
  for a recurrent unit its column of ``weight_hh`` in every gate too), or nothing reads it.
* **Constant** (dead fan-in): every reader of the group sees values that do not depend on the
  input, because each of its units' weight rows is zero (or an Embedding's column) or a
  BatchNorm scale on it is zero, so the unit outputs ``act(b)``. Its contribution to each reader
  is then a constant that the reader's bias absorbs (a bias is created where there was none):
  ``W[:, cols] · v`` for a Linear or a recurrent layer's ``weight_ih``, the convolution of the
  constant map for a Conv — folded only if the same at every sample, position and time step
  (near the border of a padded convolution it is not). Recurrent units are never constant (their
  state evolves), and constant conv channels are folded only when the input shape was given.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import layers
from .analysis import Group, UnitGraph
from .base import AxisRec

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def dead_fan_out(g: Group) -> bool:
    """Every fan-out weight entry of the group is zero (or it has none)."""
    for rec, pos in g.fan_out:
        t = getattr(rec.owner, rec.attr)
        idx = torch.tensor(pos, device=t.device)
        if bool((t.detach().index_select(rec.axis, idx) != 0).any()):
            return False
    return True


def constant_groups(ug: UnitGraph, candidates: list[Group]) -> set[int]:
    """Roots of the candidate groups whose every reader sees input-independent values."""
    wanted = {g.root for g in candidates if g.fan_out and _foldable_kind(ug, g)}
    if not wanted:
        return set()
    live = _liveness(ug)
    out = set()
    for g in candidates:
        if g.root not in wanted:
            continue
        readers = [_reader_input(ug, rec) for rec, _ in g.fan_out]
        if all(name is not None and g.root not in live.get(name, set()) for name in readers):
            out.add(g.root)
    return out


def _foldable_kind(ug: UnitGraph, g: Group) -> bool:
    if g.inputs:
        return False
    keys = {k for k, _ in g.members}
    return all(p.recurrent is None for p in ug.producers if p.key in keys)


def _reader_input(ug: UnitGraph, rec: AxisRec) -> str | None:
    node = ug.graph.by_name[rec.node].node
    arg = node.args[0] if node.args else None
    return arg.name if hasattr(arg, "name") else None


def _groups(ug: UnitGraph, value) -> set[int]:
    out: set[int] = set()
    if isinstance(value, Tensor) and value.dtype == torch.long:
        out.update(torch.unique(ug.roots[value]).tolist())
    elif isinstance(value, (tuple, list)):
        for v in value:
            out |= _groups(ug, v)
    out.discard(0)
    return out


def _liveness(ug: UnitGraph) -> dict[str, set[int]]:
    """Per node: the groups whose entries in its value may depend on the input."""
    live: dict[str, set[int]] = {}
    for gn in ug.graph.nodes:
        name = gn.name
        if gn.kind == "input":
            live[name] = _groups(ug, ug.atoms[name])
        elif gn.kind in ("const", "param", "output"):
            live[name] = set()
        else:
            ins: set[int] = set()
            for arg in gn.node.all_input_nodes:
                ins |= live.get(arg.name, set())
            live[name] = _step(ug, gn, ins) if gn.kind == "leaf" else ins
    return live


def _step(ug: UnitGraph, gn, ins: set[int]) -> set[int]:
    m = gn.module
    out = _groups(ug, ug.atoms[gn.name])
    if isinstance(m, (nn.Linear, nn.Embedding)) or (isinstance(m, _CONV) and m.groups == 1):
        w = m.weight.detach()
        rows = w.transpose(0, 1) if isinstance(m, nn.Embedding) else w
        alive = rows.reshape(rows.shape[0], -1).ne(0).any(1)
        ids = _producer_ids(ug, m)
        if ids is None:
            return out
        return {int(ug.roots[i]) for i, a in zip(ids.tolist(), alive.tolist()) if a}
    scale = _per_channel_scale(m)
    if scale is not None:
        zero = {
            root
            for rec in ug.rec.axes.values()
            if rec.owner is m and rec.axis == 0 and rec.attr == "weight"
            for root, ok in zip(ug.roots[rec.ids].tolist(), scale.tolist())
            if not ok
        }
        return (ins & out) - zero
    if layers.kind(m) in ("identity", "reshape", "pool"):
        return ins & out
    return out  # recurrent units (their state evolves), blocked or mixing layers: live


def _per_channel_scale(m: nn.Module) -> Tensor | None:
    """Per channel: is the layer's scale non-zero (BatchNorm weight, a depthwise kernel)."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
        return m.weight.detach() != 0
    if isinstance(m, _CONV) and m.groups > 1:
        w = m.weight.detach()
        return w.reshape(w.shape[0], -1).ne(0).any(1)
    return None


def _producer_ids(ug: UnitGraph, m: nn.Module) -> Tensor | None:
    for p in ug.producers:
        if p.module is m:
            return p.ids
    return None


# --------------------------------------------------------------------------- folding
def fold(ug: UnitGraph, g: Group) -> list[tuple[nn.Module, str, Tensor]] | str:
    """Per reader of a constant group: (module, bias attribute, what to add to it); or why
    the constant cannot be folded exactly."""
    channel = any(p.kind == "channel" for p in ug.producers if p.key in {k for k, _ in g.members})
    out = []
    for rec, pos in g.fan_out:
        m = rec.owner
        if (channel or isinstance(m, _CONV)) and not ug.example_given:
            return "conv channels need input_shape= to compute their constant map"
        v = ug.real[_reader_input(ug, rec)]
        got = _contribution(m, rec.attr, v, pos)
        if isinstance(got, str):
            return got
        out.append(got)
    return out


def _contribution(m: nn.Module, attr: str, v: Tensor, pos: list[int]):
    w = getattr(m, attr).detach()
    idx = torch.tensor(pos, device=v.device)
    with torch.no_grad():
        if isinstance(m, nn.Linear) or isinstance(m, nn.RNNBase):
            flat = (v.index_select(-1, idx) @ w.index_select(1, idx).T).reshape(-1, w.shape[0])
            bias = "bias" if isinstance(m, nn.Linear) else attr.replace("weight", "bias")
            if isinstance(m, nn.RNNBase) and not m.bias:
                return "the recurrent layer reading it has no bias"
        elif isinstance(m, _CONV) and m.groups == 1:
            z = torch.zeros_like(v)
            z.index_copy_(1, idx, v.index_select(1, idx))
            cmap = m._conv_forward(z, w, None)
            flat = cmap.movedim(1, -1).reshape(-1, w.shape[0])
            bias = "bias"
        else:
            return f"its reader {type(m).__name__} cannot absorb a constant"
    spread = (flat.amax(0) - flat.amin(0)).abs().max()
    tol = 64 * torch.finfo(flat.dtype).eps * max(1.0, float(flat.abs().max()))
    if float(spread) > tol:
        return "its contribution is not the same everywhere (a padded convolution sees edges)"
    return m, bias, flat.mean(0)
