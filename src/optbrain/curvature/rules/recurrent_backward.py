"""Back-propagation through time for the recurrent rules (:mod:`.recurrent`): columns (for the
GGN and Fisher estimators) or LeCun's (diagonal, gradient) pair, one step function per cell kind
and mode, layers from the last down, both directions."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import _column_square_sum


def _sig(s: Tensor) -> tuple[Tensor, Tensor]:
    d1 = s * (1 - s)
    return d1, d1 * (1 - 2 * s)


def _tanh(t: Tensor) -> tuple[Tensor, Tensor]:
    d1 = 1 - t * t
    return d1, -2 * t * d1


def _at(saved: dict[str, Tensor], t: int) -> dict[str, Tensor]:
    return {k: v[:, t] for k, v in saved.items()}


# ============================================================================ columns: one step
def _cols_rnn(rule, s, h_prev, c_prev, dh, dc, w_hh):
    d1 = _tanh(s["h"])[0] if rule.nonlinearity == "tanh" else (s["a"] > 0).to(dh.dtype)
    da = dh * d1
    return da, da, da @ w_hh, None


def _cols_lstm(rule, s, h_prev, c_prev, dh, dc, w_hh):
    i, f, g, o, tc = s["i"], s["f"], s["g"], s["o"], s["tc"]
    dcc = dh * o * (1 - tc * tc)
    if dc is not None:
        dcc = dcc + dc
    da = torch.cat(
        [dcc * g * _sig(i)[0], dcc * c_prev * _sig(f)[0], dcc * i * (1 - g * g),
         dh * tc * _sig(o)[0]], -1,
    )  # fmt: skip
    return da, da, da @ w_hh, dcc * f


def _cols_gru(rule, s, h_prev, c_prev, dh, dc, w_hh):
    r, z, n, q = s["r"], s["z"], s["n"], s["q"]
    dan = dh * (1 - z) * (1 - n * n)
    dar = dan * q * _sig(r)[0]
    daz = dh * (h_prev - n) * _sig(z)[0]
    da_hh = torch.cat([dar, daz, dan * r], -1)
    return torch.cat([dar, daz, dan], -1), da_hh, dh * z + da_hh @ w_hh, None


# ============================================================================ LeCun: one step
def _lecun_rnn(rule, s, h_prev, c_prev, dh, gh, dc, gc, w_hh, w2, full):
    if rule.nonlinearity == "tanh":
        d1, d2 = _tanh(s["h"])
    else:
        d1, d2 = (s["a"] > 0).to(dh.dtype), torch.zeros_like(dh)
    da = d1.square() * dh
    ga = None
    if gh is not None:
        ga = d1 * gh
        if full:
            da = da + d2 * gh
    return da, da, ga, ga, da @ w2, (None if ga is None else ga @ w_hh), None, None


def _act(d1d2, d, g, full):
    d1, d2 = d1d2
    out = d1.square() * d
    if full and g is not None:
        out = out + d2 * g
    return out, (None if g is None else d1 * g)


def _mul(a, g):
    return None if g is None else a * g


def _lecun_lstm(rule, s, h_prev, c_prev, dh, gh, dc, gc, w_hh, w2, full):
    i, f, g, o, tc = s["i"], s["f"], s["g"], s["o"], s["tc"]
    d_o, d_tc = tc.square() * dh, o.square() * dh
    g_o, g_tc = _mul(tc, gh), _mul(o, gh)
    d_c, g_c = _act(_tanh(tc), d_tc, g_tc, full)
    if dc is not None:
        d_c = d_c + dc
    if gc is not None:
        g_c = gc if g_c is None else g_c + gc
    d_f, d_cp, d_i, d_g = (
        c_prev.square() * d_c,
        f.square() * d_c,
        g.square() * d_c,
        i.square() * d_c,
    )
    g_f, g_cp, g_i, g_g = _mul(c_prev, g_c), _mul(f, g_c), _mul(g, g_c), _mul(i, g_c)
    parts = [_act(_sig(i), d_i, g_i, full), _act(_sig(f), d_f, g_f, full),
             _act(_tanh(g), d_g, g_g, full), _act(_sig(o), d_o, g_o, full)]  # fmt: skip
    da = torch.cat([p[0] for p in parts], -1)
    ga = None if gh is None else torch.cat([p[1] for p in parts], -1)
    return da, da, ga, ga, da @ w2, (None if ga is None else ga @ w_hh), d_cp, g_cp


def _lecun_gru(rule, s, h_prev, c_prev, dh, gh, dc, gc, w_hh, w2, full):
    """h = (1 − z) ⊙ n + z ⊙ h₋: two products (z feeds both)."""
    r, z, n, q = s["r"], s["z"], s["n"], s["q"]
    d_n, d_z, d_hd = (1 - z).square() * dh, (n.square() + h_prev.square()) * dh, z.square() * dh
    g_n, g_z, g_hd = _mul(1 - z, gh), _mul(h_prev - n, gh), _mul(z, gh)
    d_an, g_an = _act(_tanh(n), d_n, g_n, full)
    d_r, d_q = q.square() * d_an, r.square() * d_an
    g_r, g_q = _mul(q, g_an), _mul(r, g_an)
    d_ar, g_ar = _act(_sig(r), d_r, g_r, full)
    d_az, g_az = _act(_sig(z), d_z, g_z, full)
    da_ih, da_hh = torch.cat([d_ar, d_az, d_an], -1), torch.cat([d_ar, d_az, d_q], -1)
    ga_ih = ga_hh = None
    g_hp = None
    if gh is not None:
        ga_ih, ga_hh = torch.cat([g_ar, g_az, g_an], -1), torch.cat([g_ar, g_az, g_q], -1)
        g_hp = g_hd + ga_hh @ w_hh
    return da_ih, da_hh, ga_ih, ga_hh, d_hd + da_hh @ w2, g_hp, None, None


_STEPS = {
    "RNNRule": (_cols_rnn, _lecun_rnn),
    "LSTMRule": (_cols_lstm, _lecun_lstm),
    "GRURule": (_cols_gru, _lecun_gru),
}


# ============================================================================ the sweep
def run_backward(rule, m, args, ctx, st_out, need, want, mode, sign, full):
    """See :func:`optbrain.curvature.rules.recurrent._backward`."""
    cols_step, lecun_step = _STEPS[type(rule).__name__]
    lstm = isinstance(m, nn.LSTM)
    layers, dirs = ctx["layers"], ctx["dirs"]
    out_st, fin = (st_out.get(0), st_out.get(1)) if isinstance(st_out, dict) else (st_out, None)
    h_fin, c_fin = ((fin.get(0), fin.get(1)) if isinstance(fin, dict) else (None, None)) if lstm \
        else (fin, None)  # fmt: skip
    lead = 1 if mode == "columns" else 0
    pair = mode == "lecun"
    seq_out = _seq_state(out_st, m, pair)  # batch-first (K ×) N × T × D·H, or (d, g)
    params: dict[str, Tensor] = {}
    h0_states, c0_states = [None] * (m.num_layers * dirs), [None] * (m.num_layers * dirs)
    h = m.hidden_size
    for layer in range(m.num_layers - 1, -1, -1):
        below = None
        for direction in range(dirs):
            k = layer * dirs + direction
            w_ih, w_hh, b_ih, b_hh, sfx = rule._weights(m, layer, direction)
            lay = layers[layer][direction]
            sl = slice(direction * h, (direction + 1) * h)
            incoming = _slice(seq_out, sl, direction, pair)
            fin_h = _index(h_fin, k, pair)
            fin_c = _index(c_fin, k, pair)
            if mode == "columns":
                res = _bptt_cols(cols_step, rule, lay, incoming, fin_h, fin_c, w_hh)
                da_ih, da_hh, carry_h, carry_c = res
                _col_params(params, want, sfx, lay, da_ih, da_hh, b_ih, b_hh, sign)
                dx = da_ih @ w_ih
            else:
                res = _bptt_lecun(lecun_step, rule, lay, incoming, fin_h, fin_c, w_hh, full)
                da_ih, da_hh, ga_ih, carry_h, carry_c = res
                _lecun_params(params, want, sfx, lay, da_ih, da_hh, b_ih, b_hh)
                dx = (da_ih @ w_ih.square(), None if ga_ih is None else ga_ih @ w_ih)
            dx = _flip(dx, direction, pair, lead)
            below = dx if below is None else _add(below, dx, pair)
            h0_states[k], c0_states[k] = carry_h, carry_c
        seq_out = below
    return _input_states(m, args, seq_out, h0_states, c0_states, need, pair, lead), params


def _seq_state(st, m, pair):
    if st is None:
        return None
    if pair:
        d, g = st
        if not m.batch_first:
            d, g = d.transpose(0, 1), (None if g is None else g.transpose(0, 1))
        return d, g
    return st if m.batch_first else st.transpose(1, 2)


def _slice(st, sl, direction, pair):
    if st is None:
        return None
    if pair:
        d, g = st
        d = d[..., sl]
        g = None if g is None else g[..., sl]
        return (d.flip(1), None if g is None else g.flip(1)) if direction else (d, g)
    c = st[..., sl]
    return c.flip(2) if direction else c


def _flip(st, direction, pair, lead):
    if not direction:
        return st
    if pair:
        return st[0].flip(1), (None if st[1] is None else st[1].flip(1))
    return st.flip(1 + lead)


def _add(a, b, pair):
    if pair:
        return a[0] + b[0], (None if a[1] is None else a[1] + b[1])
    return a + b


def _index(st, k, pair):
    if st is None:
        return None
    if pair:
        return st[0][k], (None if st[1] is None else st[1][k])
    return st[:, k]


def _bptt_cols(step, rule, lay, incoming, fin_h, fin_c, w_hh):
    """Columns through time; returns the gate cotangents of every step (K, N, T, G) and the
    carries left at the initial states."""
    t_len = lay.x.shape[1]
    dh = fin_h
    dc = fin_c
    k = next(v.shape[0] for v in (incoming, fin_h, fin_c) if v is not None)
    if dh is None:
        dh = lay.x.new_zeros(k, lay.x.shape[0], lay.h_prev.shape[-1])
    da_ih, da_hh = [None] * t_len, [None] * t_len
    for t in range(t_len - 1, -1, -1):
        cur = dh if incoming is None else dh + incoming[:, :, t]
        s = _at(lay.saved, t)
        cp = None if lay.c_prev is None else lay.c_prev[:, t]
        da_ih[t], da_hh[t], dh, dc = step(rule, s, lay.h_prev[:, t], cp, cur, dc, w_hh)
    return torch.stack(da_ih, 2), torch.stack(da_hh, 2), dh, dc


def _bptt_lecun(step, rule, lay, incoming, fin_h, fin_c, w_hh, full):
    t_len = lay.x.shape[1]
    zeros = lay.x.new_zeros(lay.x.shape[0], lay.h_prev.shape[-1])
    dh, gh = fin_h if fin_h is not None else (zeros, None)
    dc, gc = fin_c if fin_c is not None else (None, None)
    if full and gh is None:  # the full variant carries the gradient everywhere
        gh = zeros
    w2 = w_hh.square()
    da_ih, da_hh, ga_ih = [None] * t_len, [None] * t_len, [None] * t_len
    for t in range(t_len - 1, -1, -1):
        d_cur, g_cur = dh, gh
        if incoming is not None:
            d_cur = d_cur + incoming[0][:, t]
            if incoming[1] is not None:
                g_cur = g_cur + incoming[1][:, t]
        s = _at(lay.saved, t)
        cp = None if lay.c_prev is None else lay.c_prev[:, t]
        out = step(rule, s, lay.h_prev[:, t], cp, d_cur, g_cur, dc, gc, w_hh, w2, full)
        da_ih[t], da_hh[t], ga_ih[t], _, dh, gh, dc, gc = out
    ga = None if ga_ih[0] is None else torch.stack(ga_ih, 1)
    return (
        torch.stack(da_ih, 1),
        torch.stack(da_hh, 1),
        ga,
        (dh, gh),
        (None if dc is None else (dc, gc)),
    )


def _col_params(params, want, sfx, lay, da_ih, da_hh, b_ih, b_hh, sign):
    """Per-sample gradients summed over time, then squared (K, N, T, G columns)."""
    if "weight_ih" + sfx in want:
        g = torch.einsum("kntg,nti->kngi", da_ih, lay.x)
        params["weight_ih" + sfx] = _column_square_sum(g, sign).sum(0)
    if "weight_hh" + sfx in want:
        g = torch.einsum("kntg,nth->kngh", da_hh, lay.h_prev)
        params["weight_hh" + sfx] = _column_square_sum(g, sign).sum(0)
    if b_ih is not None and "bias_ih" + sfx in want:
        params["bias_ih" + sfx] = _column_square_sum(da_ih.sum(2), sign).sum(0)
    if b_hh is not None and "bias_hh" + sfx in want:
        params["bias_hh" + sfx] = _column_square_sum(da_hh.sum(2), sign).sum(0)


def _lecun_params(params, want, sfx, lay, da_ih, da_hh, b_ih, b_hh):
    """LeCun's connection rule summed over samples and time steps."""
    g = da_ih.shape[-1]
    if "weight_ih" + sfx in want:
        x2 = lay.x.square()
        params["weight_ih" + sfx] = da_ih.reshape(-1, g).T @ x2.reshape(-1, x2.shape[-1])
    if "weight_hh" + sfx in want:
        h2 = lay.h_prev.square()
        params["weight_hh" + sfx] = da_hh.reshape(-1, g).T @ h2.reshape(-1, h2.shape[-1])
    if b_ih is not None and "bias_ih" + sfx in want:
        params["bias_ih" + sfx] = da_ih.reshape(-1, g).sum(0)
    if b_hh is not None and "bias_hh" + sfx in want:
        params["bias_hh" + sfx] = da_hh.reshape(-1, g).sum(0)


def _input_states(m, args, seq, h0s, c0s, need, pair, lead):
    """States for the call's arguments: the input sequence, then the initial state(s)."""
    out: list = [None] * len(args)
    if need and need[0] and seq is not None:
        if pair:
            d, g = seq
            out[0] = (d, g) if m.batch_first else (
                d.transpose(0, 1), None if g is None else g.transpose(0, 1)
            )  # fmt: skip
        else:
            out[0] = seq if m.batch_first else seq.transpose(1, 2)
    if len(args) > 1 and len(need) > 1 and need[1]:
        hs = _stack(h0s, pair, lead)
        out[1] = (hs, _stack(c0s, pair, lead)) if isinstance(m, nn.LSTM) else hs
    return out


def _stack(states, pair, lead):
    if any(s is None for s in states):
        return None
    if pair:
        gs = [s[1] for s in states]
        return torch.stack([s[0] for s in states]), (
            None if any(g is None for g in gs) else torch.stack(gs)
        )
    return torch.stack(states, lead)
