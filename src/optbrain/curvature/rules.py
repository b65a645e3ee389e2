"""The per-layer registry: the only place in optbrain with layer-specific derivative code.

A :class:`Rule` tells the structured second-order back-propagation (:mod:`.backprop`) how to move
curvature from a module's output to its input and how to turn curvature at its output into the
diagonal for its parameters. Shapes: ``x`` is the module input (N × …), columns ``cols`` carry a
leading column axis (K × N × …), diagonals ``d`` have the shape of the output (N × …).

Users can teach optbrain a new layer with :func:`register`.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap
from torch.nn.modules import module as _mod

from ..errors import UnsupportedModuleError

log = logging.getLogger(__name__)

GENERIC_ESTIMATORS = (
    "GGNDiagonal(method='func')",
    "ExactHessianDiagonal(method='hvp')",
    "EmpiricalFisherDiagonal(method='func')",
    "MCFisherDiagonal(method='func')",
    "HutchinsonDiagonal",
)


def _column_square_sum(cols: Tensor, sign: Tensor | None) -> Tensor:
    """Σ_k σ_kn cols_kn² over the leading column axis.

    Accumulated column by column (``addcmul_``): no K-fold squared copy is materialised, and on
    CPU this is several times faster than ``cols.square().sum(0)`` (a reduction over the outer
    axis) or ``torch.linalg.vector_norm(dim=0)``.
    """
    if sign is None:
        acc = cols[0].square()
        for k in range(1, cols.shape[0]):
            acc.addcmul_(cols[k], cols[k])
        return acc
    tail = (1,) * (cols.dim() - 2)
    acc = cols[0].square().mul_(sign[0].reshape(sign.shape[1:] + tail))
    for k in range(1, cols.shape[0]):
        acc.addcmul_(cols[k] * sign[k].reshape(sign.shape[1:] + tail), cols[k])
    return acc


def hooked(m: nn.Module) -> bool:
    """Whether a forward (pre-)hook, the module's own or a global one, sees ``m``'s tensors (a
    hook may keep them, so the sweep must neither overwrite them nor skip the call)."""
    return bool(
        m._forward_hooks
        or m._forward_pre_hooks
        or _mod._global_forward_hooks
        or _mod._global_forward_pre_hooks
    )


def _stock_forward(m: nn.Module, *classes: type[nn.Module]) -> bool:
    """Whether ``m`` runs the forward of one of torch's own ``classes`` (a parametrized module
    does: parametrize subclasses without overriding forward) with no hook watching."""
    return any(type(m).forward is c.forward for c in classes) and not hooked(m)


class Rule:
    """Derivative rules of one layer kind. Subclasses override what differs from the defaults.

    Four flags tell the sweep which forward values the rules read, so that it can release or
    overwrite the others (fewer allocations of fresh memory):

    * ``reads_input``: the rules read the *values* of the module's input (not only its shape);
    * ``reads_output``: they read the module's output (element-wise activations: f' from f(a));
    * ``squares_input``: :meth:`diag_params`, :meth:`lecun_step` (and ``grads_from_square_sum``)
      take the squared input x² in place of x — the sweep computes it, in place when no later
      rule reads x;
    * ``square_output_ok``: in LeCun's Gauss–Newton recursion the rule needs only the square of
      its output (:meth:`scale2_from_square`); the layer after it may then square that output
      in place for its own x² (tanh: f' = 1 − y²).
    """

    #: parameter attributes the rule differentiates (those that are not None on the module)
    params: tuple[str, ...] = ()
    reads_input: bool = True
    reads_output: bool = False
    squares_input: bool = False
    square_output_ok: bool = False

    def forward(self, m: nn.Module, x: Tensor) -> Tensor:
        """The module's output, as the sweep's forward pass computes it."""
        return m(x)

    def fresh_output(self, m: nn.Module) -> bool:
        """Whether the module's forward returns a new tensor (not its input, a view or a buffer),
        which an in-place activation may then overwrite."""
        return False

    def inplace_forward(self, m: nn.Module) -> Callable[[Tensor], Tensor] | None:
        """An in-place version of the module's forward, for rules that never read the module's
        input (the sweep applies it to a fresh output nothing else reads); None if none."""
        return None

    def fusion_name(self, m: nn.Module) -> str | None:
        """For an activation whose rules never read its input: its name among oneDNN's fused
        post-operations (``"tanh"``, ``"sigmoid"``), or None."""
        return None

    def forward_fused(self, m: nn.Module, x: Tensor, activation: str) -> Tensor | None:
        """``activation(m(x))`` in one fused kernel where the layer supports it, else None."""
        return None

    def column_cost(self, m: nn.Module, x: Tensor) -> int:
        """Elements per sample and column that :meth:`sq_grads` materialises (memory planning)."""
        return 0

    def vjp(self, m: nn.Module, x: Tensor, cols: Tensor) -> Tensor:
        """Jᵀ·c for every column: (K × N × out) → (K × N × in)."""
        _, fn = vjp(m, x)
        return vmap(fn)(cols)[0]

    def sq_vjp(self, m: nn.Module, x: Tensor, d: Tensor) -> Tensor:
        """LeCun's propagation (J∘J)ᵀ·d of a diagonal through a layer linear in its input."""
        raise UnsupportedModuleError(f"no LeCun rule for {type(m).__name__}")

    def diag_params(self, m: nn.Module, x: Tensor, d: Tensor) -> dict[str, Tensor]:
        """Σ over samples and connections of d·(∂out/∂w)² — LeCun's per-connection rule.
        Returned tensors are fresh (the caller may accumulate into them)."""
        return {}

    def lecun_step(self, m: nn.Module, x: Tensor, d: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """:meth:`diag_params` and :meth:`sq_vjp` together, for a layer inside the chain."""
        return self.diag_params(m, x, d), self.sq_vjp(m, x, d)

    def sq_grads(
        self, m: nn.Module, x: Tensor, cols: Tensor, sign: Tensor | None
    ) -> dict[str, Tensor]:
        """Σ_k Σ_n σ_kn (per-sample gradient of ⟨cols_kn, out_n⟩)² for each parameter."""
        return {}

    def diag_columns(self, m: nn.Module, x: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        """Columns (and signs) of Jᵀ diag(d) J at the input, one per output unit."""
        n = d.shape[0]
        flat = d.reshape(n, -1)
        u = flat.shape[1]
        eye = torch.eye(u, dtype=d.dtype, device=d.device)
        basis = flat.abs().sqrt().T[:, :, None] * eye[:, None, :]  # U × N × U
        cols = self.vjp(m, x, basis.reshape(u, *d.shape))
        return cols, torch.sign(flat).T.contiguous()


Derivatives = Callable[[nn.Module, Tensor, Tensor, bool], tuple[Tensor, Tensor | None]]
"""``derivatives(module, a, f(a), second) -> (f'(a), f''(a) or None unless second)``."""


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
        ones = torch.ones_like(a)

        def first(t: Tensor) -> Tensor:
            return jvp(m, (t,), (ones,))[1]

        if not second:
            return first(a), None
        f1, f2 = jvp(first, (a,), (ones,))
        return f1, f2

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
        return self._inplace if _stock_forward(m, self._module) else None

    def fusion_name(self, m: nn.Module) -> str | None:
        return self._fusion if _stock_forward(m, self._module) else None

    def fresh_output(self, m: nn.Module) -> bool:
        return _stock_forward(m, self._module)

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


def _onednn_op(name: str):
    """torch's inference-only oneDNN op ``torch.ops.mkldnn.<name>`` (the layer-plus-activation
    kernels that ``torch.compile`` emits on CPU), or None where this build lacks it."""
    try:
        return getattr(torch.ops.mkldnn, name)
    except (AttributeError, RuntimeError):  # pragma: no cover - depends on the torch build
        return None


_LINEAR_POINTWISE = _onednn_op("_linear_pointwise")
_CONV_POINTWISE = _onednn_op("_convolution_pointwise")


def _onednn_usable(x: Tensor, w: Tensor) -> bool:
    """oneDNN's fused kernels: float32 on CPU, input contiguous, oneDNN built and enabled."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and x.is_contiguous()
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


def _call_onednn(op, *args) -> Tensor | None:
    """``op(*args)``, or None (the caller falls back to the stock forward) if it fails: these
    ops are private, and a torch release may change their signatures."""
    try:
        return op(*args)
    except (RuntimeError, TypeError) as exc:
        log.debug("oneDNN fused kernel unavailable, using the stock forward: %s", exc)
        return None


class ReshapeRule(Rule):
    """Identity-like layers (Flatten, Unflatten, Identity, Dropout in eval mode)."""

    reads_input = False  # shapes only

    def vjp(self, m: nn.Module, x: Tensor, cols: Tensor) -> Tensor:
        return cols.reshape(cols.shape[0], *x.shape)

    def sq_vjp(self, m: nn.Module, x: Tensor, d: Tensor) -> Tensor:
        return d.reshape(x.shape)

    def diag_columns(self, m: nn.Module, x: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        raise AssertionError("a diagonal passes through reshape layers unchanged")


class LinearRule(Rule):
    params = ("weight", "bias")
    squares_input = True

    def fresh_output(self, m: nn.Module) -> bool:
        return _stock_forward(m, nn.Linear)

    def forward_fused(self, m: nn.Module, x: Tensor, activation: str) -> Tensor | None:
        if _LINEAR_POINTWISE is None or x.dim() != 2 or not _stock_forward(m, nn.Linear):
            return None
        w = m.weight
        if not _onednn_usable(x, w):
            return None
        return _call_onednn(_LINEAR_POINTWISE, x, w, m.bias, activation, [], "")

    def vjp(self, m: nn.Linear, x: Tensor, cols: Tensor) -> Tensor:
        flat = cols.reshape(-1, cols.shape[-1]) @ m.weight  # one 2-D GEMM beats a batched one
        return flat.reshape(*cols.shape[:-1], flat.shape[-1])

    def sq_vjp(self, m: nn.Linear, x: Tensor, d: Tensor) -> Tensor:
        return d @ m.weight.square()

    def lecun_step(self, m: nn.Linear, x2: Tensor, d: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        d_in = self.sq_vjp(m, x2, d)  # first, as autograd does: d is still in cache
        return self.diag_params(m, x2, d), d_in

    def diag_params(self, m: nn.Linear, x2: Tensor, d: Tensor) -> dict[str, Tensor]:
        """``x2``: the squared input (see :attr:`Rule.squares_input`)."""
        d2 = d.reshape(-1, d.shape[-1])
        return {"weight": d2.T @ x2.reshape(-1, x2.shape[-1]), "bias": d2.sum(0)}

    def column_cost(self, m: nn.Linear, x: Tensor) -> int:
        return 0 if x.dim() == 2 else m.weight.numel()

    def sq_grads(
        self,
        m: nn.Linear,
        x: Tensor,
        cols: Tensor,
        sign: Tensor | None,
        factor: Tensor | None = None,
    ):
        """``factor`` (N × out, 2-D inputs only): the columns are ``cols ⊙ factor`` — a pending
        element-wise scaling (an activation's f'), applied here to the N × out sum of squares
        instead of to the K columns."""
        k, n = cols.shape[:2]
        if x.dim() == 2:  # one position per sample: (Σ_k σ g²)ᵀ x²
            return self.grads_from_square_sum(x.square(), _column_square_sum(cols, sign), factor)
        if factor is not None:
            cols = cols * factor
        xs = x.reshape(n, -1, x.shape[-1])
        gs = cols.reshape(k, n, -1, cols.shape[-1])
        gw = torch.einsum("knto,nti->knoi", gs, xs)
        gb = gs.sum(2)
        return {
            "weight": _column_square_sum(gw, sign).sum(0),
            "bias": _column_square_sum(gb, sign).sum(0),
        }

    def grads_from_square_sum(self, x2: Tensor, g2: Tensor, factor: Tensor | None = None):
        """:meth:`sq_grads` for a 2-D input, given its square ``x2`` and g2 = Σ_k σ_k cols_k²
        (N × out, fresh: it is scaled in place by ``factor``², the pending f' of the columns)."""
        if factor is not None:
            g2.mul_(factor).mul_(factor)
        return {"weight": g2.T @ x2, "bias": g2.sum(0)}

    def vjp_square_sum(self, m: nn.Linear, cols: Tensor, sign: Tensor | None) -> Tensor:
        """Σ_k σ_k (Jᵀ·cols_k)² (N × in) for 2-D columns (K × N × out), one column at a time:
        the K × N × in columns are never materialised (each product is squared into the sum
        while it is in cache; several times faster than one large GEMM plus the square-sum)."""
        w = m.weight.detach()  # out= buffers below; the sweep runs without autograd anyway
        acc: Tensor | None = None
        buf: Tensor | None = None
        for k in range(cols.shape[0]):
            buf = torch.mm(cols[k], w, out=buf) if acc is not None else torch.mm(cols[k], w)
            s = None if sign is None else sign[k].reshape(-1, 1)
            if acc is None:
                acc = buf.square_() if s is None else buf.square_().mul_(s)
                buf = None
            else:
                acc.addcmul_(buf if s is None else buf * s, buf)
        assert acc is not None
        return acc

    def diag_columns(self, m: nn.Linear, x: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        if d.dim() != 2:
            return super().diag_columns(m, x, d)
        cols = d.abs().sqrt().T[:, :, None] * m.weight[:, None, :]  # out × N × in
        return cols, torch.sign(d).T.contiguous()


class ConvRule(Rule):
    """Conv1d / Conv2d with any stride, padding (zeros), dilation and groups; weights are shared
    across positions, so a weight's per-sample gradient sums over its connections."""

    params = ("weight", "bias")
    squares_input = True

    def fresh_output(self, m: nn.Module) -> bool:
        return _stock_forward(m, nn.Conv1d, nn.Conv2d)

    def forward_fused(self, m: nn.Module, x: Tensor, activation: str) -> Tensor | None:
        if (
            _CONV_POINTWISE is None
            or x.dim() != 4
            or not _stock_forward(m, nn.Conv2d)
            or m.padding_mode != "zeros"
            or isinstance(m.padding, str)
        ):
            return None
        w = m.weight
        if not _onednn_usable(x, w):
            return None
        args = (list(m.padding), list(m.stride), list(m.dilation), m.groups)
        out = _call_onednn(_CONV_POINTWISE, x, w, m.bias, *args, activation, [], "")
        return None if out is None else out.contiguous()  # NCHW, as the stock forward returns

    def _check(self, m: nn.Module) -> None:
        if m.padding_mode != "zeros":
            raise UnsupportedModuleError(
                f"{type(m).__name__} with padding_mode={m.padding_mode!r}: only 'zeros' is "
                "supported by the structured estimators; use one of "
                f"{', '.join(GENERIC_ESTIMATORS)}"
            )

    def _unfold(self, m: nn.Module, x: Tensor) -> Tensor:
        """Input patches, N × groups × (C_in/groups · k) × positions."""
        self._check(m)
        ks, st, dl = list(m.kernel_size), list(m.stride), list(m.dilation)
        if isinstance(m.padding, str):
            pads = []
            for k, d in zip(ks, dl):
                total = d * (k - 1) if m.padding == "same" else 0
                pads.append((total // 2, total - total // 2))
        else:
            pads = [(p, p) for p in m.padding]
        flat_pad = [v for pair in reversed(pads) for v in pair]
        xp = F.pad(x, flat_pad) if any(flat_pad) else x
        if xp.dim() == 3:  # Conv1d as a 2-D conv of height 1
            xp, ks, st, dl = xp.unsqueeze(2), [1, *ks], [1, *st], [1, *dl]
        cols = F.unfold(xp, ks, dilation=dl, stride=st)  # N × (C_in·k) × P
        return cols.reshape(x.shape[0], m.groups, -1, cols.shape[-1])

    def _out(self, m: nn.Module, t: Tensor, lead: int) -> Tensor:
        """Output-shaped tensor → (lead dims) × groups × C_out/groups × positions."""
        return t.reshape(*t.shape[:lead], m.groups, m.out_channels // m.groups, -1)

    def column_cost(self, m: nn.Module, x: Tensor) -> int:
        return m.weight.numel()

    def _pads(self, m: nn.Module) -> list[tuple[int, int]]:
        if isinstance(m.padding, str):
            out = []
            for k, d in zip(m.kernel_size, m.dilation):
                total = d * (k - 1) if m.padding == "same" else 0
                out.append((total // 2, total - total // 2))
            return out
        return [(p, p) for p in m.padding]

    def _backward(self, m: nn.Module, x: Tensor, w: Tensor, g: Tensor, want_input: bool):
        """PyTorch's convolution backward: input- or weight-gradient for cotangent ``g``."""
        gi, gw, _ = self._backward3(m, x, w, g, (want_input, not want_input, False))
        return gi if want_input else gw

    def _backward3(self, m: nn.Module, x: Tensor, w: Tensor, g: Tensor, mask):
        """PyTorch's convolution backward: (input, weight, bias) gradients as ``mask`` asks."""
        pads = self._pads(m)
        shape = x.shape
        if any(a != b for a, b in pads):  # asymmetric "same" padding: pad explicitly
            x = F.pad(x, [v for pair in reversed(pads) for v in pair])
            pads = [(0, 0)] * len(pads)
        gi, gw, gb = torch.ops.aten.convolution_backward(
            g,
            x,
            w,
            [m.out_channels] if mask[2] else None,
            list(m.stride),
            [a for a, _ in pads],
            list(m.dilation),
            False,
            [0] * len(pads),
            m.groups,
            list(mask),
        )
        if mask[0] and gi.shape != shape:  # undo the explicit padding
            p = self._pads(m)
            idx = [slice(None), slice(None)] + [
                slice(a, gi.shape[2 + i] - b) for i, (a, b) in enumerate(p)
            ]
            gi = gi[tuple(idx)]
        return gi, gw, gb

    def lecun_step(self, m: nn.Module, x2: Tensor, d: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """One backward call: input-gradient with squared kernels ((J∘J)ᵀ·d), weight-gradient
        of the squared input ``x2`` and bias-gradient (Σ d), as a gradient pass does in one call."""
        self._check(m)
        gi, gw, gb = self._backward3(m, x2, m.weight.square(), d, (True, True, m.bias is not None))
        return {"weight": gw, "bias": gb}, gi

    def sq_vjp(self, m: nn.Module, x: Tensor, d: Tensor) -> Tensor:
        """(J∘J)ᵀ·d: the input-gradient of the convolution with squared kernels."""
        self._check(m)
        return self._backward(m, x, m.weight.square(), d, want_input=True)

    def diag_params(self, m: nn.Module, x2: Tensor, d: Tensor) -> dict[str, Tensor]:
        """Σ_{n,p} d·x²: the weight-gradient of the convolution for the squared input ``x2`` and
        cotangent d (zero padding stays zero when squared), with the bias sum Σ d from the same
        backward call."""
        self._check(m)
        _, gw, gb = self._backward3(m, x2, m.weight, d, (False, True, m.bias is not None))
        return {"weight": gw, "bias": gb}

    def sq_grads(self, m: nn.Module, x: Tensor, cols: Tensor, sign: Tensor | None):
        xu = self._unfold(m, x)
        g = self._out(m, cols, 2)  # K × N × G × O × P
        gw = torch.einsum("kngop,ngip->kngoi", g, xu)
        gw = _column_square_sum(gw, sign).sum(0)
        gb = _column_square_sum(g.sum(-1), sign).sum(0)
        return {"weight": gw.reshape(m.weight.shape), "bias": gb.reshape(-1)}


class AvgPoolRule(Rule):
    reads_input = False  # (J∘J)ᵀ·d depends on the input's shape only

    def fresh_output(self, m: nn.Module) -> bool:
        return _stock_forward(m, nn.AvgPool1d, nn.AvgPool2d)

    def _divisor(self, m: nn.Module) -> float:
        override = getattr(m, "divisor_override", None)  # AvgPool1d has none
        if override:
            return float(override)
        pad = m.padding if isinstance(m.padding, (tuple, list)) else (m.padding,)
        if m.ceil_mode or (not m.count_include_pad and any(pad)):
            raise UnsupportedModuleError(
                f"{type(m).__name__} with ceil_mode or count_include_pad=False and padding has "
                "windows of unequal size; LeCunDiagonal supports only uniform average pooling"
            )
        ks = m.kernel_size if isinstance(m.kernel_size, (tuple, list)) else (m.kernel_size,)
        dims = 2 if isinstance(m, nn.AvgPool2d) else 1
        if len(ks) == 1 and dims == 2:
            ks = (ks[0], ks[0])
        return float(math.prod(ks))

    def sq_vjp(self, m: nn.Module, x: Tensor, d: Tensor) -> Tensor:
        # every connection has coefficient 1/divisor; squared: 1/divisor²
        div = self._divisor(m)
        if isinstance(m, nn.AvgPool2d) and div == int(div):
            # the pooling backward kernel with divisor² (no forward pass, no extra division)
            pair = nn.modules.utils._pair
            return torch.ops.aten.avg_pool2d_backward(
                d,
                x,
                pair(m.kernel_size),
                pair(m.stride or m.kernel_size),
                pair(m.padding),
                m.ceil_mode,
                m.count_include_pad,
                int(div) ** 2,
            )
        _, fn = vjp(m, x)
        return fn(d / div)[0]


class MaxPoolRule(Rule):
    def fresh_output(self, m: nn.Module) -> bool:
        return _stock_forward(m, nn.MaxPool1d, nn.MaxPool2d)

    def sq_vjp(self, m: nn.Module, x: Tensor, d: Tensor) -> Tensor:
        if getattr(m, "return_indices", False):
            raise UnsupportedModuleError(f"{type(m).__name__}(return_indices=True)")
        _, fn = vjp(m, x)  # a 0/1 selection: (J∘J) = J
        return fn(d)[0]


# ---------------------------------------------------------------------------- activations


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


def _lecun_tanh(m: nn.Module, a: Tensor, y: Tensor, second: bool):
    A, S = 1.7159, 2.0 / 3.0
    t = y / A
    f1 = A * S * (1 - t * t)
    return f1, (-2 * S * t * f1 if second else None)


_REGISTRY: dict[type, Rule] = {}


def register(cls: type, rule: Rule) -> None:
    """Teach the structured estimators a layer kind (subclasses inherit the rule)."""
    _REGISTRY[cls] = rule


def register_elementwise(cls: type, derivatives: Derivatives | None = None) -> None:
    """Register an element-wise activation with ``derivatives(module, a, f(a), second)`` returning
    ``(f'(a), f''(a) or None)``, or None to obtain both by forward-mode automatic
    differentiation."""
    register(cls, ElementwiseRule(derivatives))


register(nn.Linear, LinearRule())
for _c in (nn.Conv1d, nn.Conv2d):
    register(_c, ConvRule())
for _c in (nn.AvgPool1d, nn.AvgPool2d):
    register(_c, AvgPoolRule())
for _c in (nn.MaxPool1d, nn.MaxPool2d):
    register(_c, MaxPoolRule())
for _c in (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d):
    register(_c, ReshapeRule())
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


def _register_optbrain_activations() -> None:
    try:
        from ..models.activations import LeCunTanh
    except ImportError:  # pragma: no cover - models package absent
        return
    register_elementwise(LeCunTanh, _lecun_tanh)


_register_optbrain_activations()


def rule_for(m: nn.Module, estimator: str = "this estimator") -> Rule:
    """The rule of a module's class (or nearest registered base class), else a clear error."""
    for cls in type(m).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    raise UnsupportedModuleError(
        f"{estimator} has no rule for module type {type(m).__name__}; supported: "
        f"{', '.join(sorted(c.__name__ for c in _REGISTRY))}. Estimators that support arbitrary "
        f"differentiable modules: {', '.join(GENERIC_ESTIMATORS)} (or register a rule with "
        "optbrain.curvature.rules.register)"
    )
