"""How units pass through the functions a ``forward`` calls (the graph's glue).

Each function gets one of these treatments (the ``walk`` computes the atoms of its result, the
``check`` verifies, for a removal, that the function applied to the smaller model's values gives
the smaller value expected, e.g. that it has no hard-coded size):

* **identity** (``.to``, ``.float()``, ``.contiguous()``, ``.detach()``, ``dropout`` in eval mode,
  ``masked_fill``): the atoms pass unchanged (``detach`` too: the values still flow);
* **element-wise** (``x + y``, ``x - y``, ``x * y``, ``x / y``, ``-x``, ``torch.where``,
  activations such as ``torch.tanh``): entries that meet are united into one group, which is how
  residual additions and gates couple units;
* **routing** (views, reshapes, ``permute``, ``cat``/``stack``/``split``/``chunk``,
  ``getitem``, ``expand``, ``pad`` ...): evaluated on the atom maps themselves;
* **reductions and softmax** over some dimensions: a result entry whose inputs all belong to
  one group keeps it (a mean over time, a global average pool); one mixing groups blocks them;
* **pooling and interpolation** functions (``F.max_pool2d``, ``F.adaptive_avg_pool2d``, ...):
  per channel (dim 1);
* **constants** (``size``, ``new_zeros``, ...): no atoms;
* ``F.linear`` / ``F.conv1d/2d/3d`` (``groups=1``) whose weight is a whole parameter of a module
  (possibly behind an optbrain mask), as a bare ``nn.Linear`` or a custom module's
  ``F.linear(x, self.w, self.b)`` is traced: a layer like :mod:`.layers`' (producer and reader;
  key: the module path);
* anything else (``matmul``, ``F.linear`` on a slice of a weight, unknown functions): its inputs
  are blocked, naming the node, and its result gets blocked atoms.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor

from ..curvature.graph import glue as G
from ..paramdict import clean_name
from .atoms import UnionFind, broadcast_union, merge_along, mix_along
from .base import Records
from .call import Call, Read, along, block_inputs, fresh_blocked, same, zeros_like_value

IDENTITY = {
    "to", "float", "double", "half", "bfloat16", "type_as", "contiguous", "clone", "detach",
    "dropout", "identity", "masked_fill", "cpu", "cuda", "requires_grad",
}  # fmt: skip
ROUTE = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "squeeze", "unsqueeze",
    "t", "movedim", "swapaxes", "flip", "roll", "expand", "expand_as", "repeat", "getitem",
    "select", "narrow", "cat", "concat", "stack", "split", "chunk", "unbind", "tensor_split",
    "index_select", "gather", "pad", "view_as", "reshape_as", "repeat_interleave",
}  # fmt: skip
REDUCE = {"sum", "mean", "amax", "amin", "logsumexp"}
SOFTMAX = {"softmax", "log_softmax"}
POOLS = {
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.lp_pool1d,
    F.lp_pool2d, F.interpolate, F.upsample, F.local_response_norm,
}  # fmt: skip
_ENTRYWISE = (G.Elementwise, G.Add, G.Scale, G.Where)
_LAYERS = {F.linear: -1, F.conv1d: 1, F.conv2d: 1, F.conv3d: 1}


def kind(call: Call) -> str:
    """Which treatment (see the module docstring) a glue node gets."""
    glue = call.gn.glue
    name = glue.name
    target = call.gn.node.target
    if name in G.CONSTANT and name != "detach":
        return "constant"
    if name in IDENTITY:
        return "identity"
    if isinstance(glue, _ENTRYWISE) or name in ("neg", "add", "sub", "mul", "div"):
        return "entrywise"
    if target in POOLS:
        return "pool"
    if name in ROUTE or target is operator.getitem:
        return "route"
    if name in REDUCE:
        return "reduce"
    if name in SOFTMAX:
        return "softmax"
    if target in _LAYERS:
        return "layer"
    return "blocked"


def walk(rec: Records, call: Call):
    """The atoms of the node's result (see the module docstring)."""
    uf = rec.uf
    how = kind(call)
    if how == "constant":
        return zeros_like_value(call.out)
    if not call.has_atoms():
        return zeros_like_value(call.out)
    if how == "identity":
        return call.args[0]
    if how == "entrywise":
        reason = f"{call.gn.glue.name} broadcasts it over several units"
        return broadcast_union(uf, call.maps(), call.out.shape, call.name, reason)
    if how == "pool":
        if not isinstance(call.out, Tensor):
            return _blocked(uf, call, "returns indices")
        ids = merge_along(uf, call.args[0], 1, call.name, call.gn.glue.name)
        return along(ids, call.out.shape, 1)
    if how == "route":
        got = _route(call)
        if got is None:
            return _blocked(uf, call, "cannot be evaluated on unit maps")
        return got
    if how in ("reduce", "softmax"):
        dims = _dims(call)
        reason = f"{call.gn.glue.name} mixes these units (each result depends on several)"
        got = mix_along(uf, call.args[0], dims, call.name, reason)
        return _reshape_reduced(got, call, dims, how)
    if how == "layer":
        got = _functional_layer(rec, call)
        if got is not None:
            return got
    return _blocked(uf, call, "mixes units or is a function cells cannot see through")


