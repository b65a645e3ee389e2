"""Breiman's waveform data (CART book, 1984), with 19 appended pure-noise inputs (40 in all).

Three triangular base waves over the positions i = 1..21 (PAPERS.md §8)::

    h0(i) = max(6 − |i − 7|, 0),   h1(i) = max(6 − |i − 15|, 0),   h2(i) = max(6 − |i − 11|, 0)

Each sample draws its class c uniformly from {0, 1, 2} and u ~ U(0, 1); its first 21 inputs are

    x_i = u·h_a(i) + (1 − u)·h_b(i) + ε_i,   ε_i ~ N(0, 1),

with (a, b) = (h0, h1) for class 0, (h0, h2) for class 1 and (h1, h2) for class 2. The second
version of the data appends ``noise_features`` (19) inputs that are pure N(0, 1) noise, independent
of the class. Note that *every* base wave is zero at i = 1 and i = 21, so inputs 1 and 21 (indices 0
and 20) carry no class information either: only the 19 inputs 2..20 are informative
(:data:`INFORMATIVE`). The Bayes error rate is about 14 % (Breiman et al. report ≈ 86 % Bayes
accuracy for the 21-input version; the noise inputs do not change it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "CLASS_WAVES",
    "INFORMATIVE",
    "N_BASE",
    "WaveformData",
    "base_waves",
    "class_means",
    "load_waveform_split",
    "make_waveform",
]

N_BASE = 21
"""Number of waveform positions (the "relevant" inputs of the 40-input version)."""

_PEAKS = (7, 15, 11)
CLASS_WAVES: tuple[tuple[int, int], ...] = ((0, 1), (0, 2), (1, 2))
"""Base waves (a, b) mixed by each class."""

INFORMATIVE: tuple[int, ...] = tuple(range(1, N_BASE - 1))
"""0-based indices of the inputs whose distribution depends on the class (positions 2..20)."""


def base_waves(dtype: torch.dtype = torch.float64) -> Tensor:
    """The three base waves h0, h1, h2 as a 3×21 tensor (row k = h_k at positions 1..21)."""
    i = torch.arange(1, N_BASE + 1, dtype=dtype)
    return torch.stack([(6.0 - (i - c).abs()).clamp(min=0.0) for c in _PEAKS])


def class_means(dtype: torch.dtype = torch.float64) -> Tensor:
    """E[x_i | class] for the 21 wave inputs: ½(h_a + h_b), a 3×21 tensor (E[u] = ½)."""
    h = base_waves(dtype)
    return torch.stack([0.5 * (h[a] + h[b]) for a, b in CLASS_WAVES])


def make_waveform(
    n: int,
    *,
    noise_features: int = 19,
    seed: int | torch.Generator = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """``n`` samples ``(x, y)``: ``x`` is ``n × (21 + noise_features)``, ``y`` int64 in {0, 1, 2}.

    ``seed`` is an int or a :class:`torch.Generator` (the global RNG is never used).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if isinstance(noise_features, bool) or not isinstance(noise_features, int):
        raise ValueError(f"noise_features must be an integer >= 0, got {noise_features!r}")
    if noise_features < 0:
        raise ValueError(f"noise_features must be >= 0, got {noise_features!r}")
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    h = base_waves(torch.float64)
    pairs = torch.tensor(CLASS_WAVES)
    y = torch.randint(0, 3, (n,), generator=gen)
    u = torch.rand(n, 1, generator=gen, dtype=torch.float64)
    waves = u * h[pairs[y, 0]] + (1.0 - u) * h[pairs[y, 1]]
    eps = torch.randn(n, N_BASE + noise_features, generator=gen, dtype=torch.float64)
    x = eps
    x[:, :N_BASE] += waves
    return x.to(dtype), y


@dataclass
class WaveformData:
    """Independent train / validation / test draws of the waveform data (same generator)."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    n_classes: int = 3

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def noise(self) -> tuple[int, ...]:
        """0-based indices of the appended pure-noise inputs (21..)."""
        return tuple(range(N_BASE, self.n_features))


def load_waveform_split(
    n_train: int = 1000,
    n_val: int = 1000,
    n_test: int = 5000,
    *,
    noise_features: int = 19,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> WaveformData:
    """Independent draws of ``n_train``, ``n_val``, ``n_test`` samples from one seeded stream."""
    for key, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{key} must be a positive integer, got {n!r}")
    gen = torch.Generator().manual_seed(int(seed))
    parts = [
        make_waveform(n, noise_features=noise_features, seed=gen, dtype=dtype)
        for n in (n_train, n_val, n_test)
    ]
    return WaveformData(*parts[0], *parts[1], *parts[2])
