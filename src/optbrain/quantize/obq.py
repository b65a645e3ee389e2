"""OBQ (Frantar & Alistarh 2022, "Optimal Brain Compression"): exact greedy quantisation, one
weight at a time, each row on its own (PAPERS.md §11.1, §14.5).

Every row w of a layer is an independent quadratic ½δᵀHδ with the layer's H (damped, dead
inputs regularised as in :func:`optbrain.layerwise.prepare_layer`). OBQ keeps the row's inverse
H⁻¹ over the weights not yet quantised and repeats: pick

    q = argmin_j (quant(w_j) − w_j)² / [H⁻¹]_jj,

fix w_q at quant(w_q), move the others by the OBS update −(w_q − quant(w_q))/[H⁻¹]_qq · H⁻¹_{:,q}
(the exact least-squares re-fit of the rest) and remove q from H⁻¹ by one Gaussian-elimination
step H⁻¹ −= H⁻¹_{:,q} H⁻¹_{q,:}/[H⁻¹]_qq. With ``outliers=True`` (the authors' code) a row
that has a weight pushed outside its grid's range (|w − quant(w)| > scale/2) quantises the one
with the largest error first. Grids are fitted on the original weights before the first step
(per row, or per group of consecutive columns), since the greedy order has no column order.
Entries outside ``kept`` are quantised to 0 before all others.

Rows run in parallel in chunks (each row needs its own k × k inverse), cost
O(rows · k³): the solver for small layers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..pruners.layerwise import CHUNK_BYTES, damped_inverse, prepare_layer
from .base import Quantizer, refuse_act_order
from .grid import QuantSpec, fit_grid, group_count, quantize_codes
from .result import QuantizedMatrix

__all__ = ["OBQ", "obq"]


def static_grids(W: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor]:
    """(scale, zero) of shape rows × groups fitted on ``W`` by natural column order, and g_idx."""
    rows, k = W.shape
    g = k if spec.group_size is None else spec.group_size
    n_groups = group_count(k, spec.group_size)
    scale = torch.empty(rows, n_groups, dtype=W.dtype, device=W.device)
    zero = torch.empty_like(scale)
    for i in range(n_groups):
        scale[:, i], zero[:, i] = fit_grid(W[:, i * g : (i + 1) * g], spec.bits, spec.sym)
    return scale, zero, torch.arange(k, device=W.device) // g


def obq(
    W: Tensor,
    H: Tensor,
    spec: QuantSpec,
    *,
    damping: float = 0.01,
    dead: Tensor | None = None,
    kept: Tensor | None = None,
    outliers: bool = True,
    chunk_bytes: int = CHUNK_BYTES,
) -> QuantizedMatrix:
    """OBQ on ``W`` (rows × k) with calibration Hessian ``H`` (k × k) in ``W``'s dtype."""
    rows, k = W.shape
    W, _, _ = prepare_layer(W, H, damping, dead)
    Hinv, lam = damped_inverse(H if dead is None else _dead_fixed(H, dead), damping, W.dtype)
    scale, zero, g_idx = static_grids(W, spec)
    s_full, z_full = scale[:, g_idx], zero[:, g_idx]
    forced = torch.zeros_like(W, dtype=torch.bool) if kept is None else ~kept.to(torch.bool)
    codes = torch.empty_like(W)
    step = max(1, int(chunk_bytes // (k * k * W.element_size())))
    for r0 in range(0, rows, step):
        sl = slice(r0, min(r0 + step, rows))
        codes[sl] = _greedy_rows(
            W[sl].clone(), Hinv, s_full[sl], z_full[sl], forced[sl], spec.maxq, outliers
        )
    return QuantizedMatrix(
        codes.to(torch.uint8),
        scale,
        zero.to(torch.uint8),
        g_idx,
        lam,
        None if kept is None else ~forced,
    )


def _dead_fixed(H: Tensor, dead: Tensor) -> Tensor:
    """H with the given dead inputs' diagonal set to 0, so damped_inverse regularises them."""
    H = H.clone()
    H.diagonal()[dead] = 0.0
    return H


def _greedy_rows(
    w: Tensor, Hinv: Tensor, s: Tensor, z: Tensor, forced: Tensor, maxq: int, outliers: bool
) -> Tensor:
    """OBQ on a chunk of rows in parallel; returns their codes (as ``w``'s dtype)."""
    R, k = w.shape
    H = Hinv.expand(R, k, k).clone()
    idx = torch.arange(R, device=w.device)
    done = torch.zeros_like(w, dtype=torch.bool)
    codes = torch.empty_like(w)
    threshold = 0.25 * s.square()  # |w − q| > s/2: the weight lies outside its grid's range
    tiny = torch.finfo(w.dtype).tiny
    for _ in range(k):
        c = quantize_codes(w, s, z, maxq)
        c = torch.where(forced, z, c)  # pruned entries go to 0 (code = zero)
        q = (c - z) * s
        err = torch.where(done, 0.0, (w - q).square())
        d = H.diagonal(dim1=1, dim2=2).clamp_min(tiny)
        score = torch.where(done, math.inf, err / d)
        score = torch.where(forced & ~done, -math.inf, score)
        j = score.argmin(1)
        if outliers:
            out = (err > threshold).any(1) & ~(forced & ~done).any(1)
            j = torch.where(out, err.argmax(1), j)
        dj, qj = d[idx, j], q[idx, j]
        col = H[idx, :, j]  # R × k (H⁻¹ is symmetric)
        w -= col * ((w[idx, j] - qj) / dj)[:, None]
        w[idx, j] = qj  # exactly on the grid despite rounding
        codes[idx, j] = c[idx, j]
        done[idx, j] = True
        H.baddbmm_((col / dj[:, None])[:, :, None], col[:, None, :], alpha=-1.0)
    return codes


class OBQ(Quantizer):
    """OBQ quantiser (exact greedy per row; small layers): ``OBQ(bits=4, group_size=None,
    sym=False, damping=0.01, outliers=True).apply(model, calibration)``. Grids are static (fitted
    before quantising); ``act_order=True`` is refused (OBQ's order is its greedy choice)."""

    method = "obq"

    def __init__(self, bits: int = 4, *, outliers: bool = True, **kwargs):
        super().__init__(bits, **kwargs)
        refuse_act_order(self.spec, "OBQ", "it quantises in its own greedy order")
        if not isinstance(outliers, bool):
            raise TypeError(f"outliers must be a bool, not {outliers!r}")
        self.outliers = outliers

    def quantize_matrix(
        self, W: Tensor, H: Tensor | None, dead: Tensor | None, kept: Tensor | None
    ) -> QuantizedMatrix:
        return obq(
            W, H, self.spec, damping=self.damping, dead=dead, kept=kept, outliers=self.outliers
        )
