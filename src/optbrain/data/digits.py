"""The UCI/scikit-learn 8×8 handwritten digits (1,797 images, 10 classes).

A small stand-in for the zip-code digits of LeCun, Denker & Solla (1990): pixel values 0..16 are
scaled to [0, 1] and split into a fixed, stratified train/test split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DigitsData", "load_digits_split", "loaders"]


@dataclass
class DigitsData:
    """Train/test tensors of the digits data.

    ``x_*`` are ``N×64`` (``flat=True``) or ``N×1×8×8`` images; ``y_*`` are ``int64`` class labels.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    n_classes: int = 10

    @property
    def n_features(self) -> int:
        return int(self.x_train[0].numel())


def _sklearn():
    try:
        from sklearn import datasets, model_selection
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits data need scikit-learn; install it with `pip install 'optbrain[data]'`"
        ) from exc
    return datasets, model_selection


def load_digits_split(
    test_size: float = 0.3,
    seed: int = 0,
    scale: bool = True,
    flat: bool = True,
    dtype: torch.dtype = torch.float32,
) -> DigitsData:
    """Load the digits and split them (stratified, ``random_state=seed``).

    ``scale`` maps pixel values 0..16 to [0, 1]; ``flat=False`` gives ``N×1×8×8`` images.
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size!r}")
    datasets, model_selection = _sklearn()
    bunch = datasets.load_digits()
    x, y = bunch.data, bunch.target
    x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )

    def to_x(a) -> Tensor:
        t = torch.as_tensor(a, dtype=torch.float64)
        if scale:
            t = t / 16.0
        t = t.to(dtype)
        return t if flat else t.reshape(-1, 1, 8, 8)

    def to_y(a) -> Tensor:
        return torch.as_tensor(a, dtype=torch.int64)

    return DigitsData(to_x(x_tr), to_y(y_tr), to_x(x_te), to_y(y_te), n_classes=10)


def loaders(
    data: DigitsData, batch_size: int = 64, shuffle: bool = True, seed: int = 0
) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)``; the train loader shuffles (if asked) with a seeded
    generator of its own, the test loader keeps the order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    train = DataLoader(
        TensorDataset(data.x_train, data.y_train),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=gen,
    )
    test = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=batch_size)
    return train, test
