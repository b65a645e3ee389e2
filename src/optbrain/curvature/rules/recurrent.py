"""Rules of the recurrent layers ``nn.RNN`` (tanh, relu), ``nn.GRU`` and ``nn.LSTM``: multi-layer,
bidirectional, ``batch_first`` either way, initial states given or not (and differentiable: an
encoder's final state may start a decoder). Dropout between layers is off (eval mode).
``proj_size`` and packed sequences are refused with a named error.

A recurrent weight is one parameter shared by every time step, so every quantity is the unrolled
network's: per step (PyTorch's gate layout; σ the logistic function)

* RNN:  h = act(a),  a = W_ih x + b_ih + W_hh h₋ + b_hh;
* GRU:  r, z = σ(a_r), σ(a_z);  q = W_hn h₋ + b_hn;  n = tanh(W_in x + b_in + r ⊙ q);
        h = (1 − z) ⊙ n + z ⊙ h₋;
* LSTM: i, f, g, o = σ, σ, tanh, σ of a;  c = f ⊙ c₋ + i ⊙ g;  h = o ⊙ tanh(c).

**Columns** (GGN, Fisher): the columns are back-propagated through time (BPTT, batched over
columns); a sample's gradient of W_ih sums δₜ xₜᵀ over its time steps *before* it is squared,
as the shared-weight rule on the unrolled net requires (and likewise W_hh with h₋, the biases).

**LeCun's recursion through time** is the paper's recursion on the unrolled graph: through W:
(W∘W)ᵀd; through an activation f'²d (+ f''·g in the full variant); through a product x ⊙ y:
y²·d to x (no second-order residual: products are bilinear); where a value feeds several places
(h₋ into every gate and into the next state, c₋ through the forget gate) the diagonals add; a
weight's diagonal is the sum over its connections at every time step. The cross terms it drops
are those between units *and* between time steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ...errors import ShapeMismatchError, UnsupportedModuleError
from ...paramdict import clean_name
from .base import Rule, register
from .layers import _column_square_sum


@dataclass
class _Layer:
    """Forward values of one layer and direction, batch-first: inputs (N, T, I), the previous
    states h₋/c₋ of every step (N, T, H), the saved gate values."""

    x: Tensor
    h_prev: Tensor
    c_prev: Tensor | None
    saved: dict[str, Tensor] = field(default_factory=dict)


class RecurrentRule(Rule):
    """Common machinery; subclasses give one step forward and its two backward forms."""

    composite = True  # several inputs and outputs: the graph engine calls the methods below

    # ------------------------------------------------------------------ structure
    def param_names(self, m: nn.RNNBase) -> tuple[str, ...]:
        return tuple(clean_name(n) for n, _ in m.named_parameters())

    def column_cost(self, m: nn.RNNBase, x) -> int:
        """Entries per sample and column of the per-sample gradients held at once (the largest
        weight of one layer and direction)."""
        return max(p.numel() for p in m.parameters())

    def refusal(self, m: nn.RNNBase, mode: str) -> str | None:
        if getattr(m, "proj_size", 0):
            return "nn.LSTM(proj_size > 0) has no rule yet; use a generic estimator"
        return None

    def _weights(self, m, layer: int, direction: int):
        sfx = f"_l{layer}" + ("_reverse" if direction else "")
        get = getattr
        return (
            get(m, "weight_ih" + sfx),
            get(m, "weight_hh" + sfx),
            get(m, "bias_ih" + sfx, None) if m.bias else None,
            get(m, "bias_hh" + sfx, None) if m.bias else None,
            sfx,
        )

    def _split_args(self, m, args: tuple):
        x = args[0]
        if isinstance(x, nn.utils.rnn.PackedSequence) or not isinstance(x, Tensor):
            raise UnsupportedModuleError(
                f"{type(m).__name__} on packed sequences has no rule: pad the batch instead"
            )
        if x.dim() != 3:
            raise ShapeMismatchError(
                f"{type(m).__name__} needs batched input (3 dimensions), got shape {tuple(x.shape)}"
            )
        state = args[1] if len(args) > 1 else None
        return x, state

    # ------------------------------------------------------------------ forward
    def forward_ctx(self, m: nn.RNNBase, args: tuple, kwargs: dict):
        """The module's output and the values the backward sweeps need."""
        self.check(m)
        if kwargs:
            raise UnsupportedModuleError(f"{type(m).__name__} called with keyword arguments")
        x, state = self._split_args(m, args)
        seq = x if m.batch_first else x.transpose(0, 1)  # N × T × I
        n, t_len = seq.shape[0], seq.shape[1]
        if t_len == 0:
            raise ShapeMismatchError(f"{type(m).__name__}: a sequence of length 0")
        dirs = 2 if m.bidirectional else 1
        h0, c0 = self._initial(m, state, n, dirs, seq)
        layers: list[list[_Layer]] = []
        h_n, c_n = [], []
        inp = seq
        for layer in range(m.num_layers):
            outs, per_dir = [], []
            for direction in range(dirs):
                k = layer * dirs + direction
                w_ih, w_hh, b_ih, b_hh, _ = self._weights(m, layer, direction)
                src = inp.flip(1) if direction else inp
                lay, out, hl, cl = self._run(src, h0[k], None if c0 is None else c0[k],
                                             w_ih, w_hh, b_ih, b_hh)  # fmt: skip
                per_dir.append(lay)
                outs.append(out.flip(1) if direction else out)
                h_n.append(hl)
                c_n.append(cl)
            layers.append(per_dir)
            inp = torch.cat(outs, -1) if dirs == 2 else outs[0]
        output = inp if m.batch_first else inp.transpose(0, 1)
        hn = torch.stack(h_n)
        out = (output, (hn, torch.stack(c_n))) if isinstance(m, nn.LSTM) else (output, hn)
        return out, {"layers": layers, "n": n, "T": t_len, "dirs": dirs}

    def _initial(self, m, state, n: int, dirs: int, like: Tensor):
        shape = (m.num_layers * dirs, n, m.hidden_size)
        zeros = like.new_zeros(shape)
        if state is None:
            return zeros, (zeros if isinstance(m, nn.LSTM) else None)
        if isinstance(m, nn.LSTM):
            if not (isinstance(state, (tuple, list)) and len(state) == 2):
                raise ShapeMismatchError("nn.LSTM's initial state must be a pair (h0, c0)")
            h0, c0 = state
        else:
            h0, c0 = state, None
        for name, s in (("h0", h0), ("c0", c0)):
            if s is not None and tuple(s.shape) != shape:
                raise ShapeMismatchError(
                    f"{type(m).__name__}: initial state {name} has shape {tuple(s.shape)}, "
                    f"expected ({shape[0]}, N, {shape[2]}) (layers × directions, batch, hidden) "
                    f"with N the samples of the call ({n} here)"
                )
        return h0, c0

    def _run(self, seq, h, c, w_ih, w_hh, b_ih, b_hh):
        """One layer and direction: the hidden states by PyTorch's own kernel (one native call),
        then every step's gates at once from them (two matrix products; LSTM: a scan of the
        cell state)."""
        out, h_last, c_last = self.native(seq, h, c, w_ih, w_hh, b_ih, b_hh)
        h_prev = torch.cat([h[:, None], out[:, :-1]], 1)
        lay = _Layer(seq, h_prev=h_prev, c_prev=None)
        xp = seq @ w_ih.T
        if b_ih is not None:
            xp = xp + b_ih
        hp = h_prev @ w_hh.T
        if b_hh is not None:
            hp = hp + b_hh
        lay.saved, lay.c_prev = self.gates(xp, hp, h_prev, c, out)
        return lay, out, h_last, c_last

    def native(self, seq, h, c, w_ih, w_hh, b_ih, b_hh):  # pragma: no cover - abstract
        raise NotImplementedError

    def gates(self, xp, hp, h_prev, c0, out):  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def _params(w_ih, w_hh, b_ih, b_hh) -> list[Tensor]:
        return [w_ih, w_hh] + ([b_ih, b_hh] if b_ih is not None else [])

    # ------------------------------------------------------------------ shared backward
    def _flows(self, m, ctx, st_out, lead: bool):
        """Cotangents arriving at every layer output (N, T, D·H, with ``lead`` a leading column
        axis) and at the final states, from the state handed to the module."""
        out_st, fin = _parts(st_out)
        h_st, c_st = _parts(fin) if isinstance(m, nn.LSTM) else (fin, None)
        return out_st, h_st, c_st

    def graph_columns(self, m, args, ctx, st_out, sign, need: list[bool], want: set[str]):
        return _backward(self, m, args, ctx, st_out, need, want, mode="columns", sign=sign)

    def graph_lecun(self, m, args, ctx, st_out, full: bool, need: list[bool], want: set[str]):
        return _backward(self, m, args, ctx, st_out, need, want, mode="lecun", full=full)


