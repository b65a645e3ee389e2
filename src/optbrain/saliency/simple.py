"""Baseline saliencies: magnitude, random, and SNIP's connection sensitivity."""

from __future__ import annotations

import torch

from ..paramdict import ParamDict
from ..problem import Problem
from .base import detached_params
from .gradient_sum import summed_gradient


class Magnitude:
    """s_k = ½ w_k²: OBD under the assumption H = I (magnitude pruning)."""

    def __call__(self, problem: Problem) -> ParamDict:
        return {k: 0.5 * w.square() for k, w in detached_params(problem).items()}

    def __repr__(self) -> str:
        return "Magnitude()"


class Random:
    """Uniform random scores (a control, with no objective meaning); seeded, global RNG untouched.

    Each call draws new scores from the generator, so successive rounds differ but a run is
    reproducible.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)

    def __call__(self, problem: Problem) -> ParamDict:
        w = detached_params(problem)
        return {
            k: torch.rand(v.shape, generator=self._gen, dtype=torch.float64).to(v)
            for k, v in w.items()
        }

    def state_dict(self) -> dict:
        return {"generator": self._gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._gen.set_state(state["generator"])

    def __repr__(self) -> str:
        return f"Random(seed={self.seed})"


class SNIP:
    """Connection sensitivity (Lee, Ajanthan & Torr 2019): s_k = |w_k · ∂E/∂w_k|.

    |∂E/∂c_k| at c = 1 for the gate c_k of weight k: the magnitude of the first-order change of E
    when the weight is removed. ``batches=1`` uses the first batch only (as the paper does at
    initialisation); ``None`` uses all the data. Works at initialisation or after training; the
    normalisation by Σ|·| of the paper does not change the ranking and is omitted. On a
    distributed problem ``batches`` counts per rank (the first ``batches`` of every shard) and
    the gradient is summed over the ranks; ``None`` gives one process's result on the union.
    """

    def __init__(self, batches: int | None = 1):
        if batches is not None and batches < 1:
            raise ValueError(f"batches must be >= 1 or None, not {batches}")
        self.batches = batches

    def __call__(self, problem: Problem) -> ParamDict:
        params, grads, used = summed_gradient(problem, self.batches, "SNIP's gradient")
        return {k: (p.detach() * g / used).abs() for (k, p), g in zip(params.items(), grads)}

    def __repr__(self) -> str:
        return f"SNIP(batches={self.batches})"
