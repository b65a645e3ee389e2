"""Cholesky factorisation with a damping ladder: the one fallback every dense solver shares."""

from __future__ import annotations

import torch
from torch import Tensor


def damped_cholesky(
    mat: Tensor, damping: float = 0.0, *, start: float = 1e-8, factor: float = 10.0, steps: int = 20
) -> tuple[Tensor | None, float, list[dict]]:
    """Lower Cholesky factor of ``mat + d·I`` for the smallest d of the ladder ``damping``,
    ``damping + start·s``, ``damping + start·s·factor``, … (``steps`` rungs after the first;
    s = mean |diagonal| of ``mat``, 1 if that is 0). Returns ``(L, d, attempts)`` with ``attempts``
    listing every rung after the first as ``{"damping": d, "ok": bool}``; ``L`` is None when no
    rung gives a positive definite matrix (the caller raises its own error)."""
    eye = torch.eye(mat.shape[0], dtype=mat.dtype, device=mat.device)
    scale = float(torch.diagonal(mat).abs().mean()) if mat.numel() else 1.0
    scale = scale or 1.0
    attempts: list[dict] = []
    d = damping
    for rung in range(steps + 1):
        if rung:
            d = damping + start * scale * factor ** (rung - 1)
        chol, info = torch.linalg.cholesky_ex(mat + d * eye if d else mat)
        ok = int(info) == 0 and bool(torch.isfinite(chol).all())
        if rung:
            attempts.append({"damping": d, "ok": ok})
        if ok:
            return chol, d, attempts
    return None, d, attempts