def _parts(st):
    """(element 0, element 1) of a state handed to a tuple-valued value (None where absent)."""
    if st is None:
        return None, None
    if isinstance(st, dict):
        return st.get(0), st.get(1)
    raise TypeError("a recurrent layer's output is a tuple")


class RNNRule(RecurrentRule):
    nonlinearity = "tanh"

    def native(self, seq, h, c, w_ih, w_hh, b_ih, b_hh):
        fn = torch.rnn_tanh if self.nonlinearity == "tanh" else torch.rnn_relu
        params = self._params(w_ih, w_hh, b_ih, b_hh)
        out, hn = fn(seq, h[None], params, b_ih is not None, 1, 0.0, False, False, True)
        return out, hn[0], None

    def gates(self, xp, hp, h_prev, c0, out):
        return {"h": out, "a": xp + hp}, None


class LSTMRule(RecurrentRule):
    def native(self, seq, h, c, w_ih, w_hh, b_ih, b_hh):
        params = self._params(w_ih, w_hh, b_ih, b_hh)
        out, hn, cn = torch.lstm(
            seq, (h[None], c[None]), params, b_ih is not None, 1, 0.0, False, False, True
        )
        return out, hn[0], cn[0]

    def gates(self, xp, hp, h_prev, c0, out):
        ai, af, ag, ao = (xp + hp).chunk(4, -1)
        i, f, g, o = torch.sigmoid(ai), torch.sigmoid(af), torch.tanh(ag), torch.sigmoid(ao)
        ig = i * g
        cs = torch.empty_like(ig)
        c = c0
        for t in range(ig.shape[1]):  # the cell-state scan: one fused op a step
            c = torch.addcmul(ig[:, t], f[:, t], c)
            cs[:, t] = c
        c_prev = torch.cat([c0[:, None], cs[:, :-1]], 1)
        return {"i": i, "f": f, "g": g, "o": o, "tc": torch.tanh(cs)}, c_prev


