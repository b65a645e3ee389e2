"""The three MONK's problems (Thrun et al. 1991), generated from their rules.

Six attributes a1 ∈ {1,2,3}, a2 ∈ {1,2,3}, a3 ∈ {1,2}, a4 ∈ {1,2,3}, a5 ∈ {1,2,3,4},
a6 ∈ {1,2} span 432 examples; the target concepts are (UCI / OpenML "monks-problems-N")

* MONK-1: (a1 = a2) or (a5 = 1)                              — 216 positive;
* MONK-2: exactly two of the six attributes equal 1           — 142 positive;
* MONK-3: (a5 = 3 and a4 = 1) or (a5 ≠ 4 and a2 ≠ 3)          — 228 positive.

As in UCI, the test set is all 432 examples with their true labels. UCI's training sets (124, 169
and 122 examples; 5 % class noise in MONK-3's) are fixed files that are not available offline, so
:func:`load_monk` draws training subsets of those sizes with a seed and flips the labels of 5 %
of MONK-3's training examples (``round(0.05·122) = 6``). Inputs are one-hot codes of the
attribute values: 3+3+2+3+4+2 = 17 inputs, as in Hassibi & Stork's 17-3-1 and 17-2-1 nets.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ATTRIBUTE_SIZES",
    "TRAIN_SIZES",
    "MonkData",
    "load_monk",
    "monk_attributes",
    "monk_labels",
    "monk_one_hot",
]

ATTRIBUTE_SIZES: tuple[int, ...] = (3, 3, 2, 3, 4, 2)
"""Number of values of a1..a6 (values are 1-based)."""
TRAIN_SIZES: dict[int, int] = {1: 124, 2: 169, 3: 122}
"""UCI training-set sizes of MONK-1, -2, -3."""
NOISE: dict[int, float] = {1: 0.0, 2: 0.0, 3: 0.05}
"""Fraction of training labels flipped by default (UCI: 5 % class noise in MONK-3 only)."""


def monk_attributes() -> Tensor:
    """All 432 attribute vectors (int64, 432×6, values starting at 1), in lexicographic order."""
    rows = itertools.product(*(range(1, k + 1) for k in ATTRIBUTE_SIZES))
    return torch.tensor(list(rows), dtype=torch.int64)


def _check_problem(problem: int) -> None:
    if problem not in (1, 2, 3):
        raise ValueError(f"MONK problem must be 1, 2 or 3, got {problem!r}")


def monk_labels(problem: int, attributes: Tensor) -> Tensor:
    """True labels (bool, one per row) of MONK-``problem`` for attribute rows (values from 1)."""
    _check_problem(problem)
    a = attributes
    if a.dim() != 2 or a.shape[1] != 6:
        raise ValueError(f"attributes must be N×6, got shape {tuple(a.shape)}")
    a1, a2, a4, a5 = a[:, 0], a[:, 1], a[:, 3], a[:, 4]
    if problem == 1:
        return (a1 == a2) | (a5 == 1)
    if problem == 2:
        return (a == 1).sum(dim=1) == 2
    return ((a5 == 3) & (a4 == 1)) | ((a5 != 4) & (a2 != 3))


def monk_one_hot(attributes: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot code of attribute rows: N×17 (a1 in columns 0-2, a2 in 3-5, ..., a6 in 15-16)."""
    if attributes.dim() != 2 or attributes.shape[1] != 6:
        raise ValueError(f"attributes must be N×6, got shape {tuple(attributes.shape)}")
    parts = []
    for j, k in enumerate(ATTRIBUTE_SIZES):
        col = attributes[:, j]
        if bool(((col < 1) | (col > k)).any()):
            raise ValueError(f"attribute a{j + 1} must take values 1..{k}")
        parts.append(torch.nn.functional.one_hot(col - 1, k))
    return torch.cat(parts, dim=1).to(dtype)


@dataclass
class MonkData:
    """One MONK problem: one-hot inputs (N×17) and 0/1 float targets (N×1).

    ``train_index`` are the rows of :func:`monk_attributes` drawn for training; ``flipped`` the
    positions *within the training set* whose labels were flipped (class noise).
    """

    problem: int
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    train_index: Tensor
    flipped: Tensor


def load_monk(
    problem: int,
    seed: int = 0,
    n_train: int | None = None,
    noise: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> MonkData:
    """MONK-``problem`` with a random training subset (``n_train``, default the UCI size) drawn
    with its own generator seeded by ``seed``; ``noise`` (default 5 % for MONK-3, else 0) is the
    fraction of training labels flipped (``round(noise·n_train)`` of them). The test set is all
    432 examples with true labels."""
    _check_problem(problem)
    n_train = TRAIN_SIZES[problem] if n_train is None else n_train
    noise = NOISE[problem] if noise is None else noise
    if not 1 <= n_train <= 432:
        raise ValueError(f"n_train must be in 1..432, got {n_train!r}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be a fraction in [0, 1], got {noise!r}")
    gen = torch.Generator().manual_seed(seed)
    attrs = monk_attributes()
    labels = monk_labels(problem, attrs)
    index = torch.randperm(432, generator=gen)[:n_train].sort().values
    y_train = labels[index].clone()
    n_flip = int(round(noise * n_train))
    flipped = torch.randperm(n_train, generator=gen)[:n_flip].sort().values
    y_train[flipped] = ~y_train[flipped]
    x = monk_one_hot(attrs, dtype)
    return MonkData(
        problem=problem,
        x_train=x[index],
        y_train=y_train.to(dtype).unsqueeze(1),
        x_test=x,
        y_test=labels.to(dtype).unsqueeze(1),
        train_index=index,
        flipped=flipped,
    )
