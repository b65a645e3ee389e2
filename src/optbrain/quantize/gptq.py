"""GPTQ (Frantar, Ashkboos, Hoefler & Alistarh 2023): quantise column by column, spreading each
column's rounding error over the columns not yet quantised (PAPERS.md §14.5).

For the layer-wise problem min ‖WX − ŴX‖² with H = 2XXᵀ/n, dead inputs (H_jj = 0) get H_jj = 1
and zero weights, λ = ``damping`` · mean(diag H) is added to the diagonal, and with U the upper
Cholesky factor of H⁻¹ (UᵀU = H⁻¹), every row is processed in one fixed column order:

    q_j = quant(w_j),   E_j = (w_j − q_j)/U_jj,   w_{j+1:} −= E_j U_{j, j+1:}

in lazy blocks of ``blocksize`` columns (Algorithm 1 of the paper). The loop is
:func:`optbrain.layerwise.column_sweep`, the one SparseGPT's pruning runs on; the rule here
picks grid points. Options (:class:`~optbrain.quantize.grid.QuantSpec`): ``act_order``
processes columns by decreasing diag H; ``group_size`` re-fits the row's grid every g columns on
the already error-updated weights (blocks are aligned with the groups so that a group's weights
are up to date when its grid is fitted); ``static_groups`` fits all grids on the original
weights, by natural column order, before permuting. Entries outside ``kept`` are set to 0 (the
grid point of code ``zero``) and their error is spread like any other: joint sparse + quantised
compression (:mod:`optbrain.quantize.joint`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..pruners.layerwise import ColumnRule, column_sweep, prepare_layer, upper_factor
from .base import Quantizer
from .grid import QuantSpec, fit_grid, group_count, quantize_codes
from .result import QuantizedMatrix

__all__ = ["GPTQ", "gptq"]


class _GridRule(ColumnRule):
    """Quantise each column to its row's grid (fitted per row, per group as reached, or static)."""

    def __init__(self, spec: QuantSpec, W: Tensor, perm: Tensor | None, kept: Tensor | None):
        rows, k = W.shape
        self.spec, self.kept, self.maxq = spec, kept, spec.maxq
        self.g = k if spec.group_size is None else spec.group_size
        n_groups = group_count(k, spec.group_size)
        self.codes = torch.empty_like(W)
        self.scale = torch.empty(rows, n_groups, dtype=W.dtype, device=W.device)
        self.zero = torch.empty_like(self.scale)
        pos = torch.arange(k, device=W.device)
        self.static = spec.static_groups or spec.group_size is None
        if self.static:  # grids from the original weights, natural column order
            Wn = W if perm is None else W[:, torch.argsort(perm)]
            for i in range(n_groups):
                cols = slice(i * self.g, min((i + 1) * self.g, k))
                self.scale[:, i], self.zero[:, i] = fit_grid(Wn[:, cols], spec.bits, spec.sym)
            natural = pos if perm is None else perm
            self.group_of = (natural // self.g).tolist()  # processing position → grid
        else:
            self.group_of = (pos // self.g).tolist()
        self.s = self.z = None

    def column(self, W1: Tensor, i: int, j: int) -> Tensor:
        grp = self.group_of[j]
        if not self.static and j % self.g == 0:  # a new group: fit on the updated weights
            s, z = fit_grid(W1[:, i : i + self.g], self.spec.bits, self.spec.sym)
            self.scale[:, grp], self.zero[:, grp] = s, z
        s, z = self.scale[:, grp], self.zero[:, grp]
        c = quantize_codes(W1[:, i], s, z, self.maxq)
        if self.kept is not None:
            c = torch.where(self.kept[:, j], c, z)
        self.codes[:, j] = c
        return (c - z) * s


def _blocksize(spec: QuantSpec, k: int, blocksize: int) -> int:
    """Blocks that never split a group whose grid is fitted during the sweep."""
    g = spec.group_size
    if spec.static_groups or g is None or g >= k:
        return blocksize
    return g if g >= blocksize else (blocksize // g) * g


def gptq(
    W: Tensor,
    H: Tensor,
    spec: QuantSpec,
    *,
    damping: float = 0.01,
    blocksize: int = 128,
    dead: Tensor | None = None,
    kept: Tensor | None = None,
) -> QuantizedMatrix:
    """GPTQ on ``W`` (rows × k) with calibration Hessian ``H`` (k × k) in ``W``'s dtype."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int, not {blocksize!r}")
    rows, k = W.shape
    W, Hd, lam = prepare_layer(W, H, damping, dead)
    perm = None
    if spec.act_order:
        perm = torch.sort(Hd.diagonal(), descending=True, stable=True).indices
        W, Hd = W[:, perm], Hd[perm][:, perm]
        kept = kept[:, perm] if kept is not None else None
    factor, lam = upper_factor(Hd, lam)
    del Hd
    rule = _GridRule(spec, W, perm, kept)
    column_sweep(W, factor, rule, _blocksize(spec, k, blocksize))
    codes, group_of = rule.codes, torch.tensor(rule.group_of, device=W.device)
    if perm is not None:
        inv = torch.argsort(perm)
        codes, group_of = codes[:, inv], group_of[inv]
        kept = kept[:, inv] if kept is not None else None
    return QuantizedMatrix(
        codes.to(torch.uint8), rule.scale, rule.zero.to(torch.uint8), group_of, lam, kept
    )


class GPTQ(Quantizer):
    """GPTQ quantiser: ``GPTQ(bits=4, group_size=None, sym=False, act_order=False,
    static_groups=False, damping=0.01, blocksize=128).apply(model, calibration)``.

    See :class:`~optbrain.quantize.base.Quantizer` for the model-level options (which layers,
    sequential calibration, solve dtype)."""

    method = "gptq"

    def __init__(self, bits: int = 4, *, blocksize: int = 128, **kwargs):
        super().__init__(bits, **kwargs)
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
            raise ValueError(f"blocksize must be a positive int, not {blocksize!r}")
        self.blocksize = blocksize

    def quantize_matrix(
        self, W: Tensor, H: Tensor | None, dead: Tensor | None, kept: Tensor | None
    ) -> QuantizedMatrix:
        return gptq(
            W, H, self.spec, damping=self.damping, blocksize=self.blocksize, dead=dead, kept=kept
        )
