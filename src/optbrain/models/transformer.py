"""A small decoder-only (GPT-style) character-level transformer with ``nn.Linear`` projections.

Pre-LayerNorm blocks as in GPT-2 / OPT: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``; causal
multi-head self-attention whose query, key, value and output projections are separate
``nn.Linear`` modules (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, the names OPT uses), an
MLP ``fc1`` → GELU → ``fc2``, learned position embeddings, a final LayerNorm and an untied
``nn.Linear`` head. Every projection is a plain ``nn.Linear`` so that layer-wise compression
(:mod:`optbrain.pruners.layerwise`, :mod:`optbrain.quantize`) sees each one through forward hooks.

``model(x)`` takes token ids ``(B, T)`` (T ≤ ``context``) and returns logits ``(B, T, vocab)``;
:class:`SequenceCrossEntropy` is the matching next-token loss.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CharTransformer", "SequenceCrossEntropy", "TransformerConfig"]


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes of a :class:`CharTransformer`."""

    vocab: int
    context: int = 128
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0

    def validate(self) -> None:
        for key in ("vocab", "context", "width", "layers", "heads", "mlp_ratio"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, not {value!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    """Causal multi-head self-attention with four ``nn.Linear`` projections."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        h = self.heads

        def split(t: Tensor) -> Tensor:
            return t.view(B, T, h, C // h).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """One pre-LN transformer block."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width)
        self.attn = Attention(cfg.width, cfg.heads, cfg.dropout)
        self.ln2 = nn.LayerNorm(cfg.width)
        hidden = cfg.mlp_ratio * cfg.width
        self.fc1 = nn.Linear(cfg.width, hidden)
        self.fc2 = nn.Linear(hidden, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class CharTransformer(nn.Module):
    """Decoder-only transformer over ``vocab`` token ids (see the module docstring)."""

    def __init__(self, cfg: TransformerConfig, seed: int | None = None):
        super().__init__()
        cfg.validate()
        self.config = cfg
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.tok = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab)
        self._init(gen)

    @torch.no_grad()
    def _init(self, gen: torch.Generator | None) -> None:
        """GPT-2's initialisation: N(0, 0.02²), residual projections scaled by 1/√(2·layers)."""
        std_res = 0.02 / math.sqrt(2 * self.config.layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                if name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()
                continue
            std = std_res if name.endswith(("out_proj.weight", "fc2.weight")) else 0.02
            p.copy_(torch.randn(p.shape, generator=gen) * std)

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.shape[-1]
        if T > self.config.context:
            raise ValueError(f"{T} tokens are more than the context of {self.config.context}")
        pos = torch.arange(T, device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class SequenceCrossEntropy(nn.Module):
    """Mean next-token cross-entropy of logits ``(B, T, V)`` against targets ``(B, T)``."""

    reduction = "mean"

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