def check(call: Call, expected) -> str | None:
    """For a removal: None if the function applied to the smaller model's values (``call.args``,
    group maps) gives ``expected``, else why not."""
    how = kind(call)
    if how == "constant" or not _any_nonzero(expected) and not call.has_atoms():
        return None
    if how == "identity":
        return None if same(call.args[0], expected) else "does not pass the smaller value on"
    if how == "entrywise":
        return _check_entrywise(call, expected)
    if how == "pool":
        return _check_axis(call, expected, 1)
    if how == "route":
        got = _route(call)
        if got is None or not same(got, expected):
            return (
                "gives a different result on the smaller tensors (a size written into the "
                "code, or a split that no longer falls between the same units)"
            )
        return None
    if how in ("reduce", "softmax"):
        dims = _dims(call)
        got = call.args[0].amax(dims, keepdim=True) if dims else call.args[0]
        got = _reshape_reduced(got, call, dims, how, check=True)
        return None if _shape(got) == _shape(expected) else "reduces a tensor of another size"
    return "its inputs changed: removal cannot pass through it"


# --------------------------------------------------------------------------- functional layers
def _functional_layer(rec: Records, call: Call):
    """``F.linear`` / ``F.conv*d`` on whole parameters: a layer (None if not of that form)."""
    node = call.gn.node
    target = node.target
    axis = _LAYERS[target]
    conv = axis == 1
    w_node = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    b_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    x = call.args[0]
    weight = _whole_param(rec, w_node)
    bias = _whole_param(rec, b_node) if b_node is not None else None
    if weight is None or (b_node is not None and bias is None) or groups != 1:
        return None
    w_gn, w_owner, w_attr = weight
    w = getattr(w_owner, w_attr)
    if not isinstance(x, Tensor) or (conv and x.dim() != w.dim()):
        return None
    path = clean_name(w_gn.node.target).rpartition(".")[0]
    w_name = w_gn.param[0]
    n_out = w.shape[0]
    cols = merge_along(rec.uf, x, axis, call.name, f"{target.__name__} of {w_name!r}")
    rec.reads.append(Read(call.name, 0, along(cols, x.shape, axis)))
    out = rec.producer(w_owner, path, n_out, "channel" if conv else "unit", call.name, call.order)
    rec.axis(w_name, w_owner, w_attr, 0, out, "fan_in", call.name)
    rec.axis(w_name, w_owner, w_attr, 1, cols, "fan_out", call.name)
    rec.consumed.add(w_gn.name)
    if bias is not None:
        b_gn, b_owner, b_attr = bias
        rec.axis(b_gn.param[0], b_owner, b_attr, 0, out, "fan_in", call.name)
        rec.consumed.add(b_gn.name)
    return along(out, call.out.shape, axis)


