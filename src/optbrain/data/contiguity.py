"""The contiguity problem: 2 versus 3 clumps of ones (PAPERS.md §7).

Denker et al. (1987), Grossman, Meir & Domany (NIPS 1) and Gorodkin et al. (1993) classify binary
strings by their number of clumps (maximal runs of ones). Of the 2^n strings of length n, exactly
C(n + 1, 2k) have k clumps (choose the 2k boundaries of the runs among n + 1 gaps); for n = 10 that
is 330 strings with 2 clumps and 462 with 3, 792 in all — the whole data set, enumerated here.
Inputs are ±1 (``low``/``high``), the target +1 for 3 clumps and −1 for 2 (tanh outputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ContiguityData", "clump_count", "contiguity_split", "load_contiguity"]


def clump_count(bits: Tensor) -> Tensor:
    """Number of clumps (maximal runs of ones) in each row of a 0/1 tensor."""
    b = bits.to(torch.int64)
    starts = b[:, :1] + (b[:, 1:] * (1 - b[:, :-1])).sum(1, keepdim=True)
    return starts.reshape(-1)


def load_contiguity(
    n: int = 10,
    clumps: tuple[int, int] = (2, 3),
    low: float = -1.0,
    high: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """``(X, Y)``: every string of length ``n`` with ``clumps[0]`` or ``clumps[1]`` clumps, in
    increasing binary order; X in {low, high}, Y = −1 for the first count and +1 for the second
    (shape N × 1)."""
    if not isinstance(n, int) or not 1 <= n <= 20:
        raise ValueError(f"n must be an int in 1..20, not {n!r}")
    if len(clumps) != 2 or clumps[0] == clumps[1]:
        raise ValueError(f"clumps must be two different counts, not {clumps!r}")
    codes = torch.arange(2**n)
    bits = (codes[:, None] >> torch.arange(n - 1, -1, -1)) & 1
    count = clump_count(bits)
    keep = (count == clumps[0]) | (count == clumps[1])
    bits, count = bits[keep], count[keep]
    x = torch.where(bits.bool(), high, low).to(dtype)
    y = torch.where(count == clumps[1], 1.0, -1.0).to(dtype)[:, None]
    return x, y


@dataclass
class ContiguityData:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def contiguity_split(n_train: int, seed: int = 0, n: int = 10) -> ContiguityData:
    """A random training subset of ``n_train`` strings (own ``torch.Generator``); the test set
    is every other string."""
    x, y = load_contiguity(n)
    if not 1 <= n_train < x.shape[0]:
        raise ValueError(f"n_train must be in 1..{x.shape[0] - 1}, not {n_train}")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train:]
    return ContiguityData(x[tr], y[tr], x[te], y[te])
