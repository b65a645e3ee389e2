"""The rule interface and the one registry of layer kinds (:func:`register`, :func:`rule_for`).

A :class:`Rule` tells the structured second-order back-propagation (:mod:`..backprop`) how to move
curvature from a module's output to its input and how to turn curvature at its output into the
diagonal for its parameters. Shapes: ``x`` is the module input (N × …), columns ``cols`` carry a
leading column axis (K × N × …), diagonals ``d`` have the shape of the output (N × …).

Users teach optbrain a new layer with :func:`register`; the layers optbrain knows are registered
by :mod:`.layers` and :mod:`.activations`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.nn.modules import module as _mod

from ...errors import UnsupportedModuleError

GENERIC_ESTIMATORS = (
    "GGNDiagonal(method='func')",
    "ExactHessianDiagonal(method='hvp')",
    "EmpiricalFisherDiagonal(method='func')",
    "MCFisherDiagonal(method='func')",
    "HutchinsonDiagonal",
)


def hooked(m: nn.Module) -> bool:
    """Whether a forward (pre-)hook, the module's own or a global one, sees ``m``'s tensors (a
    hook may keep them, so the sweep must neither overwrite them nor skip the call)."""
    return bool(
        m._forward_hooks
        or m._forward_pre_hooks
        or _mod._global_forward_hooks
        or _mod._global_forward_pre_hooks
    )


def stock_forward(m: nn.Module, *classes: type[nn.Module]) -> bool:
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
    #: the layer acts on the last dimension only (Linear, LayerNorm, Embedding, element-wise):
    #: the graph engine may hand it inputs with extra leading dimensions (positions, a batch
    #: dimension that is not the first, samples merged with positions)
    last_dim: bool = False
    #: non-linear in its input but not element-wise (LayerNorm): the chain engine's sweeps for
    #: the full LeCun recursion and the exact Hessian have no term for its second derivatives,
    #: so such a chain takes the graph engine (``lecun``) or the generic one (``hessian``)
    mixes_curvature: bool = False

    def refusal(self, m: nn.Module, mode: str) -> str | None:
        """Why this rule cannot handle the module in the sweep ``mode`` (a configuration it has
        no derivatives for), or None. Read when the engine is chosen, so that such a model falls
        back (or LeCun refuses) before any work, with this reason."""
        return None

    def check(self, m: nn.Module, mode: str = "ggn") -> None:
        """Raise :class:`UnsupportedModuleError` with :meth:`refusal`'s reason, if any."""
        reason = self.refusal(m, mode)
        if reason is not None:
            raise UnsupportedModuleError(reason)

    def param_names(self, m: nn.Module) -> tuple[str, ...]:
        """Attribute paths (``"weight"``, ``"out_proj.weight"``) of the parameters the rule
        differentiates on this module (attributes that are None are skipped by the reader)."""
        return self.params

    # ------------------------------------------------------------------ graph engine
    def graph_forward(self, m: nn.Module, args: tuple, kwargs: dict):
        """The module's output for a call ``m(*args, **kwargs)`` in the graph engine."""
        if len(args) == 1 and not kwargs:
            return self.forward(m, args[0])
        return m(*args, **kwargs)

    def lecun(
        self, m: nn.Module, x: Tensor, y: Tensor, d: Tensor, g: Tensor | None, need_input: bool
    ) -> tuple[dict[str, Tensor], Tensor | None, Tensor | None]:
        """One step of LeCun's recursion for a single-input layer: the parameter diagonals
        (LeCun's connection rule), the diagonal at the input (J∘J)ᵀ·d (None unless
        ``need_input``) and, in the full variant (``g``: the gradient at the output), the
        gradient at the input. Rules of non-linear layers add their second-order residual."""
        x2 = x.square() if self.squares_input else x
        contrib = self.diag_params(m, x2, d) if self.params else {}
        d_in = self.sq_vjp(m, x, d) if need_input else None
        g_in = self.vjp(m, x, g[None])[0] if (g is not None and need_input) else None
        return contrib, d_in, g_in

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

    def scratch_cost(self, m: nn.Module, x: Tensor) -> int:
        """Elements per sample, whatever the number of columns, that :meth:`sq_grads` holds
        besides them (unfolded patches of a convolution; memory planning). ``x``: one sample."""
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


_REGISTRY: dict[type, Rule] = {}


def register(cls: type, rule: Rule) -> None:
    """Teach the structured estimators a layer kind (subclasses inherit the rule)."""
    _REGISTRY[cls] = rule


def registered_rule(m: nn.Module) -> Rule | None:
    """The rule of a module's class (or nearest registered base class), or None."""
    for cls in type(m).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


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
