"""Old import paths of names that moved: each old module re-exports the new one and warns."""

from __future__ import annotations

import importlib
import warnings
from typing import Any


def moved(old: str, new: str) -> dict[str, Any]:
    """Warn that module ``old`` moved to ``new`` and return the new module's namespace (its
    public names and the private ones old code may have imported) for the old module to adopt."""
    warnings.warn(
        f"{old} has moved to {new}; import from there ({old} will be removed)",
        DeprecationWarning,
        stacklevel=3,
    )
    module = importlib.import_module(new)
    return {k: v for k, v in vars(module).items() if not k.startswith("__")}
