"""Back-propagation through time for the recurrent rules (:mod:`.recurrent`): columns (for the
GGN and Fisher estimators) or LeCun's (diagonal, gradient) pair, one step function per cell kind
and mode, layers from the last down, both directions."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import _column_square_sum, squared_sample_grads


# ============================================================================ per-time coefficients
# The backward steps are linear in the incoming cotangents (and in LeCun's (d, g)); every factor
# that depends only on the forward values is computed for all time steps at once, so that a
# step is a handful of tensor operations.
def _d1(kind: str, y: Tensor) -> Tensor:
    return y * (1 - y) if kind == "sig" else 1 - y * y


def _d2(kind: str, y: Tensor) -> Tensor:
    d1 = _d1(kind, y)
    return d1 * (1 - 2 * y) if kind == "sig" else -2 * y * d1


def _act_coefs(rule, s):
    if rule.nonlinearity == "tanh":
        return _d1("tanh", s["h"]), _d2("tanh", s["h"])
    a = s["a"]
    return (a > 0).to(a.dtype), torch.zeros_like(a)


def _coefs_cols(rule, lay):
    s, kind = lay.saved, type(rule).__name__
    if kind == "RNNRule":
        return {"A": _act_coefs(rule, s)[0]}
    if kind == "LSTMRule":
        i, f, g, o, tc = s["i"], s["f"], s["g"], s["o"], s["tc"]
        return {
            "A": o * _d1("tanh", tc),
            "S": torch.cat(
                [
                    g * _d1("sig", i),
                    lay.c_prev * _d1("sig", f),
                    i * _d1("tanh", g),
                    tc * _d1("sig", o),
                ],
                -1,
            ),  # fmt: skip
            "F": f,
        }
    r, z, n, q = s["r"], s["z"], s["n"], s["q"]
    c1 = (1 - z) * _d1("tanh", n)
    c2 = c1 * q * _d1("sig", r)
    c3 = (lay.h_prev - n) * _d1("sig", z)
    return {"IH": torch.cat([c2, c3, c1], -1), "HH": torch.cat([c2, c3, c1 * r], -1), "Z": z}


def _step_cols(kind, c, t, cur, dc, w_hh, out_ih, out_hh):
    """One step, columns K × N × …: writes the gate cotangents for W_ih and W_hh into
    ``out_ih`` / ``out_hh`` and returns (dh₋, dc₋)."""
    if kind == "RNNRule":
        torch.mul(cur, c["A"][:, t], out=out_ih)
        return out_ih @ w_hh, None
    h = cur.shape[-1]
    if kind == "LSTMRule":
        dcc = cur * c["A"][:, t] if dc is None else torch.addcmul(dc, cur, c["A"][:, t])
        s = c["S"][:, t]
        gates = out_ih.unflatten(-1, (4, h))
        torch.mul(dcc.unsqueeze(-2), s[..., : 3 * h].unflatten(-1, (3, h)), out=gates[..., :3, :])
        torch.mul(cur, s[..., 3 * h :], out=gates[..., 3, :])
        return out_ih @ w_hh, dcc * c["F"][:, t]
    ih, hh = out_ih.unflatten(-1, (3, h)), out_hh.unflatten(-1, (3, h))
    torch.mul(cur.unsqueeze(-2), c["IH"][:, t].unflatten(-1, (3, h)), out=ih)
    torch.mul(cur.unsqueeze(-2), c["HH"][:, t].unflatten(-1, (3, h)), out=hh)
    return _addmm_like(cur * c["Z"][:, t], out_hh, w_hh), None


def _coefs_lecun(rule, lay, full, grad):
    """Coefficients of LeCun's step: D_a = P·(d) + Q·(g) per gate, g_a = G·(g); the gradient's
    (G, Q) only where the step carries one (``grad``; Q only in the ``full`` variant)."""
    s, kind = lay.saved, type(rule).__name__
    if kind == "RNNRule":
        d1, d2 = _act_coefs(rule, s)
        return {"P": d1 * d1, "Q": d2, "G": d1}
    if kind == "LSTMRule":
        return _coefs_lecun_lstm(s, lay.c_prev, full, grad)
    # GRU: formed step by step from the saved gates (N × 3H a step, not N × T × 3H at once)
    return {"gru": (s, lay.h_prev, full, grad)}


def _gru_coefs_at(s, hp, full, grad, t):
    """A GRU's LeCun coefficients at step t. W_hh's are W_ih's with the candidate block times
    r (G) or r² (P, Q)."""
    r, z, n, q, hp = s["r"][:, t], s["z"][:, t], s["n"][:, t], s["q"][:, t], hp[:, t]
    dn, dr, dz = _d1("tanh", n), _d1("sig", r), _d1("sig", z)
    gn = dn * (1 - z)
    pn = gn.square()
    out = {
        "P": torch.cat([(dr * q).square() * pn, dz.square() * (n * n + hp * hp), pn], -1),
        "Z2": z * z, "R2": r * r,
    }  # fmt: skip
    if grad:
        out.update(G=torch.cat([dr * q * gn, dz * (hp - n), gn], -1), Z=z, R=r)
    if full:
        qn = _d2("tanh", n) * (1 - z)
        out["Q"] = torch.cat(
            [(dr * q).square() * qn + _d2("sig", r) * q * gn, _d2("sig", z) * (hp - n), qn], -1
        )
    return out


def _coefs_lecun_lstm(s, cp, full, grad):
    i, f, g, o, tc = s["i"], s["f"], s["g"], s["o"], s["tc"]
    t1 = _d1("tanh", tc)
    gate = torch.cat([g * _d1("sig", i), cp * _d1("sig", f), i * _d1("tanh", g),
                      tc * _d1("sig", o)], -1)  # fmt: skip
    out = {"Ac": (t1 * o).square(), "F2": f * f, "P": gate.square()}
    if grad:
        out.update(Gc=t1 * o, F=f, G=gate)
    if full:
        out["Bc"] = _d2("tanh", tc) * o
        out["Q"] = torch.cat([_d2("sig", i) * g, _d2("sig", f) * cp, _d2("tanh", g) * i,
                              _d2("sig", o) * tc], -1)  # fmt: skip
    return out


def _step_lecun(kind, c, t, d, g, dc, gc, w_hh, w2, full):
    """LeCun's step: (D_a for W_ih, D_a for W_hh, g_a for W_ih, D_h₋, g_h₋, D_c₋, g_c₋)."""
    if kind == "RNNRule":
        da = d * c["P"][:, t]
        if full:
            da = torch.addcmul(da, g, c["Q"][:, t])
        ga = None if g is None else g * c["G"][:, t]
        return da, da, ga, da @ w2, (None if ga is None else ga @ w_hh), None, None
    if kind == "LSTMRule":
        return _step_lecun_lstm(c, t, d, g, dc, gc, w_hh, w2, full)
    return _step_lecun_gru(c, t, d, g, w_hh, w2, full)


