"""NaN and infinity in data: found and named (split, batch) before work starts, or the moment they
appear in a loader that produces new data on every pass."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .errors import NonFiniteDataError

__all__ = ["Checked", "check_batch", "scan"]


def _bad(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(t.isfinite().all())


def check_batch(split: str, index: int, batch: Any, where: str = "") -> None:
    """Raise :class:`~optbrain.errors.NonFiniteDataError` if the ``(input, target)`` batch number
    ``index`` (0-based) of ``split`` holds NaN or infinity, naming which part and how many."""
    parts = batch if isinstance(batch, (tuple, list)) else (batch,)
    for name, t in zip(("inputs", "targets", "part 3", "part 4"), parts):
        if _bad(t):
            n_nan, n_inf = int(t.isnan().sum()), int(t.isinf().sum())
            raise NonFiniteDataError(
                f"the {split} data has {n_nan} NaN and {n_inf} infinite value(s) in the {name} "
                f"of batch {index}{where}"
            )


def scan(split: str, loader: Iterable) -> int:
    """Check every batch of one pass over ``loader``; returns the number of batches."""
    n = 0
    for n, batch in enumerate(loader, start=1):
        check_batch(split, n - 1, batch)
    return n


class Checked:
    """A loader that checks every batch it yields (see :func:`check_batch`); everything else
    (``len``, the ``generator`` that :func:`optbrain.train.train` re-seeds) is the loader's."""

    def __init__(self, split: str, loader: Iterable):
        self.split, self.loader = split, loader
        self.passes = 0

    def __iter__(self) -> Iterator:
        self.passes += 1
        for i, batch in enumerate(self.loader):
            check_batch(self.split, i, batch, f" (pass {self.passes} over the data)")
            yield batch

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    @property
    def generator(self) -> Any:
        return getattr(self.loader, "generator", None)
