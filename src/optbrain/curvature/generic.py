"""Estimators for arbitrary differentiable modules, built on ``torch.func``.

They need no per-layer rule, so they handle tied weights (one parameter used in several places),
custom modules and any architecture that treats samples independently in eval mode, at the price
of materialising per-sample gradients (chunked to bound memory) or Hessian-vector products.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import functional_call, grad, vjp, vmap

from ..errors import NonFiniteLossError
from ..paramdict import ParamDict, numel, raw_names
from ..problem import Problem, eval_mode
from .backprop import _chunks
from .budget import BUDGET as _BUDGET

log = logging.getLogger(__name__)

Tick = Callable[[int, int], None] | None
ColumnFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None]]


class _Functional:
    """The model as a pure function of the wanted parameters (others held fixed)."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self.model = problem.model
        self.wanted = {k: p.detach() for k, p in problem.parameters().items()}
        raw = raw_names(self.model)
        self.raw = {k: raw[k] for k in self.wanted}
        taken = set(self.raw.values())
        self.fixed = {r: p.detach() for r, p in self.model.named_parameters() if r not in taken}
        self.fixed.update({r: b for r, b in self.model.named_buffers()})
        self.loop = False  # set when vmap over samples is not supported by some layer

    def __call__(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        full = dict(self.fixed)
        full.update({self.raw[k]: v for k, v in params.items()})
        return functional_call(self.model, full, (x,))

    def objective(self, params: dict[str, Tensor]) -> Tensor:
        """E at ``params`` over this rank's data, as one autograd graph (memory grows with the
        data: for small problems)."""
        total = 0.0
        for x, y in self.problem.batches():
            total = total + self.problem.batch_objective(self(params, x), y)
        return total


def per_sample_squares(problem: Problem, columns: ColumnFn, tick: Tick = None) -> ParamDict:
    """(1/N) Σ_n Σ_k σ_kn (∂⟨S_kn, f(x_n)⟩/∂θ)² with (S, σ) = ``columns(out, y)``: one pass over
    the data, summed over the ranks of a distributed problem."""
    fn = _Functional(problem.prepare())
    acc = {k: torch.zeros_like(v) for k, v in fn.wanted.items()}
    done = 0
    with problem.together("per-sample squared gradients"), eval_mode(problem.model):
        for x, y in _chunks(problem, None):
            with torch.no_grad():
                out = fn(fn.wanted, x)
            if not torch.isfinite(out).all():
                raise NonFiniteLossError("the model output contains NaN or inf")
            cols, sign = columns(out, y)
            step = max(1, _BUDGET // max(1, cols.shape[0] * numel(fn.wanted)))
            for i in range(0, x.shape[0], step):
                xc, sc = x[i : i + step], cols[:, i : i + step].transpose(0, 1)

                grads = _per_sample_pullbacks(fn, xc, sc)  # N × K × shape
                for k, gk in grads.items():
                    sq = gk.square()
                    if sign is not None:
                        sg = sign[:, i : i + step].T
                        sq = sq * sg.reshape(sg.shape + (1,) * (sq.dim() - 2))
                    acc[k] += sq.sum((0, 1))
            done += x.shape[0]
            if tick is not None:
                tick(done, problem.progress_total())
    problem.progress_done(tick, done)
    problem.all_reduce_(acc)
    n_total = problem.counted(done)
    return {k: v / n_total for k, v in acc.items()}


def _per_sample_pullbacks(fn: _Functional, x: Tensor, cols: Tensor) -> dict[str, Tensor]:
    """For each sample n and column k: ∂⟨cols[n, k], f(x_n)⟩/∂θ, as dict of N × K × shape.

    Vectorised with ``vmap``; layers without a batching rule (``nn.RNN``/``LSTM``/``GRU``) fall
    back to a loop over samples."""

    def one(xn: Tensor, sn: Tensor) -> dict[str, Tensor]:
        _, pull = vjp(lambda p: fn(p, xn[None])[0], fn.wanted)
        return vmap(pull)(sn)[0]

    if not fn.loop:
        try:
            return vmap(one)(x, cols)
        except (RuntimeError, NotImplementedError) as exc:
            log.info("vmap over samples failed (%s); looping over samples instead", exc)
            fn.loop = True
    rows = []
    for xn, sn in zip(x, cols):
        _, pull = vjp(lambda p, xn=xn: fn(p, xn[None])[0], fn.wanted)
        per_col = [pull(c)[0] for c in sn]
        rows.append({k: torch.stack([g[k] for g in per_col]) for k in fn.wanted})
    return {k: torch.stack([r[k] for r in rows]) for k in fn.wanted}


def _batch_hvp(fn: _Functional, x: Tensor, y: Tensor) -> Callable[[dict], dict]:
    """v ↦ ∇²(Σ_batch ℓ_n)·v by reverse-over-reverse: one gradient graph of this batch, its
    pull-back vmapped over v (memory of one batch, whatever N)."""

    def batch_sum(params: dict[str, Tensor]) -> Tensor:
        return fn.problem.batch_sum(fn(params, x), y)

    _, pull = vjp(grad(batch_sum), fn.wanted)
    return lambda v: pull(v)[0]


def _hvp_pass(problem: Problem, fn: _Functional, probes: Callable, what: str, tick: Tick) -> int:
    """One pass over the data: for every batch, ``probes(hvp)`` with the batch's HVP (it
    accumulates Σ over batches). Returns the samples read."""
    done = 0
    problem.prepare()
    with problem.together(what), eval_mode(problem.model):
        for x, y in problem.batches():
            probes(_batch_hvp(fn, x, y))  # the forward pass runs here, in eval mode
            done += x.shape[0]
            if tick is not None:
                tick(done, problem.progress_total())
    problem.progress_done(tick, done)
    return done


def hvp_diagonal(problem: Problem, tick: Tick = None, chunk: int = 64) -> ParamDict:
    """Exact diag ∇²E from one Hessian-vector product per parameter (small models only): one
    pass over the data, each batch's HVPs with every basis vector, summed over the batches (and
    the ranks of a distributed problem)."""
    fn = _Functional(problem)
    names = list(fn.wanted)
    total = sum(fn.wanted[k].numel() for k in names)
    if total > 20_000:
        log.warning("exact Hessian diagonal by HVPs needs %d Hessian-vector products", total)
    like = next(iter(fn.wanted.values()))
    diag = torch.zeros(total, dtype=like.dtype, device=like.device)

    def probes(hvp) -> None:
        for start in range(0, total, chunk):
            idx = torch.arange(start, min(start + chunk, total), device=diag.device)
            basis = torch.zeros(len(idx), total, dtype=diag.dtype, device=diag.device)
            basis[torch.arange(len(idx), device=diag.device), idx] = 1
            hv = vmap(hvp)(_split(basis, names, fn.wanted))
            flat = torch.cat([hv[k].reshape(len(idx), -1) for k in names], 1)
            diag[idx] += flat[torch.arange(len(idx), device=diag.device), idx]

    done = _hvp_pass(problem, fn, probes, "exact Hessian diagonal", tick)
    problem.all_reduce_(diag)
    return _unsplit(diag / problem.counted(done), names, fn.wanted)


def hutchinson(
    problem: Problem, samples: int, gen: torch.Generator, tick: Tick = None, chunk: int = 16
) -> ParamDict:
    """(1/S) Σ_s v_s ⊙ H v_s with Rademacher probes v_s: an unbiased estimate of diag ∇²E.

    One pass over the data: each batch's HVPs with all S probes, which are drawn again for
    every batch from the same generator state (so every batch sees the same probes, and every
    rank of a distributed problem rank 0's)."""
    fn = _Functional(problem)
    names = list(fn.wanted)
    total = sum(fn.wanted[k].numel() for k in names)
    like = next(iter(fn.wanted.values()))
    dtype = like.dtype
    acc = torch.zeros(total, dtype=dtype, device=like.device)
    start_state = problem.shards.same_generator(gen).get_state()

    def probes(hvp) -> None:
        gen.set_state(start_state)
        for start in range(0, samples, chunk):
            m = min(chunk, samples - start)
            v = (torch.randint(0, 2, (m, total), generator=gen) * 2 - 1).to(acc)
            hv = vmap(hvp)(_split(v, names, fn.wanted))
            flat = torch.cat([hv[k].reshape(m, -1) for k in names], 1)
            acc.add_((v * flat).sum(0))

    done = _hvp_pass(problem, fn, probes, "Hutchinson's probes", tick)
    problem.all_reduce_(acc)
    return _unsplit(acc / (samples * problem.counted(done)), names, fn.wanted)


def _split(rows: Tensor, names: list[str], like: dict[str, Tensor]) -> dict[str, Tensor]:
    out, i = {}, 0
    for k in names:
        n = like[k].numel()
        out[k] = rows[:, i : i + n].reshape(rows.shape[0], *like[k].shape).to(like[k])
        i += n
    return out


def _unsplit(vec: Tensor, names: list[str], like: dict[str, Tensor]) -> ParamDict:
    out, i = {}, 0
    for k in names:
        n = like[k].numel()
        out[k] = vec[i : i + n].reshape(like[k].shape).to(like[k])
        i += n
    return out
