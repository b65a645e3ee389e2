"""f'(a) and f''(a) of an element-wise function by automatic differentiation.

Forward mode twice (jvp over jvp) is the cheapest: one pass each, no graph kept. PyTorch has no
forward-mode derivative of some fused backward kernels (``silu_backward``, ``mish_backward``, ...):
there f'' comes from reverse mode over f' instead, d/da Σ f'(a) = f''(a) entry by entry (the
function acts on each entry alone).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import jvp


def derivatives(
    f: Callable[[Tensor], Tensor], a: Tensor, second: bool = True
) -> tuple[Tensor, Tensor | None]:
    """(f'(a), f''(a)) of the element-wise ``f``; f'' is None with ``second=False``."""
    ones = torch.ones_like(a)

    def first(t: Tensor) -> Tensor:
        return jvp(f, (t,), (ones,))[1]

    if not second:
        return first(a), None
    try:
        f1, f2 = jvp(first, (a,), (ones,))
    except (NotImplementedError, RuntimeError) as exc:
        if "forward AD" not in str(exc) and "forward-mode" not in str(exc):
            raise
        with torch.enable_grad():
            t = a.detach().requires_grad_(True)
            f1 = first(t)
            (f2,) = torch.autograd.grad(f1.sum(), t)
        return f1.detach(), f2
    return f1, f2
