"""Graph glue: how curvature passes through the functions a custom ``forward`` calls between
registry layers (``x + y``, ``torch.cat``, ``h[:, -1]``, ``x.view(...)``, ``torch.tanh(x)``,
``q @ k.transpose(-2, -1)``, ``softmax``, ...). Per-layer math stays in :mod:`..rules`.

Each :class:`Glue` answers, for one call ``out = f(*args, **kwargs)`` and one of its tensor
inputs ``i``:

* :meth:`Glue.vjp` — Jᵢᵀ·c for a stack of cotangent columns c (K × out): exact for any
  differentiable function (the default uses ``torch.func.vjp``), which is all the GGN, Fisher and
  gradient propagation need;
* :meth:`Glue.sq_vjp` — LeCun's (Jᵢ∘Jᵢ)ᵀ·d of a diagonal d (the squared Jacobian entries), plus in
  the full (non-Gauss–Newton) variant the diagonal of Σ_o g_o ∂²out_o/∂inᵢ² for the gradient g at
  the output. Only functions in the table below have it: any other function makes LeCun's
  recursion refuse the model (naming the call), while the other estimators still work.

Kinds of functions, and LeCun's rule for each:

* ``route``: every output entry is one input entry or a sum of input entries, with coefficient 1
  (views, reshapes, permutes, cat/stack/split/chunk/getitem, expand/repeat, sum, padding,
  ``x + y``): (J∘J)ᵀd = Jᵀd, so the vjp itself;
* ``sub``: ``x − y``: coefficients ±1, squared 1;
* ``scale``: multiplication or division by a constant c: c²·d;
* ``mean``: coefficients 1/n: Jᵀd / n;
* ``elementwise``: f applied entry by entry: f'(a)²·d (+ f''(a)·g);
* ``product``: x ⊙ y of two tensors: y²·d for x (bilinear: no second-order residual);
* ``matmul``: C = A·B of two tensors: (d·(B²)ᵀ for A, (A²)ᵀ·d for B; no residual);
* ``softmax``: p = softmax(a): p_j²[d_j(1 − 2p_j) + Σ_i d_i p_i²]
  (+ p_j(1 − 2p_j)(g_j − Σ_i g_i p_i) in the full variant).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import vjp, vmap

from .. import pointwise

#: the kinds a glue function can have (see the module docstring)
KINDS = ("route", "sub", "scale", "mean", "elementwise", "product", "matmul", "softmax", "opaque")


class Glue:
    """One function of the graph. ``kind`` says how LeCun's recursion passes it; ``call``
    evaluates it on concrete arguments."""

    kind = "opaque"
    #: a diagonal curvature term in output coordinates stays diagonal in input coordinates
    #: (each output entry is ±c times one input entry): the exact Hessian's residuals pass as is
    keeps_diagonal = False

    def __init__(self, fn: Callable[..., Any], name: str):
        self.fn, self.name = fn, name

    def call(self, args: tuple, kwargs: dict) -> Any:
        return self.fn(*args, **kwargs)

    # ------------------------------------------------------------------ columns (exact)
    def vjp(
        self, args: tuple, kwargs: dict, slots: list[int], cols: Tensor, out: Tensor | None = None
    ) -> list[Tensor]:
        """Jᵀ·c for each tensor argument in ``slots`` (positions in ``args``), columns along the
        leading axis of ``cols``; ``out`` is the call's value when the caller has it."""
        return _generic_vjp(self, args, kwargs, slots, cols)

    # ------------------------------------------------------------------ LeCun
    def sq_vjp(
        self, args: tuple, kwargs: dict, out: Tensor, slots: list[int], d: Tensor, g: Tensor | None
    ) -> list[Tensor]:
        """(Jᵢ∘Jᵢ)ᵀ·d (+ the diagonal second-order residual of g when given) for each slot."""
        raise NotImplementedError(self.name)

    def derivatives(
        self, args: tuple, kwargs: dict, out: Tensor | None, second: bool
    ) -> tuple[Tensor, Tensor | None]:
        """f'(a), f''(a) at a = ``args[0]`` for element-wise functions."""
        raise NotImplementedError(self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, kind={self.kind!r})"


