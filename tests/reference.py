"""Dense float64 oracles for the curvature estimators, written only with ``torch.func``.

Nothing here imports optbrain: every quantity is recomputed from its definition so that the tests
compare the library against an independent implementation.

The objective is ``E(θ) = (1/N) Σ_n ℓ_n(θ)`` with ``ℓ_n = loss_fn(model(x_n[None]), y_n[None])``
(the per-sample loss as the user's loss defines it on a batch of one), whatever the batching of the
data. Parameters are flattened in ``model.named_parameters()`` order (tied parameters once).

All oracles evaluate the model in eval mode and restore its previous modes afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

Batches = Sequence[tuple[Tensor, Tensor]]
ParamDict = dict[str, Tensor]

# --------------------------------------------------------------------------- plumbing


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.train(mode)


def params_of(model: nn.Module) -> ParamDict:
    """Detached copies of the trainable parameters, in ``named_parameters`` order."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def flatten(d: ParamDict) -> Tensor:
    return torch.cat([v.reshape(-1) for v in d.values()])


def unflatten(vec: Tensor, like: ParamDict) -> ParamDict:
    """Split a flat vector into tensors of the shapes (and key order) of ``like``."""
    out: ParamDict = {}
    i = 0
    for k, v in like.items():
        out[k] = vec[i : i + v.numel()].reshape(v.shape)
        i += v.numel()
    if i != vec.numel():
        raise ValueError(f"vector has {vec.numel()} entries, parameters {i}")
    return out


def diag_to_params(mat: Tensor, like: ParamDict) -> ParamDict:
    """The diagonal of a P×P matrix as a ParamDict shaped like ``like``."""
    return unflatten(torch.diagonal(mat).clone(), like)


def concat(batches: Batches) -> tuple[Tensor, Tensor]:
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


