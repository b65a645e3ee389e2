"""Seeded construction of modules whose default initialisation draws from the global RNG."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int | None):
    """Run the block under ``torch.manual_seed(seed)`` without changing the global CPU RNG."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
