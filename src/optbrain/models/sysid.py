"""One-hidden-layer input–output models of a dynamic process: NARX and output-error (OE).

Both compute (PAPERS.md §14.1, Ławryńczuk's usual form)

    y(k) = f(u(k−τ), …, u(k−n_B), y(k−1), …, y(k−n_A)),
    f(r) = v·tanh(W r + b) + c        (K tanh hidden units, one linear output)

and differ only in which past outputs they read:

* :class:`NARX` (series-parallel, one-step-ahead): the *measured* y(k−i);
* :class:`OutputError` (parallel, simulation): the model's *own* outputs ŷ(k−i), fed back, so
  ŷ(k) depends on the weights directly and through every earlier ŷ; back-propagation through the
  loop gives ∂ŷ(k)/∂w = ∂f/∂w + Σ_i ∂f/∂ŷ(k−i) · ∂ŷ(k−i)/∂w (BPTT).

The weights are ``hidden`` (``nn.Linear(n_B − τ + 1 + n_A, K)``; its input columns are
u(k−τ)…u(k−n_B), then y(k−1)…y(k−n_A)) and ``output`` (``nn.Linear(K, 1)``):
(n_A + n_B − τ + 2)·K hidden weights and biases plus K + 1 output weights, (n_A + n_B − τ + 3)·K + 1
in all. (PAPERS.md §14.1 quotes (n_A + n_B − τ + 2)·K + 1, which leaves out K of these.)

**Data layout.** A model reads ``x`` of shape B × T × 2: channel 0 the input u(k), channel 1 the
measured output y(k), k = 0..T−1, in the process's units; it returns ŷ(k) for k = ``start``..T−1
(B × (T − start) × 1, process units), ``start = max(n_A, n_B)``. The OE model reads the measured
output only for its initial conditions y(start−n_A)…y(start−1).

**Scaling.** Inputs and outputs are mapped to z = (v − offset)/scale before the network and back
after it; the offsets and scales are buffers (not trained, not pruned), set by :meth:`fit_scaling`
(mean and standard deviation of training data) or given to the constructor. ``seed`` seeds
PyTorch's default initialisation without touching the global RNG.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._seeding import seeded
from ._sequence_io import ScaledSequenceModel, check_sequence_input, order_arg

__all__ = ["NARX", "InputOutputModel", "OutputError"]


class InputOutputModel(ScaledSequenceModel):
    """The network f shared by :class:`NARX` and :class:`OutputError`; ``forward`` is the
    subclass's mode, :meth:`one_step` and :meth:`simulate` are both always available (a NARX
    model is evaluated in simulation mode by ``model.simulate(x)``)."""

    def __init__(
        self,
        n_a: int,
        n_b: int,
        hidden: int,
        delay: int = 1,
        *,
        u_scaling: tuple[float, float] = (0.0, 1.0),
        y_scaling: tuple[float, float] = (0.0, 1.0),
        seed: int | None = None,
    ):
        super().__init__(u_scaling, y_scaling)
        self.n_a = order_arg("n_a", n_a, 1)
        self.n_b = order_arg("n_b", n_b, 1)
        self.delay = order_arg("delay", delay, 0)
        if self.delay > self.n_b:
            raise ValueError(f"delay (τ = {delay}) must not exceed n_b ({n_b})")
        self.n_hidden = order_arg("hidden", hidden, 1)
        self.n_u = self.n_b - self.delay + 1
        self.start = max(self.n_a, self.n_b)
        with seeded(seed):  # PyTorch's default initialisation; the global RNG is untouched
            self.hidden = nn.Linear(self.n_u + self.n_a, hidden)
            self.output = nn.Linear(hidden, 1)

    def extra_repr(self) -> str:
        return f"n_a={self.n_a}, n_b={self.n_b}, delay={self.delay}, hidden={self.n_hidden}"

    def _input_lags(self, u: Tensor) -> Tensor:
        """B × T' × n_u regressors u(k−τ)…u(k−n_B) for k = start..T−1."""
        k0, t = self.start, u.shape[1]
        return torch.stack([u[:, k0 - j : t - j] for j in range(self.delay, self.n_b + 1)], -1)

    def one_step(self, x: Tensor) -> Tensor:
        """Series-parallel (NARX) prediction from the measured past outputs."""
        check_sequence_input(x, self.start)
        u, y = self._scaled(x)
        k0, t = self.start, x.shape[1]
        y_lags = torch.stack([y[:, k0 - i : t - i] for i in range(1, self.n_a + 1)], -1)
        r = torch.cat([self._input_lags(u), y_lags], -1)
        return self._unscaled(self.output(torch.tanh(self.hidden(r))).squeeze(-1))

    def simulate(self, x: Tensor) -> Tensor:
        """Parallel (output-error) simulation: past model outputs fed back."""
        check_sequence_input(x, self.start)
        u, y = self._scaled(x)
        k0 = self.start
        w, b = self.hidden.weight, self.hidden.bias
        pre = F.linear(self._input_lags(u), w[:, : self.n_u], b)  # B × T' × K
        wy_t = w[:, self.n_u :].t()  # n_A × K
        v, c = self.output.weight, self.output.bias
        past = y[:, k0 - self.n_a : k0].flip(-1)  # ŷ(k−1)…ŷ(k−n_A), B × n_A
        outs = []
        for k in range(pre.shape[1]):
            yk = F.linear(torch.tanh(torch.addmm(pre[:, k], past, wy_t)), v, c)  # B × 1
            outs.append(yk)
            past = torch.cat([yk, past[:, :-1]], 1) if self.n_a > 1 else yk
        return self._unscaled(torch.cat(outs, 1))


class NARX(InputOutputModel):
    """Series-parallel model: ``forward`` is :meth:`one_step` (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        return self.one_step(x)


class OutputError(InputOutputModel):
    """Parallel (recurrent) model: ``forward`` is :meth:`simulate` (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        return self.simulate(x)