def _per_sample_loss_fn(model: nn.Module, loss_fn):
    def loss_one(p: ParamDict, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(functional_call(model, p, (x[None],)), y[None])

    return loss_one


def per_sample_losses(
    model: nn.Module, loss_fn, batches: Batches, params: ParamDict | None = None, *, use_vmap=True
) -> Tensor:
    """``[ℓ_1, ..., ℓ_N]`` at ``params`` (default: the model's current parameters)."""
    p = params_of(model) if params is None else params
    x, y = concat(batches)
    loss_one = _per_sample_loss_fn(model, loss_fn)
    with eval_mode(model):
        if use_vmap:
            return vmap(loss_one, in_dims=(None, 0, 0))(p, x, y)
        return torch.stack([loss_one(p, x[n], y[n]) for n in range(x.shape[0])])


def objective(
    model: nn.Module, loss_fn, batches: Batches, params: ParamDict | None = None, *, use_vmap=True
) -> Tensor:
    """E(θ) = mean of the per-sample losses."""
    return per_sample_losses(model, loss_fn, batches, params, use_vmap=use_vmap).mean()


# --------------------------------------------------------------------------- dense oracles


def dense_hessian(model: nn.Module, loss_fn, batches: Batches, *, use_vmap=True) -> Tensor:
    """The full P×P Hessian of E over the flattened parameters."""
    like = params_of(model)

    def e_flat(theta: Tensor) -> Tensor:
        return objective(model, loss_fn, batches, unflatten(theta, like), use_vmap=use_vmap)

    theta = flatten(like)
    if use_vmap:
        return hessian(e_flat)(theta)
    return jacrev(jacrev(e_flat))(theta)


def per_sample_jacobians(model: nn.Module, batches: Batches, *, use_vmap=True) -> Tensor:
    """J_n = ∂f(x_n)/∂θ for every sample: shape (N, C, P) with C = outputs per sample."""
    like = params_of(model)
    theta = flatten(like)
    x, _ = concat(batches)

    def f_flat(t: Tensor, xi: Tensor) -> Tensor:
        return functional_call(model, unflatten(t, like), (xi[None],)).reshape(-1)

    with eval_mode(model):
        if use_vmap:
            return vmap(jacrev(f_flat), in_dims=(None, 0))(theta, x)
        return torch.stack([jacrev(f_flat)(theta, x[n]) for n in range(x.shape[0])])


def outputs(model: nn.Module, batches: Batches) -> Tensor:
    """Per-sample model outputs f(x_n), shape (N, *out)."""
    x, _ = concat(batches)
    with eval_mode(model), torch.no_grad():
        return torch.cat([model(x[n][None]) for n in range(x.shape[0])])


def per_sample_output_hessians(model: nn.Module, loss_fn, batches: Batches) -> Tensor:
    """H_n = ∂²ℓ_n/∂f² (flattened output): shape (N, C, C)."""
    out = outputs(model, batches)
    _, y = concat(batches)
    shape = out.shape[1:]

    def loss_of_out(o: Tensor, yi: Tensor) -> Tensor:
        return loss_fn(o.reshape(shape)[None], yi[None])

    return torch.stack(
        [hessian(loss_of_out)(out[n].reshape(-1), y[n]) for n in range(out.shape[0])]
    )


def dense_ggn(model: nn.Module, loss_fn, batches: Batches, *, use_vmap=True) -> Tensor:
    """(1/N) Σ_n J_nᵀ H_n J_n."""
    j = per_sample_jacobians(model, batches, use_vmap=use_vmap)
    h = per_sample_output_hessians(model, loss_fn, batches)
    return torch.einsum("nci,ncd,ndj->ij", j, h, j) / j.shape[0]


def per_sample_gradients(model: nn.Module, loss_fn, batches: Batches, *, use_vmap=True) -> Tensor:
    """∇θ ℓ_n for every sample, shape (N, P)."""
    like = params_of(model)
    theta = flatten(like)
    x, y = concat(batches)
    loss_one = _per_sample_loss_fn(model, loss_fn)

    def loss_flat(t: Tensor, xi: Tensor, yi: Tensor) -> Tensor:
        return loss_one(unflatten(t, like), xi, yi)

    with eval_mode(model):
        if use_vmap:
            return vmap(grad(loss_flat), in_dims=(None, 0, 0))(theta, x, y)
        return torch.stack([grad(loss_flat)(theta, x[n], y[n]) for n in range(x.shape[0])])


def hessian_diag(model: nn.Module, loss_fn, batches: Batches, *, use_vmap=True) -> ParamDict:
    return diag_to_params(
        dense_hessian(model, loss_fn, batches, use_vmap=use_vmap), params_of(model)
    )


def ggn_diag(model: nn.Module, loss_fn, batches: Batches, *, use_vmap=True) -> ParamDict:
    return diag_to_params(dense_ggn(model, loss_fn, batches, use_vmap=use_vmap), params_of(model))


def empirical_fisher_diag(
    model: nn.Module, loss_fn, batches: Batches, *, use_vmap=True
) -> ParamDict:
    """(1/N) Σ_n (∇θ ℓ_n)²."""
    g = per_sample_gradients(model, loss_fn, batches, use_vmap=use_vmap)
    return unflatten((g**2).mean(0), params_of(model))


# --------------------------------------------------------------------------- LeCun, slowly

_A, _B = 1.7159, 2.0 / 3.0  # LeCun's scaled tanh: f(a) = A tanh(B a)


def activation_derivatives(module: nn.Module, a: float) -> tuple[float, float] | None:
    """(f'(a), f''(a)) in closed form for the elementwise activations; None if not one."""
    import math

    name = type(module).__name__
    if name == "Tanh":
        t = math.tanh(a)
        return 1.0 - t * t, -2.0 * t * (1.0 - t * t)
    if name == "Sigmoid":
        s = 1.0 / (1.0 + math.exp(-a))
        return s * (1.0 - s), s * (1.0 - s) * (1.0 - 2.0 * s)
    if name == "ReLU":
        return (1.0 if a > 0 else 0.0), 0.0
    if name in ("Identity", "Dropout"):
        return 1.0, 0.0
    if name == "SiLU":
        s = 1.0 / (1.0 + math.exp(-a))
        return s + a * s * (1.0 - s), s * (1.0 - s) * (2.0 + a * (1.0 - 2.0 * s))
    if name == "LeCunTanh":
        t = math.tanh(_B * a)
        return _A * _B * (1.0 - t * t), -2.0 * _A * _B * _B * t * (1.0 - t * t)
    return None


def loss_hessian_diag_closed_form(loss_fn, out: Tensor, y: Tensor) -> Tensor:
    """diag ∂²ℓ/∂f² for one sample (``out`` unbatched), from closed forms."""
    import math

    red = getattr(loss_fn, "reduction", None)
    if isinstance(loss_fn, nn.MSELoss):
        d = out.numel()
        return torch.full_like(out, 2.0 / d if red == "mean" else 2.0)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        z = [float(v) for v in out.reshape(-1)]
        m = max(z)
        e = [math.exp(v - m) for v in z]
        s = sum(e)
        return torch.tensor([ei / s * (1.0 - ei / s) for ei in e], dtype=out.dtype).reshape(
            out.shape
        )
    raise NotImplementedError(f"no closed-form boundary for {type(loss_fn).__name__}")


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _linear_rule(layer: nn.Linear, x: Tensor, d2a: Tensor, hw: Tensor, hb: Tensor | None):
    w = layer.weight.detach().tolist()
    xs, dd = x.tolist(), d2a.tolist()
    n_out, n_in = len(w), len(xs)
    d2x = [0.0] * n_in
    acc_w = [[0.0] * n_in for _ in range(n_out)]
    for i in range(n_out):
        for j in range(n_in):
            acc_w[i][j] += dd[i] * xs[j] ** 2
            d2x[j] += w[i][j] ** 2 * dd[i]
    hw += torch.tensor(acc_w, dtype=hw.dtype)
    if hb is not None:
        hb += torch.tensor(dd, dtype=hb.dtype)
    return torch.tensor(d2x, dtype=x.dtype)


def _conv_rule(layer: nn.Conv2d, x: Tensor, d2a: Tensor, hw: Tensor, hb: Tensor | None):
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise NotImplementedError("slow conv rule: only numeric zero padding")
    w = layer.weight.detach().tolist()
    c_out, c_in_g, kh, kw = layer.weight.shape
    sh, sw = _pair(layer.stride)
    ph, pw = _pair(layer.padding)
    dh, dw = _pair(layer.dilation)
    g_out = c_out // layer.groups
    _, hin, win = x.shape
    _, hout, wout = d2a.shape
    xs, dds = x.tolist(), d2a.tolist()
    d2x = torch.zeros_like(x).tolist()
    acc_w = torch.zeros_like(hw).tolist()
    acc_b = [0.0] * c_out
    for o in range(c_out):
        grp = o // g_out
        for p in range(hout):
            for q in range(wout):
                dd = dds[o][p][q]
                acc_b[o] += dd
                for ci in range(c_in_g):
                    c = grp * c_in_g + ci
                    for u in range(kh):
                        for v in range(kw):
                            r = p * sh - ph + u * dh
                            s = q * sw - pw + v * dw
                            if 0 <= r < hin and 0 <= s < win:  # padding: no connection
                                acc_w[o][ci][u][v] += dd * xs[c][r][s] ** 2
                                d2x[c][r][s] += w[o][ci][u][v] ** 2 * dd
    hw += torch.tensor(acc_w, dtype=hw.dtype)
    if hb is not None:
        hb += torch.tensor(acc_b, dtype=hb.dtype)
    return torch.tensor(d2x, dtype=x.dtype)


def _pool_windows(layer, d2y: Tensor):
    kh, kw = _pair(layer.kernel_size)
    sh, sw = _pair(layer.stride if layer.stride is not None else layer.kernel_size)
    if _pair(layer.padding) != (0, 0) or getattr(layer, "ceil_mode", False):
        raise NotImplementedError("slow pooling rule: no padding, no ceil_mode")
    if isinstance(layer, nn.MaxPool2d) and _pair(layer.dilation) != (1, 1):
        raise NotImplementedError("slow pooling rule: no dilation")
    c, hout, wout = d2y.shape
    dds = d2y.tolist()
    for ch in range(c):
        for p in range(hout):
            for q in range(wout):
                cells = [(ch, p * sh + u, q * sw + v) for u in range(kh) for v in range(kw)]
                yield dds[ch][p][q], cells


def _avgpool_rule(layer: nn.AvgPool2d, x: Tensor, d2y: Tensor) -> Tensor:
    d2x = torch.zeros_like(x).tolist()
    for dd, cells in _pool_windows(layer, d2y):
        k = len(cells)
        for c, r, s in cells:
            d2x[c][r][s] += dd / k**2
    return torch.tensor(d2x, dtype=x.dtype)


def _maxpool_rule(layer: nn.MaxPool2d, x: Tensor, d2y: Tensor) -> Tensor:
    xs = x.tolist()
    d2x = torch.zeros_like(x).tolist()
    for dd, cells in _pool_windows(layer, d2y):
        c, r, s = max(cells, key=lambda cell: xs[cell[0]][cell[1]][cell[2]])
        d2x[c][r][s] += dd
    return torch.tensor(d2x, dtype=x.dtype)


def lecun_recursion_slow(
    model: nn.Sequential, loss_fn, batches: Batches, gauss_newton: bool
) -> ParamDict:
    """LeCun, Denker & Solla's diagonal recursion, unit by unit and sample by sample.

    Supports ``nn.Sequential`` of Linear, Conv2d (zero padding, stride, dilation, groups),
    elementwise activations (Tanh, Sigmoid, ReLU, Identity, LeCunTanh), AvgPool2d / MaxPool2d
    (no padding), Flatten / Unflatten and Dropout (eval). Boundary: the diagonal of the
    per-sample loss Hessian w.r.t. the network output (MSE or cross-entropy).
    """
    if not isinstance(model, nn.Sequential):
        raise NotImplementedError("the slow recursion handles nn.Sequential only")
    layers = list(model)
    result = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    x_all, y_all = concat(batches)
    n_samples = x_all.shape[0]
    with eval_mode(model):
        for n in range(n_samples):
            # forward, keeping every intermediate value and the per-sample gradients wrt them
            hs = [x_all[n][None].detach().requires_grad_(True)]
            for layer in layers:
                hs.append(layer(hs[-1]))
            loss = loss_fn(hs[-1], y_all[n][None])
            grads = torch.autograd.grad(loss, hs[1:])
            gs = [None] + [g[0].detach() for g in grads]  # gs[k] = ∂ℓ/∂hs[k]
            vals = [h[0].detach() for h in hs]

            d2 = loss_hessian_diag_closed_form(loss_fn, vals[-1], y_all[n])
            for k in range(len(layers) - 1, -1, -1):
                layer, x_in = layers[k], vals[k]
                if isinstance(layer, nn.Linear):
                    hw = result[names[id(layer.weight)]]
                    hb = result[names[id(layer.bias)]] if layer.bias is not None else None
                    d2 = _linear_rule(layer, x_in, d2, hw, hb)
                elif isinstance(layer, nn.Conv2d):
                    hw = result[names[id(layer.weight)]]
                    hb = result[names[id(layer.bias)]] if layer.bias is not None else None
                    d2 = _conv_rule(layer, x_in, d2, hw, hb)
                elif isinstance(layer, nn.AvgPool2d):
                    d2 = _avgpool_rule(layer, x_in, d2)
                elif isinstance(layer, nn.MaxPool2d):
                    d2 = _maxpool_rule(layer, x_in, d2)
                elif isinstance(layer, (nn.Flatten, nn.Unflatten)):
                    d2 = d2.reshape(x_in.shape)
                elif activation_derivatives(layer, 0.0) is not None:
                    flat_a = x_in.reshape(-1).tolist()
                    flat_d2 = d2.reshape(-1).tolist()
                    flat_g = gs[k + 1].reshape(-1).tolist()  # ∂ℓ/∂x at the activation output
                    new = []
                    for a_u, d2_u, g_u in zip(flat_a, flat_d2, flat_g):
                        f1, f2 = activation_derivatives(layer, a_u)
                        new.append(f1 * f1 * d2_u + (0.0 if gauss_newton else f2 * g_u))
                    d2 = torch.tensor(new, dtype=x_in.dtype).reshape(x_in.shape)
                else:
                    raise NotImplementedError(f"slow recursion: no rule for {type(layer).__name__}")
    return {k: v / n_samples for k, v in result.items()}