def _generic_vjp(glue: Glue, args: tuple, kwargs: dict, slots: list[int], cols: Tensor):
    args = list(args)

    def f(*tensors):
        full = list(args)
        for s, t in zip(slots, tensors):
            full[s] = t
        return glue.call(tuple(full), kwargs)

    _, pull = vjp(f, *[args[s] for s in slots])
    try:
        return list(vmap(pull)(cols))
    except (RuntimeError, NotImplementedError):  # pragma: no cover - ops without batching rule
        outs = [pull(c) for c in cols]
        return [torch.stack([o[i] for o in outs]) for i in range(len(slots))]


def unbroadcast(t: Tensor, shape: torch.Size, lead: int = 0) -> Tensor:
    """Sum ``t`` (``lead`` leading extra axes, then a shape broadcast from ``shape``) down to
    ``lead`` axes + ``shape``."""
    extra = t.dim() - lead - len(shape)
    if extra:
        t = t.sum(tuple(range(lead, lead + extra)))
    dims = [lead + i for i, s in enumerate(shape) if s == 1 and t.shape[lead + i] != 1]
    return t.sum(dims, keepdim=True) if dims else t


def _dim(d: int, ndim: int) -> int:
    return d % ndim


def _same_shape(args, kwargs, cols):
    x = args[0]
    return cols.reshape(cols.shape[0], *x.shape).to(x.dtype)


def _transpose(args, kwargs, cols):
    x = args[0]
    if len(args) < 3:
        return cols.transpose(1, 2)  # t()
    a, b = _dim(args[1], x.dim()), _dim(args[2], x.dim())
    return cols.transpose(a + 1, b + 1)


def _permute(args, kwargs, cols):
    x = args[0]
    dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
    dims = [_dim(d, x.dim()) for d in (dims or kwargs["dims"])]
    inverse = [0] * len(dims)
    for i, d in enumerate(dims):
        inverse[d] = i
    return cols.permute(0, *[i + 1 for i in inverse])


def _getitem(args, kwargs, cols):
    x, idx = args[0], args[1]
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, (Tensor, list)) for i in idx):
        return None  # advanced indexing may repeat entries: the generic rule adds them up
    out = cols.new_zeros((cols.shape[0], *x.shape))
    out[(slice(None), *idx)] = cols
    return out


def _expand(args, kwargs, cols):
    return unbroadcast(cols, args[0].shape, 1)


def _masked_fill(args, kwargs, cols):
    mask = args[1] if len(args) > 1 else kwargs["mask"]
    return unbroadcast(cols.masked_fill(mask, 0), args[0].shape, 1)


def _reduce_dims(args, kwargs, x):
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    keep = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
    if dim is None:
        return list(range(x.dim())), False
    dims = [dim] if isinstance(dim, int) else list(dim)
    return [d % x.dim() for d in dims], keep


def _sum(args, kwargs, cols, scale=1.0):
    x = args[0]
    if not isinstance(x, Tensor) or "dtype" in kwargs:
        return None
    dims, keep = _reduce_dims(args, kwargs, x)
    if not keep:
        for d in sorted(dims):
            cols = cols.unsqueeze(d + 1)
    cols = cols.expand(cols.shape[0], *x.shape)
    return cols * scale if scale != 1.0 else cols.contiguous()


def _mean(args, kwargs, cols):
    x = args[0]
    dims, _ = _reduce_dims(args, kwargs, x)
    n = 1
    for d in dims:
        n *= x.shape[d]
    return _sum(args, kwargs, cols, 1.0 / n)


