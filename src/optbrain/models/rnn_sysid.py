"""GRU and LSTM sequence models of a dynamic process (simulation mode, no output feedback).

The cell reads the scaled input z(k) = (u(k−τ) − offset)/scale for k = τ..T−1, starting from a zero
state, and a linear read-out of its hidden state gives ŷ(k) (Zarzycki & Ławryńczuk 2021 compare
such models on the same reactor, PAPERS.md §14.1). The state starts at zero while the process does
not, so the first ``warmup`` predictions are dropped: the model returns ŷ(k) for
k = ``start`` = max(τ, warmup)..T−1, in the layout of :mod:`optbrain.models.sysid` (input
B × T × 2, channel 0 = u, channel 1 = measured y, which these models do not read; output
B × (T − start) × 1 in process units).
"""

from __future__ import annotations

from torch import Tensor, nn

from ._seeding import seeded
from ._sequence_io import ScaledSequenceModel, check_sequence_input, order_arg

__all__ = ["RecurrentSequenceModel", "gru_model", "lstm_model"]

_CELLS = {"gru": nn.GRU, "lstm": nn.LSTM}


class RecurrentSequenceModel(ScaledSequenceModel):
    """``cell`` ("gru" or "lstm"), ``hidden`` units in ``layers`` layers, a Linear read-out."""

    def __init__(
        self,
        cell: str,
        hidden: int,
        *,
        layers: int = 1,
        delay: int = 1,
        warmup: int = 20,
        u_scaling: tuple[float, float] = (0.0, 1.0),
        y_scaling: tuple[float, float] = (0.0, 1.0),
        seed: int | None = None,
    ):
        super().__init__(u_scaling, y_scaling)
        if cell not in _CELLS:
            raise ValueError(f"cell must be one of {', '.join(_CELLS)}, not {cell!r}")
        self.cell_type = cell
        self.delay = order_arg("delay", delay, 1)
        self.start = max(self.delay, order_arg("warmup", warmup, 0))
        hidden, layers = order_arg("hidden", hidden, 1), order_arg("layers", layers, 1)
        with seeded(seed):
            self.rnn = _CELLS[cell](1, hidden, layers, batch_first=True)
            self.readout = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        check_sequence_input(x, self.start)
        u, _ = self._scaled(x)
        t = x.shape[1]
        z = u[:, : t - self.delay].unsqueeze(-1)  # z at step k − τ is u(k − τ), k = τ..T−1
        h, _ = self.rnn(z)
        ys = self.readout(h).squeeze(-1)[:, self.start - self.delay :]
        return self._unscaled(ys)


def gru_model(hidden: int, **kwargs) -> RecurrentSequenceModel:
    """A GRU sequence model (see :class:`RecurrentSequenceModel`)."""
    return RecurrentSequenceModel("gru", hidden, **kwargs)


def lstm_model(hidden: int, **kwargs) -> RecurrentSequenceModel:
    """An LSTM sequence model (see :class:`RecurrentSequenceModel`)."""
    return RecurrentSequenceModel("lstm", hidden, **kwargs)
