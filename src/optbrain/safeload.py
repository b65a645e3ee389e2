"""Loading files safely: ``torch.load(weights_only=True)`` only, with a named error for a file
that holds pickled code or objects (which a full unpickler would execute)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from .errors import UnsafeFileError

__all__ = ["load"]


def load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and containers only.

    A file that needs anything else (a pickled class or function: a file someone wrote to run
    code when loaded) raises :class:`~optbrain.errors.UnsafeFileError`; it is never executed.
    Other read errors (a damaged file) propagate unchanged."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = str(exc).splitlines()
        why = next((ln.strip() for ln in lines if "global" in ln.lower()), None)
        if why is None:  # not a class or function: a damaged file, not an unsafe one
            raise
        raise UnsafeFileError(
            f"refused to load {path}: it holds pickled objects or code, not plain tensors and "
            f"containers (optbrain loads with weights_only=True only; {why})"
        ) from exc
