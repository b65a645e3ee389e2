"""Element-wise activations: f' and f'' in closed form (tanh, sigmoid, ReLU) or by forward-mode
automatic differentiation, and the fused PyTorch backward kernels where they exist."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .. import pointwise
from .base import Derivatives, Rule, register, stock_forward


def _out_of_place(m: nn.Module) -> nn.Module:
    """``m``, or a shallow copy with ``inplace=False`` for activations built with
    ``inplace=True`` (which would overwrite the pre-activation the derivatives need, and which
    ``torch.func`` transforms refuse)."""
    if getattr(m, "inplace", False) is True:
        m = copy.copy(m)
        m.inplace = False
    return m


class ElementwiseRule(Rule):
    """x ↦ f(x) applied entry by entry; f', f'' by forward-mode AD unless given in closed form.
    Modules built with ``inplace=True`` are evaluated out of place."""

    reads_output = True
    last_dim = True

    def lecun(self, m, x, y, d, g, need_input):
        """f'(a)²·d (+ f''(a)·g in the full variant); no parameters."""
        f1, f2 = self.derivatives(m, x, y, second=g is not None)
        d_in = d * f1.square()
        if g is None:
            return {}, d_in, None
        return {}, d_in + f2 * g, g * f1

    def forward(self, m: nn.Module, x: Tensor) -> Tensor:
        return _out_of_place(m)(x)

    def __init__(self, derivs: Derivatives | None = None):
        self._derivs = derivs

    def derivatives(
        self, m: nn.Module, a: Tensor, y: Tensor | None = None, second: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """(f'(a), f''(a)); ``y = f(a)`` may be passed to save recomputing it; with
        ``second=False`` f'' is not computed (None)."""
        m = _out_of_place(m)
        if self._derivs is not None:
            return self._derivs(m, a, m(a) if y is None else y, second)
        return pointwise.derivatives(m, a, second)

    def scale(self, m: nn.Module, a: Tensor, y: Tensor, t: Tensor) -> Tensor:
        """f'(a) ⊙ t (t may carry leading column axes)."""
        return t * self.derivatives(m, a, y, second=False)[0]

    def scale_(self, m: nn.Module, a: Tensor, y: Tensor, t: Tensor) -> Tensor:
        """f'(a) ⊙ t written into ``t`` (which the caller owns); returns ``t``."""
        return t.mul_(self.derivatives(m, a, y, second=False)[0])

    def scale2(self, m: nn.Module, a: Tensor, y: Tensor, t: Tensor) -> Tensor:
        """f'(a)² ⊙ t: LeCun's propagation of a diagonal through the activation."""
        return t * self.derivatives(m, a, y, second=False)[0].square()

    def scale2_(self, m: nn.Module, a: Tensor, y: Tensor, t: Tensor) -> Tensor:
        """f'(a)² ⊙ t written into ``t`` (which the caller owns); returns ``t``."""
        f1 = self.derivatives(m, a, y, second=False)[0]
        return t.mul_(f1).mul_(f1)

    def scale2_from_square(self, m: nn.Module, y2: Tensor, t: Tensor, inplace: bool) -> Tensor:
        """f'(a)² ⊙ t given only y2 = f(a)² (rules with ``square_output_ok``); written into
        ``t`` with ``inplace``."""
        raise NotImplementedError(f"{type(self).__name__} needs f(a) itself, not its square")

    def vjp(self, m: nn.Module, x: Tensor, cols: Tensor) -> Tensor:
        return self.scale(m, x, self.forward(m, x), cols)


class _FusedBackwardRule(ElementwiseRule):
    """tanh / sigmoid: f' (and f'') from the output alone, through PyTorch's fused backward
    kernels; the input a is never read, so the forward may run in place on a fresh input."""

    reads_input = False

    def __init__(
        self,
        derivs: Derivatives,
        backward: Callable[[Tensor, Tensor], Tensor],
        module: type[nn.Module],
        inplace: Callable[[Tensor], Tensor],
        fusion: str,
        from_square: Callable[[Tensor, Tensor], Tensor] | None = None,
    ):
        super().__init__(derivs)
        self._backward = backward
        self._module = module
        self._inplace = inplace
        self._fusion = fusion
        self._from_square = from_square  # (t, y²) ↦ f'² ⊙ t, in place
        self.square_output_ok = from_square is not None

    def inplace_forward(self, m: nn.Module) -> Callable[[Tensor], Tensor] | None:
        # only the stock module: a subclass may compute something else in forward()
        return self._inplace if stock_forward(m, self._module) else None

    def fusion_name(self, m: nn.Module) -> str | None:
        return self._fusion if stock_forward(m, self._module) else None

    def fresh_output(self, m: nn.Module) -> bool:
        return stock_forward(m, self._module)

    def scale(self, m: nn.Module, a: Tensor, y: Tensor, t: Tensor) -> Tensor:
        return self._backward(t, y)

    def scale_(self, m: nn.Module, a: Tensor, y: Tensor, t: Tensor) -> Tensor:
        return self._backward.grad_input(t, y, grad_input=t)

    def scale2(self, m: nn.Module, a: Tensor, y: Tensor, t: Tensor) -> Tensor:
        return self.scale_(m, a, y, self._backward(t, y))

    def scale2_(self, m: nn.Module, a: Tensor, y: Tensor, t: Tensor) -> Tensor:
        return self.scale_(m, a, y, self.scale_(m, a, y, t))

    def scale2_from_square(self, m: nn.Module, y2: Tensor, t: Tensor, inplace: bool) -> Tensor:
        if self._from_square is None:
            return super().scale2_from_square(m, y2, t, inplace)
        return self._from_square(t if inplace else t.clone(), y2)


def _tanh(m: nn.Module, a: Tensor, t: Tensor, second: bool):
    f1 = 1 - t * t
    return f1, (-2 * t * f1 if second else None)


def _sigmoid(m: nn.Module, a: Tensor, s: Tensor, second: bool):
    f1 = s * (1 - s)
    return f1, (f1 * (1 - 2 * s) if second else None)


def _relu(m: nn.Module, a: Tensor, y: Tensor, second: bool):
    return (a > 0).to(a.dtype), (torch.zeros_like(a) if second else None)


def _tanh_scale2_from_square(t: Tensor, y2: Tensor) -> Tensor:
    """t ← (1 − y²)² ⊙ t in place, as t − t·y² twice (two fused passes, like tanh_backward)."""
    return t.addcmul_(t, y2, value=-1).addcmul_(t, y2, value=-1)


def register_elementwise(cls: type, derivatives: Derivatives | None = None) -> None:
    """Register an element-wise activation with ``derivatives(module, a, f(a), second)`` returning
    ``(f'(a), f''(a) or None)``, or None to obtain both by forward-mode automatic
    differentiation."""
    register(cls, ElementwiseRule(derivatives))


register(
    nn.Tanh,
    _FusedBackwardRule(
        _tanh,
        torch.ops.aten.tanh_backward,
        nn.Tanh,
        torch.tanh_,
        "tanh",
        _tanh_scale2_from_square,
    ),
)
register(
    nn.Sigmoid,
    _FusedBackwardRule(
        _sigmoid, torch.ops.aten.sigmoid_backward, nn.Sigmoid, torch.sigmoid_, "sigmoid"
    ),
)
register_elementwise(nn.ReLU, _relu)
for _c in (
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Hardtanh,
    nn.ReLU6,
):
    register_elementwise(_c)
