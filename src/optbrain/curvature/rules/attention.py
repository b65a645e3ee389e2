"""Multi-head attention, as the graph engine reads it: its decomposition into the functions it
computes (projections with ``F.linear`` on slices of the packed ``in_proj_weight``, per-head
scaled dot products, masks, softmax, the weighted sum, ``out_proj``), all on the module's own
parameters. The graph engine traces the decomposition in place of the module, so every estimator
passes through attention with the glue rules of those functions (LeCun: products and softmax;
columns: their exact vector-Jacobian products) and the parameters keep their names.

Dropout is off (eval mode); ``add_bias_kv`` and ``add_zero_attn`` are refused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import UnsupportedModuleError
from .base import Rule, register


class _Decomposed(nn.Module):
    """``nn.MultiheadAttention.forward`` written with functional calls on ``m``'s parameters."""

    def __init__(self, m: nn.MultiheadAttention):
        super().__init__()
        if m.bias_k is not None or m.add_zero_attn:
            raise UnsupportedModuleError(
                "nn.MultiheadAttention with add_bias_kv or add_zero_attn has no graph rule"
            )
        object.__setattr__(self, "m", m)  # not a submodule: its parameters stay the root's

    def _projections(self):
        m, e = self.m, self.m.embed_dim
        if m._qkv_same_embed_dim:
            w = m.in_proj_weight
            ws = (w[:e], w[e : 2 * e], w[2 * e :])
        else:
            ws = (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
        b = m.in_proj_bias
        bs = (None, None, None) if b is None else (b[:e], b[e : 2 * e], b[2 * e :])
        return ws, bs

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        m = self.m
        h, d = m.num_heads, m.head_dim
        if not m.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        ws, bs = self._projections()
        q = F.linear(query, ws[0], bs[0]).unflatten(-1, (h, d)).transpose(1, 2)
        k = F.linear(key, ws[1], bs[1]).unflatten(-1, (h, d)).transpose(1, 2)
        v = F.linear(value, ws[2], bs[2]).unflatten(-1, (h, d)).transpose(1, 2)
        scores = torch.matmul(q * (1.0 / math.sqrt(d)), k.transpose(-2, -1))  # N × H × L × S
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dim() == 2 else attn_mask.unflatten(0, (-1, h))
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(mask, float("-inf"))
            else:
                scores = scores + mask
        if key_padding_mask is not None:
            kpm = key_padding_mask[:, None, None, :]
            if kpm.dtype == torch.bool:
                scores = scores.masked_fill(kpm, float("-inf"))
            else:
                scores = scores + kpm
        attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).flatten(-2)  # N × L × E
        out = F.linear(out, m.out_proj.weight, m.out_proj.bias)
        if not m.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, (attn.mean(dim=1) if average_attn_weights else attn)


class AttentionRule(Rule):
    """``nn.MultiheadAttention``: the graph engine traces :meth:`decompose` in its place; the
    chain engine does not take it (it has several inputs)."""

    params = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight",
              "v_proj_weight", "out_proj.weight", "out_proj.bias")  # fmt: skip

    @staticmethod
    def decompose(m: nn.MultiheadAttention) -> nn.Module:
        return _Decomposed(m)

    def forward(self, m, x):
        raise UnsupportedModuleError("nn.MultiheadAttention takes query, key and value")


register(nn.MultiheadAttention, AttentionRule())
