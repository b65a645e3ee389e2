"""Small seeded float64 test problems for the curvature tests (P < 300 so dense Hessians are cheap).

``setup(case, loss)`` returns a fresh :class:`Setup` (model in eval mode, loss, data as two batches
of unequal size, 5 and 3 samples). Every call with the same arguments gives identical tensors.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import reference
from optbrain.models import LeCunTanh

DTYPE = torch.float64
SIZES = (5, 3)
LOSSES = ("mse_mean", "mse_sum", "ce_mean", "ce_sum")


class TiedAutoencoder(nn.Module):
    """One weight matrix used twice: encode with W, decode with Wᵀ (not a Sequential)."""

    def __init__(self, d: int = 4, h: int = 3):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(h, d) / d**0.5)
        self.enc_bias = nn.Parameter(0.1 * torch.randn(h))
        self.dec_bias = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x: Tensor) -> Tensor:
        z = torch.tanh(F.linear(x, self.weight, self.enc_bias))
        return F.linear(z, self.weight.t(), self.dec_bias)


class TinyRNN(nn.Module):
    """A built-in ``nn.RNN`` (weights shared over time) read out by a Linear (not a Sequential)."""

    def __init__(self, n_in: int = 2, hidden: int = 3, n_out: int = 3):
        super().__init__()
        self.rnn = nn.RNN(n_in, hidden, batch_first=True)
        self.out = nn.Linear(hidden, n_out)

    def forward(self, x: Tensor) -> Tensor:
        seq, _ = self.rnn(x)
        return self.out(seq[:, -1])


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    in_shape: tuple[int, ...]
    n_out: int
    sequential: bool = True  # only registry layers: LeCun and the "backprop" methods apply
    vmap_ok: bool = True  # torch.func.vmap works on the model (oracles pick their method)


CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case(
            "mlp_tanh",
            lambda: nn.Sequential(
                nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)
            ),
            (4,),
            3,
        ),
        Case(
            "mlp_tanh_out",  # activation on the output: f'' enters at the boundary
            lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh()),
            (4,),
            3,
        ),
        Case(
            "mlp_relu",
            lambda: nn.Sequential(
                nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)
            ),
            (4,),
            3,
        ),
        Case(
            "mlp_sigmoid",
            lambda: nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 3), nn.Identity()),
            (4,),
            3,
        ),
        Case(
            "mlp_lecuntanh",
            lambda: nn.Sequential(nn.Linear(4, 6), LeCunTanh(), nn.Linear(6, 3)),
            (4,),
            3,
        ),
        Case(
            "conv_avg",  # stride 2, padding 1, overlapping average-pool windows
            lambda: nn.Sequential(
                nn.Conv2d(2, 3, 3, stride=2, padding=1),
                nn.Tanh(),
                nn.AvgPool2d(2, stride=1),
                nn.Flatten(),
                nn.Linear(12, 3),
            ),
            (2, 6, 6),
            3,
        ),
        Case(
            "conv_max",
            lambda: nn.Sequential(
                nn.Conv2d(1, 2, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Dropout(0.3),
                nn.Linear(18, 3),
            ),
            (1, 6, 6),
            3,
        ),
        Case(
            "conv_deep",  # a conv after a conv (curvature backpropagated through a conv),
            # overlapping max-pool windows
            lambda: nn.Sequential(
                nn.Conv2d(1, 2, 3, padding=1),
                nn.Tanh(),
                nn.Conv2d(2, 2, 3, stride=2, padding=1),
                nn.Sigmoid(),
                nn.MaxPool2d(2, stride=1),
                nn.Flatten(),
                nn.Linear(8, 3),
            ),
            (1, 5, 5),
            3,
        ),
        Case("tied", lambda: TiedAutoencoder(4, 3), (4,), 4, sequential=False),
        Case("rnn", lambda: TinyRNN(2, 3, 3), (4, 2), 3, sequential=False, vmap_ok=False),
    ]
}

SEQUENTIAL = [n for n, c in CASES.items() if c.sequential]
MLPS = [n for n in SEQUENTIAL if n.startswith("mlp")]
CONVS = [n for n in SEQUENTIAL if n.startswith("conv")]
ALL = list(CASES)


def make_loss(kind: str) -> nn.Module:
    family, reduction = kind.split("_")
    if family == "mse":
        return nn.MSELoss(reduction=reduction)
    if family == "ce":
        return nn.CrossEntropyLoss(reduction=reduction)
    raise ValueError(kind)


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def make_data(
    in_shape: Sequence[int], n_out: int, loss: str, sizes: Sequence[int] = SIZES, seed: int = 0
) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(_seed("data", tuple(in_shape), n_out, loss[:2], seed))
    n = sum(sizes)
    x = torch.randn(n, *in_shape, generator=g, dtype=DTYPE)
    if loss.startswith("ce"):
        y = torch.randint(0, n_out, (n,), generator=g)
    else:
        y = torch.randn(n, n_out, generator=g, dtype=DTYPE)
    out, i = [], 0
    for b in sizes:
        out.append((x[i : i + b], y[i : i + b]))
        i += b
    return out


def make_model(case: str, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(_seed("model", case, seed))
        model = CASES[case].build()
    return model.to(DTYPE).eval()


@dataclass
class Setup:
    case: Case
    model: nn.Module
    loss_fn: nn.Module
    batches: list[tuple[Tensor, Tensor]]

    def problem(self, batches=None, **kw):
        from optbrain.problem import Problem

        return Problem(self.model, self.loss_fn, self.batches if batches is None else batches, **kw)

    def merged(self) -> list[tuple[Tensor, Tensor]]:
        x, y = zip(*self.batches)
        return [(torch.cat(x), torch.cat(y))]

    def rebatched(self, sizes: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        ((x, y),) = self.merged()
        out, i = [], 0
        for b in sizes:
            out.append((x[i : i + b], y[i : i + b]))
            i += b
        assert i == x.shape[0]
        return out


@functools.cache
def _oracles(case: str, loss: str) -> dict[str, dict[str, Tensor]]:
    s = setup(case, loss)
    kw = {"use_vmap": s.case.vmap_ok}
    return {
        "hessian": reference.hessian_diag(s.model, s.loss_fn, s.batches, **kw),
        "ggn": reference.ggn_diag(s.model, s.loss_fn, s.batches, **kw),
        "ef": reference.empirical_fisher_diag(s.model, s.loss_fn, s.batches, **kw),
    }


def oracle(case: str, loss: str, which: str) -> dict[str, Tensor]:
    """Cached reference diagonal ("hessian", "ggn" or "ef") for ``setup(case, loss)`` (a copy)."""
    return {k: v.clone() for k, v in _oracles(case, loss)[which].items()}


def setup(case: str, loss: str, sizes: Sequence[int] = SIZES, seed: int = 0) -> Setup:
    c = CASES[case]
    return Setup(
        c,
        make_model(case, seed),
        make_loss(loss),
        make_data(c.in_shape, c.n_out, loss, sizes, seed),
    )


def assert_diag_close(actual, expected, rtol=1e-8, atol_scale=1e-10):
    """ParamDicts equal key by key: same keys (and order), shapes, dtype; values to ``rtol``.

    The absolute tolerance is ``atol_scale`` times the largest |entry| of ``expected`` so that
    entries that are zero up to round-off compare sensibly.
    """
    assert list(actual) == list(expected), f"keys {list(actual)} != {list(expected)}"
    scale = max(float(v.abs().max()) for v in expected.values() if v.numel()) or 1.0
    for k in expected:
        a, e = actual[k], expected[k]
        assert a.shape == e.shape, f"{k}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        torch.testing.assert_close(
            a.to(e.dtype), e, rtol=rtol, atol=atol_scale * scale, msg=lambda m, k=k: f"{k}: {m}"
        )
