"""Strict JSON with non-finite floats, and atomic file writes (shared by histories, checkpoints,
pruned models, experiment results and reports)."""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def to_jsonable(v: Any) -> Any:
    """Non-finite floats become "nan"/"inf"/"-inf" (strict JSON has no such numbers); paths
    become strings; mapping keys become strings."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, Mapping):
        return {str(k): to_jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_jsonable(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def from_jsonable(v: Any) -> Any:
    """Inverse of :func:`to_jsonable` for the non-finite floats."""
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    if isinstance(v, dict):
        return {k: from_jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [from_jsonable(x) for x in v]
    return v


def _new_file(folder: Path, prefix: str) -> str:
    """Create an empty file with a fresh name in ``folder``, mode 0666 less the user's umask (the
    kernel applies it, as for any new file; ``tempfile.mkstemp`` would make it 0600)."""
    for _ in range(100):
        name = folder / f"{prefix}{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return str(name)
    raise FileExistsError(f"no free temporary name in {folder}")  # pragma: no cover


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``:
    a crash never leaves a half-written file. Creates parent folders. The file gets the user's
    umask, like any file the user writes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_file(path.parent, f".{path.name}.")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write text atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | Path, data: Any) -> Path:
    """Strict JSON (non-finite floats as strings), written atomically."""
    return write_text(path, json.dumps(to_jsonable(data), indent=1) + "\n")