def _whole_param(rec: Records, node):
    """(param node, owner module, attribute) when ``node`` is a whole parameter read by the
    forward, directly or through an optbrain mask's ``where``; else None."""
    if not hasattr(node, "name"):
        return None
    gn = rec.graph.by_name.get(node.name)
    if gn is not None and gn.kind == "glue" and gn.glue.name == "where" and len(node.args) > 1:
        return _whole_param(rec, node.args[1])
    if gn is None or gn.kind != "param":
        return None
    owner_path, _, attr = node.target.rpartition(".")
    owner = rec.model.get_submodule(owner_path)
    return gn, owner, attr


# --------------------------------------------------------------------------- helpers
def _blocked(uf: UnionFind, call: Call, why: str):
    reason = f"{call.gn.glue.name} {why}"
    block_inputs(uf, call, reason)
    return fresh_blocked(uf, call.out, call.name, reason)


def _route(call: Call):
    """The routing function applied to the atom maps (None if it fails or gives no maps)."""
    glue = call.gn.glue
    args, kwargs = list(call.args), dict(call.kwargs)
    if glue.name == "pad":
        mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
        if mode != "constant":
            return None
        args = args[:2]
        kwargs = {"mode": "constant", "value": 0}
    try:
        got = glue.call(tuple(args), kwargs)
    except (RuntimeError, TypeError, ValueError, IndexError):
        return None
    return got if _long_maps(got) else None


def _long_maps(value) -> bool:
    if isinstance(value, Tensor):
        return value.dtype == torch.long
    if isinstance(value, (tuple, list)):
        return all(_long_maps(v) for v in value)
    return False


def _dims(call: Call) -> tuple[int, ...]:
    x = call.args[0]
    glue = call.gn.glue
    dim = call.kwargs.get("dim", call.args[1] if len(call.args) > 1 else None)
    if glue.name in SOFTMAX and dim is None:
        dim = -1
    if dim is None:
        return tuple(range(x.dim()))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return tuple(d % x.dim() for d in dims)


def _reshape_reduced(got: Tensor, call: Call, dims, how: str, check: bool = False) -> Tensor:
    if how == "softmax":
        return got.expand(call.args[0].shape) if check else got.expand(call.out.shape)
    keep = call.kwargs.get("keepdim", call.args[2] if len(call.args) > 2 else False)
    if not keep and dims:
        got = got.squeeze(dims) if got.dim() else got
        if got.dim() > (call.args[0].dim() - len(dims)):
            got = got.reshape([s for i, s in enumerate(got.shape) if i not in dims])
    if not check and tuple(got.shape) != tuple(call.out.shape):
        got = got.reshape(call.out.shape)
    return got


def _check_entrywise(call: Call, expected: Tensor) -> str | None:
    shapes = [tuple(m.shape) for m in call.maps()]
    try:
        shape = torch.broadcast_shapes(*shapes) if shapes else ()
    except RuntimeError:
        return "joins tensors whose sizes no longer fit (a size written into the code?)"
    if tuple(shape) != tuple(expected.shape):
        return "gives a result of another size"
    for m in call.maps():
        if m.dim() != len(shape) or tuple(m.shape) != tuple(shape):
            continue  # a shared (broadcast) entry: only its size matters
        if not bool(((m == 0) | (m == expected)).all()):
            return "would join entries of different units"
    return None


def _check_axis(call: Call, expected: Tensor, axis: int) -> str | None:
    x = call.args[0]
    if x.dim() != expected.dim() or x.shape[axis] != expected.shape[axis]:
        return "acts on a tensor whose channels no longer fit"
    return None


def _any_nonzero(value) -> bool:
    if isinstance(value, Tensor):
        return bool((value != 0).any())
    if isinstance(value, (tuple, list)):
        return any(_any_nonzero(v) for v in value)
    return False


def _shape(value):
    return tuple(value.shape) if isinstance(value, Tensor) else None
