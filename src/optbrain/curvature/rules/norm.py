"""Rules of the normalisation layers: LayerNorm (non-linear in its input) and BatchNorm in eval
mode (an affine map per channel with its running statistics).

LayerNorm, per row x of the normalised size n (σ² the row's variance plus eps, x̂ = (x − μ)/σ,
y = γ ⊙ x̂ + β), has the Jacobian ∂y_l/∂x_i = γ_l (δ_li − 1/n − x̂_l x̂_i / n) / σ, so LeCun's
propagation of a diagonal d is, with d' = d γ² / σ²,

    (J∘J)ᵀd = d' ⊙ (1 − 2(1 + x̂²)/n) + (Σd' + 2x̂ Σd'x̂ + x̂² Σd'x̂²) / n²,

and the diagonal of the second-order residual Σ_l g_l ∂²y_l/∂x_i² (the full variant; u = g γ,
c = Σ u x̂, A = u − mean(u) − x̂ c / n) is −((1 − (1 + x̂²)/n) c + 2 x̂ A) / (n σ²).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Rule, register
from .layers import _column_square_sum


class LayerNormRule(Rule):
    params = ("weight", "bias")
    last_dim = True
    mixes_curvature = True

    @staticmethod
    def _rows(m: nn.LayerNorm, x: Tensor) -> tuple[Tensor, Tensor, int]:
        """x̂ and 1/σ per row, rows over the normalised trailing dimensions (flattened)."""
        k = len(m.normalized_shape)
        flat = x.flatten(-k) if k > 1 else x
        mu = flat.mean(-1, keepdim=True)
        var = (flat - mu).square().mean(-1, keepdim=True)
        inv = torch.rsqrt(var + m.eps)
        return (flat - mu) * inv, inv, flat.shape[-1]

    @staticmethod
    def _gamma(m: nn.LayerNorm, like: Tensor) -> Tensor | None:
        return None if m.weight is None else m.weight.reshape(-1).to(like)

    def _flat(self, m, t: Tensor) -> Tensor:
        k = len(m.normalized_shape)
        return t.flatten(-k) if k > 1 else t

    def vjp(self, m: nn.LayerNorm, x: Tensor, cols: Tensor) -> Tensor:
        xh, inv, n = self._rows(m, x)
        c = self._flat(m, cols)
        gamma = self._gamma(m, x)
        if gamma is not None:
            c = c * gamma
        out = inv * (c - c.mean(-1, keepdim=True) - xh * (c * xh).mean(-1, keepdim=True))
        return out.reshape(cols.shape)

    def sq_vjp(self, m: nn.LayerNorm, x: Tensor, d: Tensor) -> Tensor:
        xh, inv, n = self._rows(m, x)
        dd = self._flat(m, d) * inv.square()
        gamma = self._gamma(m, x)
        if gamma is not None:
            dd = dd * gamma.square()
        s0 = dd.sum(-1, keepdim=True)
        s1 = (dd * xh).sum(-1, keepdim=True)
        s2 = (dd * xh.square()).sum(-1, keepdim=True)
        out = dd * (1 - 2 * (1 + xh.square()) / n) + (s0 + 2 * xh * s1 + xh.square() * s2) / n**2
        return out.reshape(d.shape)

    def residual(self, m: nn.LayerNorm, x: Tensor, g: Tensor) -> Tensor:
        """diag_i Σ_l g_l ∂²y_l/∂x_i² (see the module docstring)."""
        xh, inv, n = self._rows(m, x)
        u = self._flat(m, g)
        gamma = self._gamma(m, x)
        if gamma is not None:
            u = u * gamma
        c = (u * xh).sum(-1, keepdim=True)
        a = u - u.mean(-1, keepdim=True) - xh * c / n
        out = -((1 - (1 + xh.square()) / n) * c + 2 * xh * a) * inv.square() / n
        return out.reshape(g.shape)

    def diag_params(self, m: nn.LayerNorm, x: Tensor, d: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        dd = self._flat(m, d).reshape(-1, self._flat(m, d).shape[-1])
        if m.weight is not None:
            xh = self._rows(m, x)[0].reshape(dd.shape)
            out["weight"] = (dd * xh.square()).sum(0).reshape(m.weight.shape)
        if m.bias is not None:
            out["bias"] = dd.sum(0).reshape(m.bias.shape)
        return out

    def lecun(self, m, x, y, d, g, need_input):
        contrib = self.diag_params(m, x, d)
        if not need_input:
            return contrib, None, None
        d_in = self.sq_vjp(m, x, d)
        if g is None:
            return contrib, d_in, None
        return contrib, d_in + self.residual(m, x, g), self.vjp(m, x, g[None])[0]

    def sq_grads(self, m: nn.LayerNorm, x: Tensor, cols: Tensor, sign: Tensor | None):
        k, n = cols.shape[:2]
        xh = self._rows(m, x)[0].reshape(n, -1, self._flat(m, x).shape[-1])
        c = self._flat(m, cols).reshape(k, n, -1, xh.shape[-1])
        out: dict[str, Tensor] = {}
        if m.weight is not None:
            gw = (c * xh).sum(2)
            out["weight"] = _column_square_sum(gw, sign).sum(0).reshape(m.weight.shape)
        if m.bias is not None:
            out["bias"] = _column_square_sum(c.sum(2), sign).sum(0).reshape(m.bias.shape)
        return out


class BatchNormRule(Rule):
    """BatchNorm1d/2d/3d in eval mode: y = s ⊙ x + t per channel (axis 1), s = γ/√(var + eps)
    from the running statistics; γ multiplies x̂ = (x − mean)/√(var + eps), β adds."""

    params = ("weight", "bias")

    def refusal(self, m: nn.Module, mode: str) -> str | None:
        if m.running_mean is None or m.running_var is None:
            return (
                f"{type(m).__name__}(track_running_stats=False) normalises with the statistics "
                "of the batch, so samples are not independent"
            )
        return None

    def _stats(self, m: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        self.check(m)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        inv = torch.rsqrt(m.running_var.to(x) + m.eps).reshape(shape)
        return m.running_mean.to(x).reshape(shape), inv

    def forward(self, m: nn.Module, x: Tensor) -> Tensor:
        mean, inv = self._stats(m, x)
        w = 1.0 if m.weight is None else m.weight.reshape(mean.shape).to(x)
        b = 0.0 if m.bias is None else m.bias.reshape(mean.shape).to(x)
        return (x - mean) * inv * w + b

    def _scale(self, m, x: Tensor) -> Tensor:
        mean, inv = self._stats(m, x)
        return inv if m.weight is None else inv * m.weight.reshape(inv.shape).to(x)

    def vjp(self, m, x, cols):
        return cols * self._scale(m, x)

    def sq_vjp(self, m, x, d):
        return d * self._scale(m, x).square()

    def _xhat(self, m, x):
        mean, inv = self._stats(m, x)
        return (x - mean) * inv

    def diag_params(self, m, x, d):
        dims = [0] + list(range(2, d.dim()))
        out = {}
        if m.weight is not None:
            out["weight"] = (d * self._xhat(m, x).square()).sum(dims)
        if m.bias is not None:
            out["bias"] = d.sum(dims)
        return out

    def lecun_step(self, m, x2, d):
        """(``x2`` is x itself: the rule does not square its input.)"""
        return self.diag_params(m, x2, d), self.sq_vjp(m, x2, d)

    def sq_grads(self, m, x, cols, sign):
        xh = self._xhat(m, x)
        k, n = cols.shape[:2]
        spatial = tuple(range(3, cols.dim()))
        out = {}
        if m.weight is not None:
            gw = (cols * xh).sum(spatial) if spatial else cols * xh
            out["weight"] = _column_square_sum(gw, sign).sum(0)
        if m.bias is not None:
            gb = cols.sum(spatial) if spatial else cols
            out["bias"] = _column_square_sum(gb, sign).sum(0)
        return out


register(nn.LayerNorm, LayerNormRule())
for _c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register(_c, BatchNormRule())
