"""Joint sparse + quantised compression: prune each layer with layer-wise OBS, then quantise the
survivors against the same Hessian, the pruned weights staying exactly 0.

Per layer (and convolution group), on its calibration H = 2XXᵀ/n: the exact greedy solver (OBC,
:func:`optbrain.layerwise.exact_obs`) or the blocked one (SparseGPT,
:func:`optbrain.layerwise.blocked_obs`) deletes ``sparsity`` of the entries (or N of every M
with ``nm``) and re-fits the others; GPTQ (or OBQ) then quantises the result with the deleted
entries fixed at 0, the grid point of code ``zero``: every later column absorbs their error
like any other rounding error (SparseGPT's joint mode, PAPERS.md §11.1, §14.5). Grids are fitted
on the pruned-and-updated weights.
"""

from __future__ import annotations

from torch import Tensor

from ..pruners.layerwise import EXACT_LIMIT, blocked_obs, check_nm, exact_obs
from ..selection import target_count
from .base import Quantizer, refuse_act_order
from .gptq import gptq
from .obq import obq
from .result import QuantizedMatrix

__all__ = ["Joint"]


class Joint(Quantizer):
    """``Joint(bits=4, sparsity=0.5, nm=None, prune="auto", quantizer="gptq").apply(model,
    calibration)``: layer-wise OBS to ``sparsity`` (a fraction of every layer's entries) or
    ``nm=(N, M)``, then GPTQ (``quantizer="gptq"``, options as :class:`~optbrain.quantize.GPTQ`)
    or OBQ (``"obq"``) of the survivors. ``prune``: ``"exact"`` (OBC), ``"blocked"`` (SparseGPT)
    or ``"auto"`` (exact when rows · k³ ≤ ``exact_limit``). The report's ``sparsity`` is the
    fraction of each layer pruned."""

    method = "joint"

    def __init__(
        self,
        bits: int = 4,
        *,
        sparsity: float | None = 0.5,
        nm: tuple[int, int] | None = None,
        prune: str = "auto",
        quantizer: str = "gptq",
        blocksize: int = 128,
        outliers: bool = True,
        exact_limit: float = EXACT_LIMIT,
        **kwargs,
    ):
        super().__init__(bits, **kwargs)
        self.nm = check_nm(nm)
        if self.nm is not None:
            sparsity = None
        elif isinstance(sparsity, bool) or not isinstance(sparsity, float):
            raise TypeError(f"sparsity must be a fraction in [0, 1) (or pass nm), not {sparsity!r}")
        elif not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be a fraction in [0, 1), not {sparsity!r}")
        if prune not in ("auto", "exact", "blocked"):
            raise ValueError(f"prune must be 'auto', 'exact' or 'blocked', not {prune!r}")
        if quantizer not in ("gptq", "obq"):
            raise ValueError(f"quantizer must be 'gptq' or 'obq', not {quantizer!r}")
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
            raise ValueError(f"blocksize must be a positive int, not {blocksize!r}")
        if quantizer == "obq":
            refuse_act_order(
                self.spec, "Joint(quantizer='obq')", "OBQ quantises in its own greedy order"
            )
        self.sparsity, self.prune, self.quantizer = sparsity, prune, quantizer
        self.blocksize, self.outliers, self.exact_limit = blocksize, bool(outliers), exact_limit

    def solve(self, W: Tensor, H: Tensor | None, dead: Tensor | None) -> QuantizedMatrix:
        rows, k = W.shape
        exact = self.prune == "exact" or (
            self.prune == "auto" and rows * float(k) ** 3 <= self.exact_limit
        )
        target = None if self.nm else target_count(self.sparsity, W.numel())
        common = dict(nm=self.nm, damping=self.damping, dead=dead)
        if exact:
            sol = exact_obs(W, H, target, **common)
        else:
            sol = blocked_obs(W, H, target, blocksize=self.blocksize, **common)
        return self.quantize_matrix(sol.weight, H, dead, sol.kept)

    def quantize_matrix(
        self, W: Tensor, H: Tensor | None, dead: Tensor | None, kept: Tensor | None
    ) -> QuantizedMatrix:
        if self.quantizer == "obq":
            return obq(
                W, H, self.spec, damping=self.damping, dead=dead, kept=kept, outliers=self.outliers
            )
        return gptq(
            W, H, self.spec, damping=self.damping, blocksize=self.blocksize, dead=dead, kept=kept
        )
