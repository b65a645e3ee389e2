"""Units of recurrent layers (``nn.RNN``, ``nn.GRU``, ``nn.LSTM``).

Hidden unit ``j`` of layer ``l`` and direction ``d`` is one unit: its hidden state ``h_j`` (and,
for an LSTM, its cell state ``c_j``, which reaches the rest of the network only through ``h_j``)
in the output sequence, in ``h_n`` (and ``c_n``) and in a given initial state. Its **fan-in** is
its row in every gate block of ``weight_ih``/``weight_hh`` (gate layouts: LSTM ``[i, f, g, o]``,
GRU ``[r, z, n]``, RNN one block) and of the biases; its **fan-out** is its column of
``weight_hh`` (every gate: the recurrence into every unit, itself included), its column of the
next layer's ``weight_ih`` and whatever reads the layer's outputs. Once all of that is zero its
state, however non-zero, reaches nothing, so deleting the unit leaves every output unchanged.

A unit whose fan-in is zero is *not* constant (its state still evolves, from ``h0`` to the
bias-driven values, and an LSTM cell state accumulates), so it is never folded.

One module has one ``hidden_size`` for all its layers and directions: a removal must delete the
same number of units from each (the removal planner keeps some dead units where needed).
Keys: the module path for a single-layer, one-direction module; ``path.l{k}`` and
``path.l{k}_reverse`` otherwise. ``proj_size`` and packed sequences block the module's units.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .atoms import merge_along
from .base import Records
from .call import Call, Read, along, block_inputs, fresh_blocked

GATES = {"GRU": 3, "LSTM": 4}  # RNN_TANH, RNN_RELU: 1


def gates(m: nn.RNNBase) -> int:
    return GATES.get(m.mode, 1)


def key(path: str, m: nn.RNNBase, layer: int, direction: int) -> str:
    if m.num_layers == 1 and not m.bidirectional:
        return path
    return f"{path}.l{layer}" + ("_reverse" if direction else "")


def suffix(layer: int, direction: int) -> str:
    return f"_l{layer}" + ("_reverse" if direction else "")


def walk(rec: Records, call: Call):
    m: nn.RNNBase = call.gn.module
    x = call.args[0] if call.args else None
    if getattr(m, "proj_size", 0) or not isinstance(x, Tensor) or call.kwargs:
        why = "LSTM(proj_size > 0)" if getattr(m, "proj_size", 0) else "packed or keyword input"
        reason = f"{type(m).__name__} with {why} is not followed by cells"
        block_inputs(rec.uf, call, reason)
        return fresh_blocked(rec.uf, call.out, call.name, reason)
    path = call.gn.node.target
    dirs = 2 if m.bidirectional else 1
    g = gates(m)
    cols = merge_along(rec.uf, x, -1, call.name, f"{type(m).__name__} {path!r}")
    rec.reads.append(Read(call.name, 0, along(cols, x.shape, -1)))
    units = [
        [
            rec.producer(
                m, key(path, m, layer, d), m.hidden_size, "unit", call.name, call.order, (layer, d)
            )  # fmt: skip
            for d in range(dirs)
        ]
        for layer in range(m.num_layers)
    ]
    for layer in range(m.num_layers):
        below = cols if layer == 0 else torch.cat(units[layer - 1])
        for d in range(dirs):
            _record(rec, call, m, layer, d, units[layer][d].repeat(g), units[layer][d], below)
    stacked = torch.stack([u for per_layer in units for u in per_layer])  # (L·D) × H
    _initial_state(rec, call, stacked)
    return _outputs(call, units, stacked)


def _record(rec: Records, call: Call, m, layer: int, d: int, rows, own, below) -> None:
    sfx = suffix(layer, d)
    path = call.gn.node.target

    def name(attr: str) -> str:
        binding = call.gn.params.get(attr)
        return binding[0] if binding else (f"{path}.{attr}" if path else attr)

    for w, cols_ids in ((f"weight_ih{sfx}", below), (f"weight_hh{sfx}", own)):
        rec.axis(name(w), m, w, 0, rows, "fan_in", call.name)
        rec.axis(name(w), m, w, 1, cols_ids, "fan_out", call.name)
    if m.bias:
        for b in (f"bias_ih{sfx}", f"bias_hh{sfx}"):
            rec.axis(name(b), m, b, 0, rows, "fan_in", call.name)


def _state_pattern(stacked: Tensor, shape) -> Tensor:
    if len(shape) == 3:
        return stacked[:, None, :].expand(tuple(shape))
    return stacked.expand(tuple(shape))


def _initial_state(rec: Records, call: Call, stacked: Tensor) -> None:
    """A given initial state belongs to the units it starts (h0 and c0 alike)."""
    if len(call.args) < 2 or call.args[1] is None:
        return
    state = call.args[1]
    parts = list(state) if isinstance(state, (tuple, list)) else [state]
    for i, s in enumerate(parts):
        if not isinstance(s, Tensor):
            continue
        pattern = _state_pattern(stacked, s.shape)
        rec.uf.union_pairs(s, pattern)
        rec.reads.append(Read(call.name, (1, i) if isinstance(state, (tuple, list)) else 1,
                              pattern))  # fmt: skip


def _outputs(call: Call, units, stacked: Tensor):
    out, final = call.out
    seq = along(torch.cat(units[-1]), out.shape, -1)
    if isinstance(final, tuple):
        return seq, tuple(_state_pattern(stacked, f.shape) for f in final)
    return seq, _state_pattern(stacked, final.shape)