_ROUTE_VJP = {
    **{n: _same_shape for n in ("view", "reshape", "flatten", "unflatten", "contiguous", "clone",
                                "view_as", "reshape_as", "squeeze", "unsqueeze", "to", "float",
                                "double", "type_as", "dropout", "identity")},
    "transpose": _transpose, "swapaxes": _transpose, "t": _transpose, "permute": _permute,
    "getitem": _getitem, "expand": _expand, "expand_as": _expand, "masked_fill": _masked_fill,
    "sum": _sum,
}  # fmt: skip


class Route(Glue):
    """Every output entry is an input entry or a sum of input entries (coefficient 1)."""

    kind = "route"

    def __init__(self, fn, name, keeps_diagonal: bool = False):
        super().__init__(fn, name)
        self.keeps_diagonal = keeps_diagonal

    def vjp(self, args, kwargs, slots, cols, out=None):
        fast = _ROUTE_VJP.get(self.name)
        if fast is not None and slots == [0] and isinstance(args[0], Tensor):
            got = fast(args, kwargs, cols)
            if got is not None:
                return [got]
        return _generic_vjp(self, args, kwargs, slots, cols)

    def sq_vjp(self, args, kwargs, out, slots, d, g):
        return [c[0] for c in self.vjp(args, kwargs, slots, d[None])]


class Add(Glue):
    """``x + y`` (``sign=-1``: ``x − y``) with broadcasting; ``alpha`` of ``torch.add``."""

    kind = "route"

    def __init__(self, fn, name, sign: float = 1.0):
        super().__init__(fn, name)
        self.sign = sign

    def _coef(self, kwargs: dict, slot: int) -> float:
        return 1.0 if slot == 0 else self.sign * float(kwargs.get("alpha", 1.0))

    def vjp(self, args, kwargs, slots, cols, out=None):
        return [
            unbroadcast(cols * self._coef(kwargs, s) if self._coef(kwargs, s) != 1.0 else cols,
                        args[s].shape, 1)
            for s in slots
        ]  # fmt: skip

    def sq_vjp(self, args, kwargs, out, slots, d, g):
        return [unbroadcast(d * self._coef(kwargs, s) ** 2, args[s].shape) for s in slots]


class Scale(Glue):
    """Multiplication of a tensor by a number (or by a tensor: ``product``), division by one."""

    def __init__(self, fn, name, divide: bool = False):
        super().__init__(fn, name)
        self.divide = divide

    def _factor(self, args: tuple, slot: int) -> Any:
        other = args[1 - slot]
        if self.divide:
            return 1.0 / other
        return other

    def vjp(self, args, kwargs, slots, cols, out=None):
        out = []
        for s in slots:
            if self.divide and s == 1:  # d(x/y)/dy = −x/y²
                out.append(unbroadcast(cols * (-args[0] / args[1] ** 2), args[1].shape, 1))
            else:
                out.append(unbroadcast(cols * self._factor(args, s), args[s].shape, 1))
        return out

    def sq_vjp(self, args, kwargs, out, slots, d, g):
        res = []
        for s in slots:
            if self.divide and s == 1:
                raise NotImplementedError("LeCun's recursion through x / y with y a tensor")
            f = self._factor(args, s)
            res.append(unbroadcast(d * (f * f), args[s].shape))
        return res

    kind = "scale"

    @staticmethod
    def is_product(args: tuple) -> bool:
        """Both factors are tensors (x ⊙ y), not a tensor and a number."""
        return all(isinstance(a, Tensor) for a in args[:2])


class Mean(Glue):
    """Mean over dimensions: coefficients 1/n."""

    kind = "mean"

    def vjp(self, args, kwargs, slots, cols, out=None):
        if slots == [0]:
            got = _mean(args, kwargs, cols)
            if got is not None:
                return [got]
        return _generic_vjp(self, args, kwargs, slots, cols)

    def sq_vjp(self, args, kwargs, out, slots, d, g):
        (cols,) = self.vjp(args, kwargs, slots, d[None])
        n = args[0].numel() / max(out.numel(), 1)
        return [cols[0] / n]