def _step_lecun_lstm(c, t, d, g, dc, gc, w_hh, w2, full):
    d_c = d * c["Ac"][:, t] if dc is None else torch.addcmul(dc, d, c["Ac"][:, t])
    g_c = None
    if g is not None:
        g_c = g * c["Gc"][:, t] if gc is None else torch.addcmul(gc, g, c["Gc"][:, t])
        if full:
            d_c = torch.addcmul(d_c, g, c["Bc"][:, t])
    da = torch.cat([d_c, d_c, d_c, d], -1).mul_(c["P"][:, t])
    ga = None
    if g is not None:
        both = torch.cat([g_c, g_c, g_c, g], -1)
        ga = both * c["G"][:, t]
        if full:
            da.addcmul_(both, c["Q"][:, t])
    return (da, da, ga, da @ w2, (None if ga is None else ga @ w_hh), d_c * c["F2"][:, t],
            None if g_c is None else g_c * c["F"][:, t])  # fmt: skip


def _step_lecun_gru(c, t, d, g, w_hh, w2, full):
    h = d.shape[-1]
    c = _gru_coefs_at(*c["gru"], t)
    da_ih = torch.cat([d, d, d], -1).mul_(c["P"])
    ga_ih = g_h = None
    if g is not None:
        grep = torch.cat([g, g, g], -1)
        ga_ih = grep * c["G"]
        if full:
            da_ih.addcmul_(grep, c["Q"])
        ga_hh = ga_ih.clone()
        ga_hh[..., 2 * h :].mul_(c["R"])
        g_h = _addmm_like(g * c["Z"], ga_hh, w_hh)
    # D_a for W_hh is D_a for W_ih with the candidate block times r²: never stored (None)
    d_h = _addmm_like(d * c["Z2"], da_ih[..., : 2 * h], w2[: 2 * h])
    d_h = _addmm_like(d_h, da_ih[..., 2 * h :] * c["R2"], w2[2 * h :])
    return da_ih, None, ga_ih, d_h, g_h, None, None


def _addmm_like(base: Tensor, a: Tensor, w: Tensor) -> Tensor:
    """base + a @ w for a with any leading dimensions."""
    return base + a @ w


# ============================================================================ the sweep
def run_backward(rule, m, args, ctx, st_out, need, want, mode, sign, full):
    """See :func:`optbrain.curvature.rules.recurrent._backward`."""
    kind = type(rule).__name__
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
                res = _bptt_cols(kind, rule, lay, incoming, fin_h, fin_c, w_hh)
                da_ih, da_hh, carry_h, carry_c = res
                _col_params(params, want, sfx, lay, da_ih, da_hh, b_ih, b_hh, sign)
                dx = da_ih @ w_ih
            else:
                res = _bptt_lecun(kind, rule, lay, incoming, fin_h, fin_c, w_hh, full)
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


