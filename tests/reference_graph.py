"""A slow transcription of LeCun's recursion over a traced graph, with dense Jacobians.

The graph's *structure* (which functions, in which order) is taken from a ``torch.fx.GraphModule``
— the one optbrain's reader builds, so that both sides use the same granularity — but nothing of
optbrain's math is used: at every node and for every sample, the Jacobian of the node's function
with respect to each input is formed densely with ``torch.autograd.functional.jacobian``, and

* the diagonal at an input is Σ_out J[out, in]² d[out] (the squared-Jacobian propagation), plus,
  in the full variant, the diagonal of Σ_out g[out] ∂²out/∂in² (``torch.func.hessian``);
* a node used by several others gets the sum of their contributions;
* a module's parameter gets Σ_out (∂out/∂p)² d[out]; a parameter read by the forward gets the
  diagonal of its ``get_attr`` node, summed over samples;
* the output boundary is the diagonal of the per-sample loss Hessian (``torch.func.hessian``).

A tuple-valued node (``chunk``, ``split``) gets one diagonal per element, from its ``getitem``
users, and hands back the sum over elements.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.autograd.functional import jacobian
from torch.func import functional_call, hessian
from torch.fx.node import map_arg


def _call(gm: fx.GraphModule, node: fx.Node, args, kwargs):
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    return getattr(args[0], node.target)(*args[1:], **kwargs)


def _attr(gm: fx.GraphModule, target: str):
    v = gm
    for part in target.split("."):
        v = getattr(v, part)
    return v


def _forward(gm, x):
    """Node values with the autograd graph kept (parameters require grad)."""
    env = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = x if not env else (node.args[0] if node.args else None)
        elif node.op == "get_attr":
            env[node] = _attr(gm, node.target)
        elif node.op == "output":
            return env, env[node.args[0]]
        else:
            args = map_arg(node.args, lambda n: env[n])
            kwargs = map_arg(node.kwargs, lambda n: env[n])
            env[node] = _call(gm, node, args, kwargs)
    raise AssertionError("no output")


def _positions(node: fx.Node) -> list[tuple]:
    """Paths (into args, possibly into one list argument) of the node's tensor inputs."""
    out = []
    for i, a in enumerate(node.args):
        if isinstance(a, fx.Node):
            out.append((i,))
        elif isinstance(a, (list, tuple)):
            out += [(i, j) for j, b in enumerate(a) if isinstance(b, fx.Node)]
    return out


def _substitute(args, path, value):
    args = list(args)
    if len(path) == 1:
        args[path[0]] = value
    else:
        inner = list(args[path[0]])
        inner[path[1]] = value
        args[path[0]] = inner
    return tuple(args)


def _get(args, path):
    return args[path[0]] if len(path) == 1 else args[path[0]][path[1]]


def lecun_graph_slow(
    gm: fx.GraphModule, model: nn.Module, loss_fn, batches, gauss_newton: bool
) -> dict[str, Tensor]:
    """LeCun's diagonal (see the module docstring) keyed by ``model.named_parameters()`` names."""
    names = {}
    for raw, p in model.named_parameters():
        names.setdefault(id(p), raw)
    result = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    xs = torch.cat([b[0] for b in batches])
    ys = torch.cat([b[1] for b in batches])
    gm.eval()
    for n in range(xs.shape[0]):
        env, out = _forward(gm, xs[n][None])
        order = [k for k in env if isinstance(env[k], Tensor) and env[k].requires_grad]
        loss = loss_fn(out, ys[n][None])
        grads = torch.autograd.grad(loss, [env[k] for k in order], allow_unused=True)
        gval = {k: (g.detach() if g is not None else torch.zeros_like(env[k]))
                for k, g in zip(order, grads)}  # fmt: skip
        vals = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in env.items()}
        yo = ys[n][None]
        hout = hessian(lambda o, yo=yo: loss_fn(o, yo))(vals[_output(gm)])
        k = vals[_output(gm)].numel()
        d = {_output(gm): torch.diagonal(hout.reshape(k, k)).reshape(vals[_output(gm)].shape)}
        for node in reversed(list(gm.graph.nodes)):
            if node not in d or node.op in ("placeholder", "output"):
                continue
            dn = d.pop(node)
            src = node.args[0] if node.args else None
            if (
                node.op == "call_function"
                and node.target is operator.getitem
                and isinstance(src, fx.Node)
                and isinstance(vals[src], tuple)
            ):
                parts = d.setdefault(src, {})
                i = node.args[1]
                parts[i] = dn if i not in parts else parts[i] + dn
                continue
            if node.op == "get_attr":
                p = vals[node]
                if (
                    isinstance(_attr(gm, node.target), nn.Parameter)
                    and id(_attr(gm, node.target)) in names
                ):
                    result[names[id(_attr(gm, node.target))]] += dn
                continue
            _step(gm, node, vals, gval, dn, d, gauss_newton, result, names)
    return {k: v / xs.shape[0] for k, v in result.items()}


def _output(gm):
    return next(n for n in gm.graph.nodes if n.op == "output").args[0]


def _step(gm, node, vals, gval, dn, d, gauss_newton, result, names):
    args = map_arg(node.args, lambda a: vals[a])
    kwargs = map_arg(node.kwargs, lambda a: vals[a])
    if isinstance(dn, dict):  # a tuple-valued node: one diagonal per element
        for i, di in dn.items():
            _element_step(gm, node, args, kwargs, i, di, d)
        return
    g_out = gval.get(node)
    flat_d = dn.reshape(-1)
    for path in _positions(node):
        src = node.args[path[0]] if len(path) == 1 else node.args[path[0]][path[1]]
        x = _get(args, path)
        if not isinstance(x, Tensor) or not x.is_floating_point():
            continue
        x = x.clone()  # an expanded view shares memory between entries

        def f(t, path=path):
            return _call(gm, node, _substitute(args, path, t), kwargs)

        jac = jacobian(f, x).reshape(dn.numel(), x.numel())
        contrib = (jac.square().T @ flat_d).reshape(x.shape)
        if not gauss_newton and g_out is not None:
            gg = g_out

            def s(t, path=path, gg=gg):
                return (f(t, path) * gg).sum()

            h = hessian(s)(x).reshape(x.numel(), x.numel())
            contrib = contrib + torch.diagonal(h).reshape(x.shape)
        d[src] = contrib if src not in d else d[src] + contrib
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        for pname, p in m.named_parameters():
            if id(p) not in names:
                continue

            def fp(w, pname=pname):
                return functional_call(m, {pname: w}, args, kwargs)

            jac = jacobian(fp, p.detach()).reshape(dn.numel(), p.numel())
            result[names[id(p)]] += (jac.square().T @ flat_d).reshape(p.shape)


def _element_step(gm, node, args, kwargs, i, di, d):
    """Gauss–Newton part only: elements of split/chunk are linear selections (no residual)."""
    for path in _positions(node):
        src = node.args[path[0]] if len(path) == 1 else node.args[path[0]][path[1]]
        x = _get(args, path)

        def f(t, path=path):
            return _call(gm, node, _substitute(args, path, t), kwargs)[i]

        jac = jacobian(f, x).reshape(di.numel(), x.numel())
        contrib = (jac.square().T @ di.reshape(-1)).reshape(x.shape)
        d[src] = contrib if src not in d else d[src] + contrib