_ATEN = torch.ops.aten
#: PyTorch's fused backward kernels: grad ↦ grad ⊙ f'(a), from (grad, a, f(a))
_FUSED = {
    "tanh": lambda grad, a, y: _ATEN.tanh_backward(grad, y),
    "sigmoid": lambda grad, a, y: _ATEN.sigmoid_backward(grad, y),
    "gelu": lambda grad, a, y: _ATEN.gelu_backward(grad, a),
    "relu": lambda grad, a, y: _ATEN.threshold_backward(grad, y, 0),
}


class Elementwise(Glue):
    """f applied entry by entry: f', f'' in closed form where given, else forward-mode AD; the
    products with f' by PyTorch's fused backward kernels where there is one."""

    kind = "elementwise"
    keeps_diagonal = True

    def __init__(self, fn, name, derivs=None):
        super().__init__(fn, name)
        self._derivs = derivs
        self._fused = _FUSED.get(name)

    def _scale(self, args, kwargs, t, out):
        """f'(a) ⊙ t (t may carry a leading column axis), or None without a fused kernel."""
        if self._fused is None or _options(args, kwargs):
            return None
        a = args[0]
        y = (
            out
            if out is not None
            else (None if self.name in ("gelu",) else self.call(args, kwargs))
        )
        if t.dim() > a.dim():
            a = a.expand(t.shape)
            y = None if y is None else y.expand(t.shape)
        return self._fused(t, a, y)

    def derivatives(self, args, kwargs, out, second):
        """f'(a), f''(a) at a = ``args[0]`` (further arguments: the function's options)."""
        a = args[0]
        if self._derivs is not None and not _options(args, kwargs):
            return self._derivs(a, out, second)

        def f(u):
            return self.call((u, *args[1:]), kwargs)

        return pointwise.derivatives(f, a, second)

    def call(self, args, kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
        return self.fn(args[0], **kwargs) if len(args) == 1 else self.fn(*args, **kwargs)

    def vjp(self, args, kwargs, slots, cols, out=None):
        if slots != [0]:
            return _generic_vjp(self, args, kwargs, slots, cols)
        fused = self._scale(args, kwargs, cols, out)
        if fused is not None:
            return [fused]
        f1, _ = self.derivatives(args, kwargs, None, False)
        return [cols * f1]

    def sq_vjp(self, args, kwargs, out, slots, d, g):
        if slots != [0]:
            raise NotImplementedError(f"{self.name} of two tensors")
        if g is None:
            once = self._scale(args, kwargs, d, out)
            if once is not None:
                return [self._scale(args, kwargs, once, out)]
        f1, f2 = self.derivatives(args, kwargs, out, g is not None)
        r = d * f1.square()
        return [r if g is None else r + f2 * g]


def _options(args: tuple, kwargs: dict) -> bool:
    """Whether an element-wise call sets options its closed form does not know (GELU's
    ``approximate="tanh"``, a slope, ...)."""
    kw = {
        k: v
        for k, v in kwargs.items()
        if k != "inplace" and not (k == "approximate" and v == "none")
    }
    return len(args) > 1 or bool(kw)


class MatMul(Glue):
    """``a @ b`` (matmul / bmm) of two tensors; LeCun: d·(b²)ᵀ and (a²)ᵀ·d."""

    kind = "matmul"

    def vjp(self, args, kwargs, slots, cols, out=None):
        a, b = args[0], args[1]
        if a.dim() < 2 or b.dim() < 2:
            return _generic_vjp(self, args, kwargs, slots, cols)
        res = []
        for s in slots:
            if s == 0:
                res.append(unbroadcast(cols @ b.transpose(-2, -1), a.shape, 1))
            else:
                res.append(unbroadcast(a.transpose(-2, -1) @ cols, b.shape, 1))
        return res

    def sq_vjp(self, args, kwargs, out, slots, d, g):
        a, b = args[0], args[1]
        res = []
        for s in slots:
            if s == 0:
                res.append(unbroadcast(d @ b.square().transpose(-2, -1), a.shape))
            else:
                res.append(unbroadcast(a.square().transpose(-2, -1) @ d, b.shape))
        return res


class Softmax(Glue):
    """p = softmax(a, dim)."""

    kind = "softmax"

    def _dim(self, args, kwargs) -> int:
        return kwargs.get("dim", args[1] if len(args) > 1 else None)

    def vjp(self, args, kwargs, slots, cols, out=None):
        p = self.call(args, kwargs)
        dim = self._dim(args, kwargs) % p.dim() + 1
        return [p * (cols - (cols * p).sum(dim, keepdim=True))]

    def sq_vjp(self, args, kwargs, out, slots, d, g):
        p = out
        dim = self._dim(args, kwargs)
        p2 = p.square()
        res = p2 * (d * (1 - 2 * p) + (d * p2).sum(dim, keepdim=True))
        if g is not None:
            res = res + p * (1 - 2 * p) * (g - (g * p).sum(dim, keepdim=True))
        return [res]


# --------------------------------------------------------------------------- the table
def _tanh(a, y, second):
    y = torch.tanh(a) if y is None else y
    f1 = 1 - y * y
    return f1, (-2 * y * f1 if second else None)


def _sigmoid(a, y, second):
    s = torch.sigmoid(a) if y is None else y
    f1 = s * (1 - s)
    return f1, (f1 * (1 - 2 * s) if second else None)


def _relu(a, y, second):
    return (a > 0).to(a.dtype), (torch.zeros_like(a) if second else None)


def _gelu(a, y, second):
    """Exact GELU, f = x Φ(x): f' = Φ + xφ, f'' = φ(2 − x²)."""
    phi = torch.exp(-0.5 * a * a) * (2 * math.pi) ** -0.5
    cdf = 0.5 * (1 + torch.erf(a * 2**-0.5))
    return cdf + a * phi, (phi * (2 - a * a) if second else None)


def _exp(a, y, second):
    y = torch.exp(a) if y is None else y
    return y, (y if second else None)


_ELEMENTWISE: dict[Any, tuple[str, Any]] = {
    torch.tanh: ("tanh", _tanh),
    torch.sigmoid: ("sigmoid", _sigmoid),
    torch.relu: ("relu", _relu),
    F.relu: ("relu", _relu),
    F.tanh: ("tanh", _tanh),
    F.sigmoid: ("sigmoid", _sigmoid),
    torch.exp: ("exp", _exp),
    F.gelu: ("gelu", _gelu),
    F.silu: ("silu", None),
    F.elu: ("elu", None),
    F.leaky_relu: ("leaky_relu", None),
    F.softplus: ("softplus", None),
    F.mish: ("mish", None),
    F.hardtanh: ("hardtanh", None),
    F.relu6: ("relu6", None),
    F.logsigmoid: ("logsigmoid", None),
    torch.sin: ("sin", None),
    torch.cos: ("cos", None),
    torch.square: ("square", None),
    torch.sqrt: ("sqrt", None),
    torch.log: ("log", None),
    torch.abs: ("abs", None),
}
_ELEMENTWISE_METHODS = {
    "tanh": _tanh,
    "sigmoid": _sigmoid,
    "relu": _relu,
    "exp": _exp,
    "sin": None,
    "cos": None,
    "square": None,
    "sqrt": None,
    "log": None,
    "abs": None,
}

#: functions whose every output entry is one input entry (keeps a diagonal diagonal) ...
_SELECT = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "contiguous", "squeeze",
    "unsqueeze", "t", "movedim", "swapaxes", "flip", "roll", "expand", "expand_as", "repeat",
    "getitem", "select", "narrow", "cat", "concat", "stack", "split", "chunk", "unbind", "clone",
    "tensor_split", "index_select", "gather", "pad", "masked_fill", "dropout", "identity",
    "view_as", "reshape_as", "type_as", "float", "double", "to",
}  # fmt: skip
#: functions whose result does not depend (differentiably) on the values of their inputs
CONSTANT = {
    "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "zeros_like", "ones_like",
    "full_like", "empty_like", "size", "dim", "numel", "detach", "getattr",
    "gt", "ge", "lt", "le", "eq", "ne", "greater", "greater_equal", "less", "less_equal",
    "logical_and", "logical_or", "logical_not", "logical_xor", "isnan", "isinf", "isfinite",
    "argmax", "argmin", "sign", "bool", "long", "int",
}  # fmt: skip
#: ... and those summing input entries (coefficient 1)
_SUM = {"sum"}
_MEAN = {"mean"}

