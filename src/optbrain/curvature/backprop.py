"""Structured second-order back-propagation over a chain of registry layers.

One backward sweep per chunk of samples carries, from the loss to the first layer with parameters:

* ``lecun``: a diagonal D (N × …) — LeCun, Denker & Solla's recursion, with or without the f''
  terms;
* ``ggn`` / ``hessian`` / ``ef`` / ``mc``: the per-sample curvature at the current point as signed
  columns plus a diagonal, Hₙ = Σ_k σ_kn S_kn S_knᵀ + diag(Dₙ). The loss contributes the columns
  (its Hessian's square root, its gradient, or sampled columns); in ``hessian`` mode every
  element-wise activation adds its residual f''(a)·∂ℓ/∂x to the diagonal, which becomes new columns
  when it meets a layer that mixes units. This is exact: a Linear/Conv weight's per-sample
  Hessian diagonal is a quadratic form of the per-sample Hessian at its output.

At each layer with parameters the rule turns the current curvature into parameter diagonals
(per-sample squared gradients of the columns, and LeCun's connection rule for the diagonal part).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from ..errors import NonFiniteLossError
from ..paramdict import ParamDict
from ..problem import Problem, eval_mode
from . import losses
from .chain import Link, build_chain
from .rules import ElementwiseRule, MaxPoolRule, ReshapeRule

MODES = ("lecun", "lecun_gn", "ggn", "hessian", "ef", "mc")
_BUDGET = 2**24  # elements per intermediate column tensor (~128 MB in float64)


def _chunks(problem: Problem, size: int | None) -> Iterator[tuple[Tensor, Tensor]]:
    for x, y in problem.batches():
        if size is None or x.shape[0] <= size:
            yield x, y
        else:
            for i in range(0, x.shape[0], size):
                yield x[i : i + size], y[i : i + size]


def _chunk_size(chain: list[Link], xs: list[Tensor], k0: int, mode: str) -> int:
    """Samples per sweep so that no column tensor exceeds the element budget."""
    k = k0
    if mode == "hessian":
        k += sum(
            x[0].numel() for lk, x in zip(chain, xs[1:]) if isinstance(lk.rule, ElementwiseRule)
        )
    width = max(x[0].numel() for x in xs)
    width = max([width] + [lk.rule.column_cost(lk.module, x) for lk, x in zip(chain, xs)])
    return max(1, _BUDGET // max(k * width, 1))


def run(
    problem: Problem,
    mode: str,
    *,
    estimator: str,
    samples: int = 1,
    generator: torch.Generator | None = None,
    tick: Callable[[int, int], None] | None = None,
    chain: list[Link] | None = None,
) -> ParamDict:
    """Accumulate the parameter diagonal of ``mode`` over the problem's data (see module doc);
    ``chain`` may pass the model's chain when the caller has already built it."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    model = problem.model
    chain = chain if chain is not None else build_chain(model, estimator)
    wanted = problem.parameters()
    first = next(
        (i for i, lk in enumerate(chain) if any(n in wanted for n, _, _ in lk.params.values())),
        None,
    )
    acc: ParamDict = {n: torch.zeros_like(p) for n, p in wanted.items()}
    if first is None:
        return acc
    n_total = problem.n_samples
    done = 0
    with torch.no_grad(), eval_mode(model):
        chunk = None  # LeCun carries one diagonal: batches as given
        if not mode.startswith("lecun"):
            probe = [next(problem.batches())[0][:1]]
            for lk in chain:
                probe.append(lk.module(probe[-1]))
            k0 = {"ef": 1, "mc": samples}.get(mode, probe[-1][0].numel())
            chunk = _chunk_size(chain, probe, k0, mode)
        for x, y in _chunks(problem, chunk):
            xs = [x]
            for lk in chain:
                xs.append(lk.module(xs[-1]))
            if not torch.isfinite(xs[-1]).all():
                raise NonFiniteLossError(f"{estimator}: the model output contains NaN or inf")
            _sweep(problem, chain, xs, y, mode, first, acc, wanted, samples, generator)
            done += x.shape[0]
            if tick is not None:
                tick(done, n_total)
    for name in acc:  # finiteness is checked once, by DiagonalEstimator._finish
        acc[name] /= n_total
    return acc


def _add(acc: ParamDict, wanted, link: Link, contrib: dict[str, Tensor]) -> None:
    for attr, value in contrib.items():
        if attr not in link.params:
            continue
        name, _, mult = link.params[attr]
        if name not in wanted:
            continue
        acc[name] += value if mult is None else value * mult


def _sweep(problem, chain, xs, y, mode, first, acc, wanted, samples, generator) -> None:
    out = xs[-1]
    need_grad = mode in ("lecun", "hessian")
    g = losses.output_grads(problem, out, y) if (need_grad or mode == "ef") else None
    if mode in ("lecun", "lecun_gn"):
        d = losses.hessian_diagonal(problem, out, y)
        for i in range(len(chain) - 1, first - 1, -1):
            lk, x = chain[i], xs[i]
            if lk.params:
                _add(acc, wanted, lk, lk.rule.diag_params(lk.module, x, d))
            if i == first:
                break
            if isinstance(lk.rule, ElementwiseRule):
                y = xs[i + 1]
                if g is None:
                    d = lk.rule.scale2(lk.module, x, y, d)
                else:
                    f1, f2 = lk.rule.derivatives(lk.module, x, y, True)
                    d = f1.square() * d + f2 * g
                    g = f1 * g
            else:
                d = lk.rule.sq_vjp(lk.module, x, d)
                if g is not None:
                    g = lk.rule.vjp(lk.module, x, g[None])[0]
        return
    sign: Tensor | None = None
    if mode in ("ggn", "hessian"):
        cols, sign = losses.hessian_factor(problem, out, y)
    elif mode == "ef":
        cols = g[None]
        g = None
    else:
        cols = losses.mc_factor(problem, out, y, samples, generator)
    diag: Tensor | None = None
    for i in range(len(chain) - 1, first - 1, -1):
        lk, x = chain[i], xs[i]
        if lk.params:
            _add(acc, wanted, lk, lk.rule.sq_grads(lk.module, x, cols, sign))
            if diag is not None:
                _add(acc, wanted, lk, lk.rule.diag_params(lk.module, x, diag))
        if i == first:
            break
        if isinstance(lk.rule, ElementwiseRule):
            y = xs[i + 1]
            cols = lk.rule.scale(lk.module, x, y, cols)
            if diag is not None:
                diag = lk.rule.scale2(lk.module, x, y, diag)
            if g is not None:
                _, f2 = lk.rule.derivatives(lk.module, x, y, True)
                r = f2 * g
                diag = r if diag is None else diag + r
                g = lk.rule.scale(lk.module, x, y, g)
            continue
        new_cols = lk.rule.vjp(lk.module, x, cols)
        if diag is not None:
            if isinstance(lk.rule, (ReshapeRule, MaxPoolRule)):  # Jᵀ diag(d) J stays diagonal
                diag = lk.rule.sq_vjp(lk.module, x, diag)
            else:
                extra, extra_sign = lk.rule.diag_columns(lk.module, x, diag)
                base = sign if sign is not None else torch.ones(cols.shape[:2]).to(cols)
                sign = torch.cat([base, extra_sign.to(cols)])
                new_cols = torch.cat([new_cols, extra])
                diag = None
        if g is not None:
            g = lk.rule.vjp(lk.module, x, g[None])[0]
        cols = new_cols
