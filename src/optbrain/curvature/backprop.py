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
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import NonFiniteLossError
from ..paramdict import ParamDict
from ..problem import Problem, eval_mode
from . import losses
from ._checks import all_finite
from .budget import BUDGET, samples_per_sweep, split
from .chain import Link, build_chain
from .rules import (
    AvgPoolRule,
    ConvRule,
    ElementwiseRule,
    LinearRule,
    MaxPoolRule,
    ReshapeRule,
    hooked,
)

MODES = ("lecun", "lecun_gn", "ggn", "hessian", "ef", "mc")
_BUDGET = BUDGET  # kept for the column chunking of the chain engine


def _chunks(problem: Problem, size: int | None) -> Iterator[tuple[Tensor, Tensor]]:
    for x, y in problem.batches():
        yield from split(x, y, size)


def _chunk_size(chain: list[Link], xs: list[Tensor], k0: int, mode: str, batch: int) -> int:
    """Samples per sweep (:func:`.budget.samples_per_sweep`): the columns within about a gradient
    pass's memory over the batch, never above the element budget."""
    k = k0
    if mode == "hessian":
        k += sum(
            x[0].numel() for lk, x in zip(chain, xs[1:]) if isinstance(lk.rule, ElementwiseRule)
        )
    width = max(x[0].numel() for x in xs)
    width = max([width] + [lk.rule.column_cost(lk.module, x) for lk, x in zip(chain, xs)])
    scratch = max(lk.rule.scratch_cost(lk.module, x) for lk, x in zip(chain, xs))
    return samples_per_sweep(k, width, sum(x[0].numel() for x in xs), batch, scratch)


def _forward(chain: list[Link], x: Tensor) -> tuple[list[Tensor], set[int]]:
    """Every layer input and the output, ``xs[i]`` entering ``chain[i]``, and the storages the
    sweep owns: outputs of stock layers (``Rule.fresh_output``) and views of them, which no
    hook has seen.

    An activation whose rules never read its input (tanh, sigmoid) does not keep it: it is fused
    with the Linear/Conv layer before it into one oneDNN kernel where the build, dtype and
    layer allow (``Rule.forward_fused``; no autograd graph is needed here, so the
    inference-only kernels apply), else it runs in place on that layer's fresh output. Either
    way the pre-activation entry of ``xs`` is the activation's output itself. Modules watched by
    forward hooks are always called as they are."""
    xs = [x]
    owned: set[int] = set()
    i = 0
    while i < len(chain):
        lk = chain[i]
        nxt = chain[i + 1] if i + 1 < len(chain) else None
        name = nxt.rule.fusion_name(nxt.module) if nxt is not None else None
        if name is not None and not lk.rule.reads_output:
            y = lk.rule.forward_fused(lk.module, xs[-1], name)  # None if hooked
            if y is not None:
                xs += [y, y]
                owned.add(_storage(y))
                i += 2
                continue
        act = lk.rule.inplace_forward(lk.module) if i > 0 else None  # None if hooked
        prev = chain[i - 1]
        if (
            act is not None
            and prev.rule.fresh_output(prev.module)  # its own output: no one else reads it
            and not prev.rule.reads_output
            and _storage(xs[-1]) in owned
        ):
            xs.append(act(xs[-1]))
            i += 1
            continue
        xs.append(lk.rule.forward(lk.module, xs[-1]))
        if hooked(lk.module):  # a hook saw (and may keep) both tensors
            owned.discard(_storage(xs[-2]))
            owned.discard(_storage(xs[-1]))
        elif lk.rule.fresh_output(lk.module):
            owned.add(_storage(xs[-1]))
        i += 1
    owned.discard(None)
    return xs, owned


def _storage(t: Tensor) -> int | None:
    """Address of a tensor's memory; None where it has none to ask for (sparse, wrapped)."""
    if t.layout != torch.strided:
        return None
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def _writable_inputs(
    chain: list[Link], xs: list[Tensor], owned: set[int], square_tolerant: bool
) -> list[bool]:
    """Per link: whether the sweep may overwrite its input with its square once the link has
    used it. The input must lie in memory the sweep ``owns`` (see :func:`_forward`: never the
    caller's data, a parameter, a buffer or a tensor a hook saw) and span its whole storage (a
    partial view would be squared in part). The sweep runs backwards, so it must not share
    memory with a value that a link before it reads (its input or output, per the rules' flags;
    with ``square_tolerant``, an output read by a ``square_output_ok`` rule does not count: that
    rule is then handed the square)."""
    read: set[int] = set()  # storages whose values the links before i read
    out = []
    for i, lk in enumerate(chain):
        x = xs[i]
        mem = _storage(x)
        whole = mem is not None and x.is_contiguous()
        whole = whole and x.untyped_storage().nbytes() == x.numel() * x.element_size()
        out.append(whole and mem in owned and mem not in read)
        if lk.rule.reads_input:
            read.add(mem)
        if lk.rule.reads_output and not (square_tolerant and lk.rule.square_output_ok):
            read.add(_storage(xs[i + 1]))
    return out