_FUNCTIONS: dict[Any, str] = {
    torch.flatten: "flatten",
    torch.reshape: "reshape",
    torch.permute: "permute",
    torch.transpose: "transpose",
    torch.squeeze: "squeeze",
    torch.unsqueeze: "unsqueeze",
    torch.movedim: "movedim",
    torch.flip: "flip",
    torch.roll: "roll",
    torch.cat: "cat",
    torch.concat: "concat",
    torch.stack: "stack",
    torch.split: "split",
    torch.chunk: "chunk",
    torch.unbind: "unbind",
    torch.narrow: "narrow",
    torch.select: "select",
    torch.index_select: "index_select",
    torch.gather: "gather",
    torch.t: "t",
    torch.clone: "clone",
    torch.sum: "sum",
    torch.mean: "mean",
    operator.getitem: "getitem",
    F.pad: "pad",
    F.dropout: "dropout",
    torch.masked_fill: "masked_fill",
}


def _dropout(x, p=0.5, training=False, inplace=False):
    if training:
        raise NotImplementedError("dropout in training mode")
    return x


def _method(name: str) -> Callable[..., Any]:
    def call(self, *args, **kwargs):
        return getattr(self, name)(*args, **kwargs)

    call.__name__ = name
    return call


_OUT_OF_PLACE = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
    operator.imatmul: operator.matmul,
    operator.ipow: operator.pow,
}


