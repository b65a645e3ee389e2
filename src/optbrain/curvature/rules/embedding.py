"""The rule of ``nn.Embedding``: row v of the weight is the output wherever the input index is
v, so it enters the output linearly with coefficient 1 at each such position (LeCun: the row's
diagonal sums d over those positions; columns: a sample's gradient of row v sums the columns at
its positions holding v, then squares)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...errors import UnsupportedModuleError
from .base import Rule, register


class EmbeddingRule(Rule):
    params = ("weight",)
    last_dim = True

    def refusal(self, m: nn.Embedding, mode: str) -> str | None:
        if m.max_norm is not None:
            return "nn.Embedding(max_norm=...) renormalises its weight in the forward pass"
        return None

    def forward(self, m: nn.Embedding, x: Tensor) -> Tensor:
        self.check(m)
        return m(x)

    def vjp(self, m, x, cols):
        raise UnsupportedModuleError("an embedding's input (indices) has no derivative")

    def sq_vjp(self, m, x, d):
        raise UnsupportedModuleError("an embedding's input (indices) has no derivative")

    def _scatter(self, m: nn.Embedding, idx: Tensor, values: Tensor) -> Tensor:
        out = torch.zeros(m.weight.shape, dtype=values.dtype, device=values.device)
        out.index_add_(0, idx, values)
        if m.padding_idx is not None:
            out[m.padding_idx] = 0
        return out

    def diag_params(self, m: nn.Embedding, x: Tensor, d: Tensor) -> dict[str, Tensor]:
        idx = x.reshape(-1)
        return {"weight": self._scatter(m, idx, d.reshape(-1, d.shape[-1]))}

    def lecun(self, m, x, y, d, g, need_input):
        return self.diag_params(m, x, d), None, None

    def sq_grads(self, m: nn.Embedding, x: Tensor, cols: Tensor, sign: Tensor | None):
        """Per sample, the columns summed over the positions of each distinct index, squared."""
        k, n = cols.shape[:2]
        idx = x.reshape(n, -1)
        pos = idx.shape[1]
        key = (torch.arange(n, device=idx.device)[:, None] * m.num_embeddings + idx).reshape(-1)
        uniq, inverse = torch.unique(key, return_inverse=True)
        c = cols.reshape(k, n * pos, cols.shape[-1])
        sums = torch.zeros(k, uniq.numel(), cols.shape[-1], dtype=cols.dtype, device=cols.device)
        sums.index_add_(1, inverse, c)
        sq = sums.square()
        if sign is not None:
            owner = torch.div(uniq, m.num_embeddings, rounding_mode="floor")
            sq = sq * sign[:, owner, None]
        rows = torch.remainder(uniq, m.num_embeddings)
        return {"weight": self._scatter(m, rows, sq.sum(0))}


register(nn.Embedding, EmbeddingRule())