def _squared_input(lk: Link, x: Tensor, inplace: bool) -> Tensor:
    """A link's input as its rule's LeCun methods take it: x² for ``squares_input`` rules
    (squared in place with ``inplace``: the caller's last use of x), else x."""
    if not lk.rule.squares_input:
        return x
    return x.square_() if inplace else x.square()


def run(
    problem: Problem,
    mode: str,
    *,
    estimator: str,
    samples: int = 1,
    generator: torch.Generator | None = None,
    tick: Callable[[int, int], None] | None = None,
    chain: list[Link] | None = None,
    wanted: dict[str, Tensor] | None = None,
) -> ParamDict:
    """Accumulate the parameter diagonal of ``mode`` over the problem's data (see module doc);
    ``chain`` may pass the model's chain when the caller has already built it, ``wanted`` the
    problem's ``parameters()``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    model = problem.model
    chain = chain if chain is not None else build_chain(model, estimator)
    wanted = problem.parameters() if wanted is None else wanted
    first = next(
        (i for i, lk in enumerate(chain) if any(n in wanted for n, _, _ in lk.params.values())),
        None,
    )
    if first is None:
        return {n: torch.zeros_like(p) for n, p in wanted.items()}
    problem.prepare()
    acc: ParamDict = {}  # filled by the first contribution to each entry (see _add)
    done = 0
    with problem.together(f"{estimator}: the curvature sweep"), torch.no_grad(), eval_mode(model):
        chunk = None  # LeCun carries one diagonal: batches as given
        if not mode.startswith("lecun"):
            first_x = next(problem.batches())[0]
            probe = [first_x[:1]]
            for lk in chain:
                probe.append(lk.rule.forward(lk.module, probe[-1]))
            k0 = {"ef": 1, "mc": samples}.get(mode, probe[-1][0].numel())
            chunk = _chunk_size(chain, probe, k0, mode, first_x.shape[0])
        for x, y in _chunks(problem, chunk):
            xs, owned = _forward(chain, x)
            if not all_finite([xs[-1]]):
                raise NonFiniteLossError(f"{estimator}: the model output contains NaN or inf")
            writable = _writable_inputs(chain, xs, owned, square_tolerant=mode == "lecun_gn")
            _sweep(problem, chain, xs, y, mode, first, acc, wanted, samples, generator, writable)
            del xs
            done += x.shape[0]
            if tick is not None:
                tick(done, problem.progress_total())
    problem.progress_done(tick, done)
    out = {n: acc[n] if n in acc else torch.zeros_like(p) for n, p in wanted.items()}
    problem.all_reduce_(out)  # sums over the samples of every rank
    n_total = problem.counted(done)
    for v in out.values():  # finiteness is checked once, by DiagonalEstimator._finish
        v /= n_total
    return out


def _add(acc: ParamDict, wanted, link: Link, contrib: dict[str, Tensor]) -> None:
    """Add a rule's contributions; the first one for an entry is stored as is (rules return
    fresh tensors, which the accumulator then owns)."""
    for attr, value in contrib.items():
        if attr not in link.params:
            continue
        name, _, mult = link.params[attr]
        if name not in wanted:
            continue
        if mult is not None:
            value = value * mult
        if name in acc:
            acc[name] += value
        else:
            acc[name] = value if value.dtype == wanted[name].dtype else value.to(wanted[name])


#: rules whose ``vjp`` returns a fresh tensor (which the sweep may then scale in place)
_FRESH_VJP = (LinearRule, ConvRule, AvgPoolRule, MaxPoolRule)


def _square_sum_suffices(chain: list[Link], xs: list[Tensor], i: int, first: int) -> bool:
    """Whether the columns leaving Linear link ``i`` are needed only as Σ_k σ cols² by the first
    Linear layer (directly, or after one element-wise activation whose f' stays pending)."""
    if not (type(chain[i].rule) is LinearRule and xs[i].dim() == 2):
        return False
    if not (type(chain[first].rule) is LinearRule and xs[first].dim() == 2):
        return False
    return i - 1 == first or (i - 2 == first and isinstance(chain[i - 1].rule, ElementwiseRule))


def _sweep(problem, chain, xs, y, mode, first, acc, wanted, samples, generator, writable) -> None:
    """The backward sweep over one chunk (see the module doc). ``xs`` is consumed: each entry is
    released once the sweep has passed it, and inputs marked in ``writable`` may be
    overwritten."""
    out = xs[-1]
    need_grad = mode in ("lecun", "hessian")
    g = losses.output_grads(problem, out, y) if (need_grad or mode == "ef") else None
    if mode in ("lecun", "lecun_gn"):
        # the recursion is linear in (d, g): the objective's 1/N is applied once, at the end
        st = _LeCunState(losses.hessian_diagonal(problem, out, y), g)
        _lecun_sweep(st, chain, xs, first, acc, wanted, writable)
        return
    sign: Tensor | None = None
    if mode in ("ggn", "hessian"):
        cols, sign = losses.hessian_factor(problem, out, y)
    elif mode == "ef":
        cols, g = g[None], None
    else:
        cols = losses.mc_factor(problem, out, y, samples, generator)
    _column_sweep(_ColumnState(cols, sign, g), chain, xs, first, acc, wanted)


@dataclass
class _LeCunState:
    """What LeCun's recursion carries backwards: the diagonal ``d`` (N × value), the gradient
    ``g`` where the f'' terms are wanted, whether ``d`` is this sweep's own tensor (free to be
    scaled in place) and the storages of layer inputs already squared in place."""

    d: Tensor
    g: Tensor | None
    owned: bool = True
    squared: set = field(default_factory=set)


def _lecun_sweep(st: _LeCunState, chain, xs, first, acc, wanted, writable) -> None:
    for i in range(len(chain) - 1, first - 1, -1):
        lk, x, y = chain[i], xs[i], xs[i + 1]
        xs[i + 1] = None  # released once this step is done: nothing before reads it
        if i == first:
            x2 = _squared_input(lk, x, writable[i])
            _add(acc, wanted, lk, lk.rule.diag_params(lk.module, x2, st.d))
            return
        if lk.params:
            _lecun_layer(st, lk, x, writable[i], acc, wanted)
        elif isinstance(lk.rule, ElementwiseRule):
            _lecun_elementwise(st, lk, x, y)
        else:
            st.d = lk.rule.sq_vjp(lk.module, x, st.d)
            if not isinstance(lk.rule, ReshapeRule):  # a reshape is a view of d
                st.owned = type(lk.rule) in _FRESH_VJP
            if st.g is not None:
                st.g = lk.rule.vjp(lk.module, x, st.g[None])[0]


def _lecun_layer(st: _LeCunState, lk: Link, x: Tensor, writable: bool, acc, wanted) -> None:
    """A layer with parameters: its diagonal from d, and d passed to its input (connection rule)."""
    if st.g is not None:  # before x may be squared in place
        st.g = lk.rule.vjp(lk.module, x, st.g[None])[0]
    x2 = _squared_input(lk, x, writable)
    if x2 is x:
        st.squared.add(_storage(x))
    contrib, st.d = lk.rule.lecun_step(lk.module, x2, st.d)
    _add(acc, wanted, lk, contrib)
    st.owned = type(lk.rule) in _FRESH_VJP


def _lecun_elementwise(st: _LeCunState, lk: Link, x: Tensor, y: Tensor) -> None:
    """d ← f'²·d (+ f''·g): from f(a)² where the next layer squared its input in place."""
    if st.g is None and st.squared and _storage(y) in st.squared:  # y holds f(a)² now
        st.d = lk.rule.scale2_from_square(lk.module, y, st.d, inplace=st.owned)
    elif st.g is None:
        st.d = (lk.rule.scale2_ if st.owned else lk.rule.scale2)(lk.module, x, y, st.d)
    else:
        f1, f2 = lk.rule.derivatives(lk.module, x, y, True)
        st.d = f1.square() * st.d + f2 * st.g
        st.g = f1 * st.g
    st.owned = True


@dataclass
class _ColumnState:
    """What the column sweep carries backwards: signed columns (K × N × value), the gradient ``g``
    (``hessian`` mode), the diagonal part from f'' terms, whether ``cols`` is this sweep's own
    tensor, a pending f' of the activation just before the first layer, and Σ_k σ cols² in
    place of the columns once only the first layer is left."""

    cols: Tensor
    sign: Tensor | None
    g: Tensor | None
    diag: Tensor | None = None
    owned: bool = False
    factor: Tensor | None = None
    sqsum: Tensor | None = None


def _column_sweep(st: _ColumnState, chain, xs, first, acc, wanted) -> None:
    for i in range(len(chain) - 1, first - 1, -1):
        lk, x, y = chain[i], xs[i], xs[i + 1]
        xs[i + 1] = None  # released once this step is done: nothing before reads it
        if lk.params:
            _column_params(st, lk, x, acc, wanted)
        if i == first:
            return
        if isinstance(lk.rule, ElementwiseRule):
            _column_elementwise(st, lk, x, y, last=i - 1 == first and _linear(chain[first]))
        elif st.diag is None and _square_sum_suffices(chain, xs, i, first):
            st.sqsum = lk.rule.vjp_square_sum(lk.module, st.cols, st.sign)
            if st.g is not None:
                st.g = lk.rule.vjp(lk.module, x, st.g[None])[0]
        else:
            _column_layer(st, lk, x)


def _linear(lk: Link) -> bool:
    return type(lk.rule) is LinearRule


def _column_params(st: _ColumnState, lk: Link, x: Tensor, acc, wanted) -> None:
    """A layer's parameter diagonal: per-sample squared gradients of the columns, plus LeCun's
    connection rule for the diagonal part."""
    if st.sqsum is not None:
        sq = lk.rule.grads_from_square_sum(x.square(), st.sqsum, st.factor)
    elif st.factor is not None:
        sq = lk.rule.sq_grads(lk.module, x, st.cols, st.sign, factor=st.factor)
    else:
        sq = lk.rule.sq_grads(lk.module, x, st.cols, st.sign)
    _add(acc, wanted, lk, sq)
    if st.diag is not None:
        x2 = _squared_input(lk, x, inplace=False)
        _add(acc, wanted, lk, lk.rule.diag_params(lk.module, x2, st.diag))


def _column_elementwise(st: _ColumnState, lk: Link, x: Tensor, y: Tensor, last: bool) -> None:
    """cols ← f'⊙cols (left pending as ``factor`` before a first Linear layer: only
    Σ_k σ (f'⊙c)² = f'² Σ_k σ c² is needed there, N × out instead of K × N × out)."""
    if last:
        st.factor = lk.rule.derivatives(lk.module, x, y, second=False)[0]
    elif st.owned:
        st.cols = lk.rule.scale_(lk.module, x, y, st.cols)
    else:
        st.cols, st.owned = lk.rule.scale(lk.module, x, y, st.cols), True
    if st.diag is not None:
        st.diag = lk.rule.scale2(lk.module, x, y, st.diag)
    if st.g is not None:
        _, f2 = lk.rule.derivatives(lk.module, x, y, True)
        r = f2 * st.g
        st.diag = r if st.diag is None else st.diag + r
        st.g = lk.rule.scale(lk.module, x, y, st.g)


def _column_layer(st: _ColumnState, lk: Link, x: Tensor) -> None:
    """Columns through a layer that mixes entries; a pending diagonal becomes new columns there
    (it stays diagonal through a reshape or max-pooling)."""
    new_cols = lk.rule.vjp(lk.module, x, st.cols)
    if not isinstance(lk.rule, ReshapeRule):  # a reshape is a view: ownership unchanged
        st.owned = type(lk.rule) in _FRESH_VJP
    if st.diag is not None:
        if isinstance(lk.rule, (ReshapeRule, MaxPoolRule)):  # Jᵀ diag(d) J stays diagonal
            st.diag = lk.rule.sq_vjp(lk.module, x, st.diag)
        else:
            extra, extra_sign = lk.rule.diag_columns(lk.module, x, st.diag)
            cols = st.cols
            base = st.sign if st.sign is not None else torch.ones(cols.shape[:2]).to(cols)
            st.sign = torch.cat([base, extra_sign.to(cols)])
            new_cols = torch.cat([new_cols, extra])
            st.owned, st.diag = True, None
    if st.g is not None:
        st.g = lk.rule.vjp(lk.module, x, st.g[None])[0]
    st.cols = new_cols
