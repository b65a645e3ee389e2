"""Rules of the layers that mix units: Linear, Conv1d/2d, average and max pooling, and the
reshape-like layers (Flatten, Unflatten, Identity, Dropout in eval mode)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vjp

from ...errors import UnsupportedModuleError
from . import fusion
from .base import GENERIC_ESTIMATORS, Rule, register, stock_forward


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


_SAMPLES_PER_BLOCK = 32


def squared_sample_grads(cols: Tensor, x: Tensor, sign: Tensor | None) -> Tensor:
    """Σ_k Σ_n σ_kn (Σ_t cols_kntᵀ x_nt)² (out × in) for columns K × N × T × out and inputs
    N × T × in: each sample's gradient of a weight shared by its T positions (or time steps),
    summed before it is squared. One batched matrix product per column and block of samples,
    squared in place while it is in cache (no K × N × out × in tensor)."""
    k, n = cols.shape[0], cols.shape[1]
    acc = None
    for kk in range(k):
        for start in range(0, n, _SAMPLES_PER_BLOCK):
            sl = slice(start, start + _SAMPLES_PER_BLOCK)
            g = torch.bmm(cols[kk, sl].transpose(1, 2), x[sl])  # block × out × in
            g.square_()
            if sign is not None:
                g.mul_(sign[kk, sl].reshape(-1, 1, 1))
            part = g.sum(0)
            acc = part if acc is None else acc.add_(part)
    return acc


class ReshapeRule(Rule):
    """Identity-like layers (Flatten, Unflatten, Identity, Dropout in eval mode)."""

    def graph_forward(self, m: nn.Module, args: tuple, kwargs: dict):
        return m(*args, **kwargs)

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
    last_dim = True

    def fresh_output(self, m: nn.Module) -> bool:
        return stock_forward(m, nn.Linear)

    def forward_fused(self, m: nn.Module, x: Tensor, activation: str) -> Tensor | None:
        return fusion.linear_pointwise(m, x, activation)

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
        return {
            "weight": squared_sample_grads(gs, xs, sign),
            "bias": _column_square_sum(gs.sum(2), sign).sum(0),
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
        return stock_forward(m, nn.Conv1d, nn.Conv2d)

    def forward_fused(self, m: nn.Module, x: Tensor, activation: str) -> Tensor | None:
        return fusion.conv2d_pointwise(m, x, activation)

    def refusal(self, m: nn.Module, mode: str) -> str | None:
        if m.padding_mode != "zeros":
            return (
                f"{type(m).__name__} with padding_mode={m.padding_mode!r}: only 'zeros' is "
                "supported by the structured estimators; use one of "
                f"{', '.join(GENERIC_ESTIMATORS)}"
            )
        return None

    def _unfold(self, m: nn.Module, x: Tensor) -> Tensor:
        """Input patches, N × groups × (C_in/groups · k) × positions."""
        self.check(m)
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

    def scratch_cost(self, m: nn.Module, x: Tensor) -> int:
        return self._unfold(m, x[:1]).numel()

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
        self.check(m)
        gi, gw, gb = self._backward3(m, x2, m.weight.square(), d, (True, True, m.bias is not None))
        return {"weight": gw, "bias": gb}, gi

    def sq_vjp(self, m: nn.Module, x: Tensor, d: Tensor) -> Tensor:
        """(J∘J)ᵀ·d: the input-gradient of the convolution with squared kernels."""
        self.check(m)
        return self._backward(m, x, m.weight.square(), d, want_input=True)

    def diag_params(self, m: nn.Module, x2: Tensor, d: Tensor) -> dict[str, Tensor]:
        """Σ_{n,p} d·x²: the weight-gradient of the convolution for the squared input ``x2`` and
        cotangent d (zero padding stays zero when squared), with the bias sum Σ d from the same
        backward call."""
        self.check(m)
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
        return stock_forward(m, nn.AvgPool1d, nn.AvgPool2d)

    def refusal(self, m: nn.Module, mode: str) -> str | None:
        if not mode.startswith("lecun") or getattr(m, "divisor_override", None):
            return None
        pad = m.padding if isinstance(m.padding, (tuple, list)) else (m.padding,)
        if m.ceil_mode or (not m.count_include_pad and any(pad)):
            return (
                f"{type(m).__name__} with ceil_mode or count_include_pad=False and padding has "
                "windows of unequal size; LeCunDiagonal supports only uniform average pooling"
            )
        return None

    def _divisor(self, m: nn.Module) -> float:
        override = getattr(m, "divisor_override", None)  # AvgPool1d has none
        if override:
            return float(override)
        self.check(m, "lecun")
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
        return stock_forward(m, nn.MaxPool1d, nn.MaxPool2d)

    def sq_vjp(self, m: nn.Module, x: Tensor, d: Tensor) -> Tensor:
        if getattr(m, "return_indices", False):
            raise UnsupportedModuleError(f"{type(m).__name__}(return_indices=True)")
        _, fn = vjp(m, x)  # a 0/1 selection: (J∘J) = J
        return fn(d)[0]


register(nn.Linear, LinearRule())
for _c in (nn.Conv1d, nn.Conv2d):
    register(_c, ConvRule())
for _c in (nn.AvgPool1d, nn.AvgPool2d):
    register(_c, AvgPoolRule())
for _c in (nn.MaxPool1d, nn.MaxPool2d):
    register(_c, MaxPoolRule())
for _c in (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d):
    register(_c, ReshapeRule())