def glue_for(op: str, target: Any) -> Glue | None:
    """The glue of an fx ``call_function`` (``op="call_function"``, target a function) or
    ``call_method`` node (target a method name); None when the table does not know it (the
    caller then treats it as opaque: columns only, by ``torch.func``). In-place functions
    (``x += y``, ``x.mul_(2)``) are evaluated out of place: the sweep keeps every value."""
    target = _OUT_OF_PLACE.get(target, target) if op == "call_function" else target
    if op == "call_method" and target.endswith("_") and not target.endswith("__"):
        target = target[:-1]
    if op == "call_method":
        name, fn = target, _method(target)
    else:
        fn = target
        name = _FUNCTIONS.get(target) or getattr(target, "__name__", repr(target))
    found = special(op, target)
    if found is not None:
        return found
    if op == "call_function" and target in _ELEMENTWISE:
        label, derivs = _ELEMENTWISE[target]
        return Elementwise(target, label, derivs)
    if op == "call_method" and name in _ELEMENTWISE_METHODS:
        return Elementwise(fn, name, _ELEMENTWISE_METHODS[name])
    found = _arithmetic(target, name, fn)
    if found is not None:
        return found
    if target in (torch.softmax, F.softmax) or name == "softmax":
        return Softmax(fn, "softmax")
    if name == "dropout":
        return Route(_dropout if op == "call_function" else fn, "dropout", keeps_diagonal=True)
    if name in _SELECT:
        return Route(fn, name, keeps_diagonal=True)
    if name in _SUM:
        return Route(fn, name)
    if name in _MEAN:
        return Mean(fn, name)
    return None


