"""Reference networks for the digits data (8×8 images, 10 classes; outputs are logits)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from ._seeding import seeded as _seeded
from .activations import LeCunTanh

__all__ = ["digits_mlp", "digits_cnn"]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "lecun_tanh": LeCunTanh,
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
}


def digits_mlp(
    hidden: Sequence[int] = (300, 100),
    activation: str = "tanh",
    seed: int | None = None,
    *,
    n_in: int = 64,
    n_out: int = 10,
) -> nn.Sequential:
    """A fully connected net ``n_in-hidden...-n_out`` as a flat ``nn.Sequential``.

    Layers alternate ``Linear`` and activation (``"tanh"``, ``"lecun_tanh"``, ``"sigmoid"``,
    ``"relu"``); the last ``Linear`` has no activation. With ``seed`` the initialisation is
    reproducible and the global RNG is left untouched.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {sorted(_ACTIVATIONS)}")
    sizes = [n_in, *hidden, n_out]
    if any(int(s) < 1 for s in sizes):
        raise ValueError(f"layer sizes must be positive, got {sizes}")
    layers: list[nn.Module] = []
    with _seeded(seed):
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(int(a), int(b)))
            if i < len(sizes) - 2:
                layers.append(_ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def digits_cnn(seed: int | None = None) -> nn.Sequential:
    """A small LeCun-style constrained net with shared (convolutional) weights for 1×8×8 images.

    ``Conv(1→8, 3×3) · LeCunTanh · AvgPool 2 · Conv(8→16, 3×3) · LeCunTanh · AvgPool 2 · Flatten ·
    Linear(64→10)``: 1,898 parameters.
    """
    with _seeded(seed):
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            LeCunTanh(),
            nn.AvgPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            LeCunTanh(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 2 * 2, 10),
        )