class GRURule(RecurrentRule):
    def native(self, seq, h, c, w_ih, w_hh, b_ih, b_hh):
        params = self._params(w_ih, w_hh, b_ih, b_hh)
        out, hn = torch.gru(seq, h[None], params, b_ih is not None, 1, 0.0, False, False, True)
        return out, hn[0], None

    def gates(self, xp, hp, h_prev, c0, out):
        xr, xz, xn = xp.chunk(3, -1)
        hr, hz, q = hp.chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        return {"r": r, "z": z, "n": torch.tanh(xn + r * q), "q": q}, None


def _backward(rule, m, args, ctx, st_out, need, want, mode, sign=None, full=False):
    """BPTT of columns (``mode="columns"``) or of LeCun's (d, g) through every layer and
    direction, from the last layer down; returns the states of the inputs and the parameter
    terms (attr → tensor)."""
    from .recurrent_backward import run_backward

    return run_backward(rule, m, args, ctx, st_out, need, want, mode, sign, full)


_RNN_TANH, _RNN_RELU = RNNRule(), RNNRule()
_RNN_RELU.nonlinearity = "relu"


class _RNNDispatch(RNNRule):
    """nn.RNN: tanh or relu by the module's ``nonlinearity``."""

    def _for(self, m):
        return _RNN_RELU if m.nonlinearity == "relu" else _RNN_TANH

    def forward_ctx(self, m, args, kwargs):
        return self._for(m).forward_ctx(m, args, kwargs)

    def graph_columns(self, m, *a, **k):
        return self._for(m).graph_columns(m, *a, **k)

    def graph_lecun(self, m, *a, **k):
        return self._for(m).graph_lecun(m, *a, **k)


register(nn.RNN, _RNNDispatch())
register(nn.LSTM, LSTMRule())
register(nn.GRU, GRURule())
_ = _column_square_sum
