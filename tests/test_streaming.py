"""Streaming (issue 16, item 2): every diagonal estimator reads a stream of batches in one pass,
keeps no batch beyond the one it works on, reports progress, and equals the tensor problem."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

from optbrain.curvature import ESTIMATORS
from optbrain.problem import Problem
from optbrain.streaming import BatchStream

F64 = torch.float64
N, BATCH = 400, 16  # 25 batches
SEEDED = {"hutchinson": {"samples": 6, "seed": 3}, "mc_fisher": {"samples": 2, "seed": 3}}


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 5, generator=g, dtype=F64), torch.randint(0, 3, (N,), generator=g)


class _Tracked:
    """A generator-function stream that records how many of its batches are alive at once, how
    many passes were started and how many batches were read."""

    def __init__(self):
        self.x, self.y = _data()
        self.live: weakref.WeakSet = weakref.WeakSet()
        self.peak = self.passes = self.read = 0

    def batches(self):
        self.passes += 1
        for i in range(0, N, BATCH):
            self.peak = max(self.peak, len(self.live))
            x = self.x[i : i + BATCH].clone()  # a fresh tensor, as a reader would produce
            self.live.add(x)
            self.read += 1
            yield x, self.y[i : i + BATCH]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_stream_equals_tensor_problem_one_pass_bounded_memory(name):
    model, loss = _model(), nn.CrossEntropyLoss()
    src = _Tracked()
    ticks: list[tuple[int, int]] = []
    kwargs = SEEDED.get(name, {})
    est = ESTIMATORS[name](progress=lambda d, t: ticks.append((d, t)), **kwargs)
    got = est.diagonal(Problem(model, loss, BatchStream(src.batches)))
    ref = ESTIMATORS[name](**kwargs).diagonal(Problem(model, loss, _data()))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-13)
    n_batches = N // BATCH
    # one full pass; the rest are peeks at the first batch (validation, chunk sizing)
    assert src.read - n_batches <= 2 and src.passes - 1 <= 2
    assert src.peak <= 3, f"{src.peak} batches alive at once: the estimator keeps batches"
    assert [d for d, _ in ticks[:n_batches]] == list(range(BATCH, N + 1, BATCH))
    assert ticks[-1] == (N, N)


def test_progress_knows_the_total_once_counted():
    model, loss = _model(), nn.CrossEntropyLoss()
    src = _Tracked()
    problem = Problem(model, loss, BatchStream(src.batches))
    first: list[tuple[int, int]] = []
    ESTIMATORS["ggn"](progress=lambda d, t: first.append((d, t))).diagonal(problem)
    assert first[0] == (BATCH, 0)  # N unknown during the first pass over a stream
    again: list[tuple[int, int]] = []
    ESTIMATORS["ggn"](progress=lambda d, t: again.append((d, t))).diagonal(problem)
    assert again[0] == (BATCH, N) and again[-1] == (N, N)


def test_one_shot_iterator_is_refused():
    x, y = _data()
    gen = ((x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, N, BATCH))
    with pytest.raises(TypeError, match="one-shot iterator"):
        Problem(_model(), nn.CrossEntropyLoss(), gen)


def test_batch_stream_rejects_a_non_callable():
    with pytest.raises(TypeError, match="callable"):
        BatchStream([(torch.zeros(1), torch.zeros(1))])
