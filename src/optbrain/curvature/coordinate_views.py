"""What the structured inverse curvatures (block-diagonal, K-FAC) share: views of the alive
coordinates of a :class:`~optbrain.curvature.inverse.Coordinates` numbering (names, size,
[H⁻¹]_qq as a ParamDict, gather/scatter, a row's index) and the check of the rows a step names.
A subclass holds ``coords`` and ``alive`` and defines ``diagonal_vector()``."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..paramdict import ParamDict


class CoordinateViews:
    coords: object
    alive: Tensor

    def diagonal_vector(self) -> Tensor:  # pragma: no cover - defined by each inverse
        raise NotImplementedError

    @property
    def names(self) -> tuple[str, ...]:
        return self.coords.names

    def __len__(self) -> int:
        return self.coords.size

    def diag(self) -> ParamDict:
        """[H⁻¹]_qq per parameter entry; +inf for pruned and eliminated entries."""
        d = torch.where(self.alive, self.diagonal_vector(), torch.inf)
        return self.coords.scatter(d, fill=torch.inf)

    def gather(self, values: Mapping[str, Tensor]) -> Tensor:
        return self.coords.gather(values).to(self.alive.device)

    def scatter(self, vec: Tensor) -> ParamDict:
        return self.coords.scatter(vec)

    def flat_index(self, name: str, index) -> int:
        return self.coords.row(name, index)

    def _alive_rows(self, q) -> Tensor:
        """``q`` as a tensor of distinct rows still alive (ValueError naming the others)."""
        idx = torch.as_tensor(q, dtype=torch.long, device=self.alive.device).reshape(-1)
        if idx.numel() == 0:
            raise ValueError("no coordinate given")
        if idx.unique().numel() != idx.numel():
            raise ValueError(f"rows {idx.tolist()} repeat a coordinate")
        if not bool(self.alive[idx].all()):
            raise ValueError(f"coordinate(s) {idx[~self.alive[idx]].tolist()} were eliminated")
        return idx