def _arithmetic(target: Any, name: str, fn: Any) -> Glue | None:
    """The glue of +, −, unary −, ×, ÷, ** and matrix products (as operators, torch functions
    or methods), or None."""
    if target in (operator.add, operator.iadd, torch.add) or name in ("add", "add_", "__add__"):
        return Add(fn, "add")
    if target in (operator.sub, operator.isub, torch.sub) or name in ("sub", "__sub__"):
        return Add(fn, "sub", sign=-1.0)
    if target in (operator.neg, torch.neg) or name == "neg":
        return _Neg(fn, "neg")
    if target in (operator.mul, operator.imul, torch.mul) or name in ("mul", "__mul__"):
        return Scale(fn, "mul")
    if target in (operator.truediv, operator.itruediv, torch.div) or name in ("div", "truediv"):
        return Scale(fn, "div", divide=True)
    if target in (operator.pow, torch.pow) or name in ("pow", "__pow__"):
        return Elementwise(fn, "pow")
    if target in (operator.matmul, torch.matmul, torch.bmm) or name in ("matmul", "bmm"):
        return MatMul(fn, "matmul")
    return None


class _Neg(Glue):
    kind = "route"
    keeps_diagonal = True

    def vjp(self, args, kwargs, slots, cols, out=None):
        return [-cols]

    def sq_vjp(self, args, kwargs, out, slots, d, g):
        return [d]


def opaque(op: str, target: Any) -> Glue:
    """A function the table does not know: exact columns by ``torch.func``, no LeCun rule."""
    if op == "call_method" and target.endswith("_") and not target.endswith("__"):
        target = target[:-1]  # out of place
    fn = _method(target) if op == "call_method" else _OUT_OF_PLACE.get(target, target)
    return Glue(fn, target if isinstance(target, str) else getattr(target, "__name__", "?"))


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class LinearFn(Glue):
    """``F.linear(x, weight, bias)``: a Linear layer whose weight (and bias) are graph values,
    usually parameters read by the forward (``F.linear(x, self.w)``) or slices of one (attention's
    packed ``in_proj_weight``). The parameter terms are LeCun's and the column rules of
    :class:`~optbrain.curvature.rules.LinearRule`, computed by the sweep."""

    kind = "linear"

    @staticmethod
    def parts(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor | None]:
        x = args[0]
        w = args[1] if len(args) > 1 else kwargs["weight"]
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        return x, w, b

    def vjp(self, args, kwargs, slots, cols, out=None):
        if slots == [0]:
            w = self.parts(args, kwargs)[1]
            return [cols @ w]
        return _generic_vjp(self, args, kwargs, slots, cols)

    def sq_vjp(self, args, kwargs, out, slots, d, g):
        """Input: d·W²; weight: Σ d xᵀ² and bias: Σ d over samples and positions (LeCun's
        connection rule, the weight being shared by every position)."""
        x, w, b = self.parts(args, kwargs)
        res = []
        for s in slots:
            if s == 0:
                res.append(d @ w.square())
            elif s == 1:
                d2 = d.reshape(-1, d.shape[-1])
                res.append(d2.T @ x.square().reshape(-1, x.shape[-1]))
            else:
                res.append(d.reshape(-1, d.shape[-1]).sum(0))
        return res


class Where(Glue):
    """``torch.where(cond, x, y)``: each output entry is one entry of x or y (a mask attached to a
    parameter reads it through this)."""

    kind = "route"
    keeps_diagonal = True

    def vjp(self, args, kwargs, slots, cols, out=None):
        cond = args[0]
        out = []
        for s in slots:
            pick = cond if s == 1 else ~cond
            out.append(unbroadcast(cols * pick, args[s].shape, 1))
        return out

    def sq_vjp(self, args, kwargs, out, slots, d, g):
        return [c[0] for c in self.vjp(args, kwargs, slots, d[None])]


_SPECIAL = {F.linear: LinearFn, torch.where: Where}


def special(op: str, target: Any) -> Glue | None:
    """F.linear and torch.where (call_function only)."""
    if op == "call_function" and target in _SPECIAL:
        return _SPECIAL[target](target, getattr(target, "__name__", "?"))
    return None