def _bptt_cols(kind, rule, lay, incoming, fin_h, fin_c, w_hh):
    """Columns through time; returns the gate cotangents of every step (K, N, T, G) and the
    carries left at the initial states."""
    t_len = lay.x.shape[1]
    coef = _coefs_cols(rule, lay)
    dh, dc = fin_h, fin_c
    k = next(v.shape[0] for v in (incoming, fin_h, fin_c) if v is not None)
    if dh is None:
        dh = lay.x.new_zeros(k, lay.x.shape[0], lay.h_prev.shape[-1])
    g = w_hh.shape[0]
    da_ih = dh.new_empty(k, lay.x.shape[0], t_len, g)
    da_hh = da_ih if kind != "GRURule" else torch.empty_like(da_ih)
    for t in range(t_len - 1, -1, -1):
        cur = dh if incoming is None else dh + incoming[:, :, t]
        dh, dc = _step_cols(kind, coef, t, cur, dc, w_hh, da_ih[:, :, t], da_hh[:, :, t])
    return da_ih, da_hh, dh, dc


def _bptt_lecun(kind, rule, lay, incoming, fin_h, fin_c, w_hh, full):
    """LeCun's (d, g) through time; returns D_a for W_ih and W_hh and g_a for W_ih of every step
    (N, T, G) and the carries left at the initial states (GRU: D_a for W_hh is None, see
    :func:`_lecun_params`)."""
    t_len = lay.x.shape[1]
    zeros = lay.x.new_zeros(lay.x.shape[0], lay.h_prev.shape[-1])
    dh, gh = fin_h if fin_h is not None else (zeros, None)
    dc, gc = fin_c if fin_c is not None else (None, None)
    if full and gh is None:  # the full variant carries the gradient everywhere
        gh = zeros
    grad = gh is not None or (incoming is not None and incoming[1] is not None)
    coef = _coefs_lecun(rule, lay, full, grad)
    w2 = w_hh.square()
    da_ih = da_hh = ga_ih = None
    for t in range(t_len - 1, -1, -1):
        d_cur, g_cur = dh, gh
        if incoming is not None:
            d_cur = d_cur + incoming[0][:, t]
            if incoming[1] is not None:
                g_cur = incoming[1][:, t] if g_cur is None else g_cur + incoming[1][:, t]
        a_ih, a_hh, g_ih, dh, gh, dc, gc = _step_lecun(
            kind, coef, t, d_cur, g_cur, dc, gc, w_hh, w2, full
        )
        if da_ih is None:  # the per-step results go straight into (N, T, G) tensors
            da_ih = a_ih.new_empty(a_ih.shape[0], t_len, a_ih.shape[1])
            da_hh = da_ih if a_hh is a_ih else (None if a_hh is None else torch.empty_like(da_ih))
            ga_ih = None if g_ih is None else torch.empty_like(da_ih)
        da_ih[:, t] = a_ih
        if da_hh is not None and da_hh is not da_ih:
            da_hh[:, t] = a_hh
        if ga_ih is not None:
            ga_ih[:, t] = g_ih
    return da_ih, da_hh, ga_ih, (dh, gh), (None if dc is None else (dc, gc))


def _col_params(params, want, sfx, lay, da_ih, da_hh, b_ih, b_hh, sign):
    """Per-sample gradients summed over time, then squared (K, N, T, G columns)."""
    if "weight_ih" + sfx in want:
        params["weight_ih" + sfx] = squared_sample_grads(da_ih, lay.x, sign)
    if "weight_hh" + sfx in want:
        params["weight_hh" + sfx] = squared_sample_grads(da_hh, lay.h_prev, sign)
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
    if b_ih is not None and "bias_ih" + sfx in want:
        params["bias_ih" + sfx] = da_ih.reshape(-1, g).sum(0)
    wanted = "weight_hh" + sfx in want, b_hh is not None and "bias_hh" + sfx in want
    if not any(wanted):
        return
    parts = [da_hh] if da_hh is not None else _gru_hh_parts(lay, da_ih)
    if wanted[0]:
        h2 = lay.h_prev.square().reshape(-1, lay.h_prev.shape[-1])
        params["weight_hh" + sfx] = torch.cat([a.reshape(-1, a.shape[-1]).T @ h2 for a in parts])
    if wanted[1]:
        params["bias_hh" + sfx] = torch.cat([a.reshape(-1, a.shape[-1]).sum(0) for a in parts])


def _gru_hh_parts(lay, da_ih: Tensor) -> list[Tensor]:
    """A GRU's D_a for W_hh from W_ih's: the reset and update blocks as they are, the candidate
    block times r² (r multiplies W_hh's candidate pre-activation only)."""
    h = da_ih.shape[-1] // 3
    return [da_ih[..., : 2 * h], da_ih[..., 2 * h :] * lay.saved["r"].square()]


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
