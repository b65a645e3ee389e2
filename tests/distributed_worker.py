"""One rank of the data-parallel tests (tests/test_distributed.py), or the single-process
reference on the union of the shards.

Run as ``python distributed_worker.py RANK WORLD INIT_FILE OUT_FILE``: it joins a gloo group
through ``INIT_FILE``, computes every quantity of :func:`compute` on its shard, runs the
bad-input scenarios of :func:`bad_inputs`, and saves ``{name: value or ("error", type, msg)}``
with ``torch.save``. :func:`compute` with ``rank=None`` is the reference: one process on the
union of the shards (the test calls it in its own process).
"""

from __future__ import annotations

import copy
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from optbrain import pruners
from optbrain.curvature import (
    BlockInverse,
    DirectInverse,
    EmpiricalFisherDiagonal,
    ExactHessianDiagonal,
    GGNDiagonal,
    HutchinsonDiagonal,
    KFACInverse,
    LayerwiseHessian,
    LeCunDiagonal,
    MCFisherDiagonal,
    RecursiveInverse,
    SubsampledDiagonal,
)
from optbrain.loop import iterative_prune
from optbrain.masking import current_mask
from optbrain.problem import Problem
from optbrain.quantize import GPTQ
from optbrain.saliency import SNIP, AccumulatedGradient
from optbrain.saliency.generalization import objective_gradient
from optbrain.schedule import geometric

F64 = torch.float64
N = 22
#: the shards: rank 0 holds samples 0..11 in batches of 5 and 7, rank 1 samples 12..21 in 4 and 6
SHARDS = {0: [(0, 5), (5, 12)], 1: [(12, 16), (16, 22)]}


class Residual(nn.Module):
    """A graph the chain engine cannot read (a skip connection): the graph engine's case."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)) + x)


def mlp(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * 0.7)
    return m


def residual() -> nn.Module:
    torch.manual_seed(1)
    return Residual().to(F64)


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 5, generator=g, dtype=F64)
    y = torch.randn(N, 3, generator=g, dtype=F64)
    labels = torch.randint(0, 4, (N,), generator=g)
    return x, y, labels


def batches(rank: int | None, y_kind: str = "reg"):
    """The rank's shard (``rank=None``: the union, in one other batching)."""
    x, y, labels = data()
    t = y if y_kind == "reg" else labels
    if rank is None:
        return [(x[i : i + 9], t[i : i + 9]) for i in range(0, N, 9)]
    return [(x[a:b], t[a:b]) for a, b in SHARDS[rank]]


def problem(rank, model, loss=None, y_kind="reg", **kw) -> Problem:
    loss = loss if loss is not None else nn.MSELoss()
    group = "auto" if rank is not None else None
    return Problem(model, loss, batches(rank, y_kind), group=group, **kw)


def _estimators() -> dict:
    return {
        "lecun_gn": LeCunDiagonal(),
        "lecun": LeCunDiagonal(gauss_newton=False),
        "ggn": GGNDiagonal(),
        "ggn_func": GGNDiagonal(method="func"),
        "hessian": ExactHessianDiagonal(method="backprop"),
        "hessian_hvp": ExactHessianDiagonal(method="hvp"),
        "ef": EmpiricalFisherDiagonal(),
        "hutchinson": HutchinsonDiagonal(samples=20, seed=3),
    }


def compute(rank: int | None) -> dict:
    """Every quantity compared between the ranks and against one process on the union."""
    out: dict = {}
    p = problem(rank, mlp())
    out["n_samples"] = p.n_samples
    out["objective"] = p.objective()
    for name, est in _estimators().items():
        out[f"diag/{name}"] = est.diagonal(p)
    g = problem(rank, residual(), nn.CrossEntropyLoss(), "cls")
    out["graph/ggn"] = GGNDiagonal(method="backprop").diagonal(g)
    out["graph/lecun"] = LeCunDiagonal().diagonal(g)
    out["inverse/recursive"] = RecursiveInverse(alpha=1e-3, chunk=4).inverse(p).matrix
    out["inverse/direct"] = DirectInverse("ggn", damping=1e-3).inverse(p).matrix
    out["inverse/hessian"] = DirectInverse("hessian").matrix(p)[0]
    out["inverse/blocks"] = [g.inv for g in BlockInverse(4, alpha=1e-3).inverse(p).groups]
    out["inverse/kfac"] = [(lay.A, lay.B) for lay in KFACInverse(alpha=1e-3).inverse(p).layers]
    out["layerwise_H"] = {k: h.H for k, h in LayerwiseHessian().hessians(p).items()}
    out["snip"] = SNIP(batches=None)(p)
    out["accumulated_gradient"] = AccumulatedGradient()(p)
    out["gradient"] = objective_gradient(p)
    out["quantized"] = _quantized(rank)
    out.update(_steps(rank))
    return out


def _quantized(rank) -> dict:
    """GPTQ calibrated on a (distributed) Problem: the weights it writes."""
    q = mlp().float()
    calibration = [(b.float(), t.float()) for b, t in batches(rank)]
    group = "auto" if rank is not None else None
    GPTQ(bits=3).apply(q, calibration=Problem(q, nn.MSELoss(), calibration, group=group))
    return copy.deepcopy(q.state_dict())


def _steps(rank) -> dict:
    """A step of OBD (adaptive), OBS (safeguarded, adaptive) and layer-wise OBS, and a short
    iterative_prune; the resulting weights and masks."""
    out = {}
    for name, make in {
        "obd": lambda: pruners.obd(),
        "obs": lambda: pruners.obs(),
        "layerwise": lambda: pruners.layerwise_obs(),
        "obs_blocks": lambda: pruners.obs(inverse=BlockInverse(3, alpha=1e-3)),
        "obs_kfac": lambda: pruners.obs(inverse=KFACInverse(alpha=1e-3)),
    }.items():
        m = mlp(2)
        mask, info = make()(problem(rank, m), sparsity=0.5)
        out[f"step/{name}/weights"] = copy.deepcopy(m.state_dict())
        out[f"step/{name}/mask"] = dict(mask.items())
        out[f"step/{name}/predicted"] = info.predicted_increase
    m = mlp(3)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / ("loop" if rank is None else f"loop-rank{rank}")
        h = iterative_prune(
            m,
            pruners.obd(),
            geometric(0.4),
            rounds=2,
            make_problem=lambda model: problem(rank, model),
            evaluate=lambda model: {"val_loss": float(rank or 0)},
            checkpoint_dir=folder,
        )
        out["loop/files"] = sorted(f.name for f in folder.iterdir()) if folder.exists() else []
    out["loop/actual"] = [r.actual_increase for r in h.records]
    out["loop/predicted"] = [r.predicted_increase for r in h.records]
    out["loop/metrics"] = [r.metrics for r in h.records]
    out["loop/mask"] = dict(current_mask(m).items())
    out["loop/weights"] = copy.deepcopy(m.state_dict())
    return out


def _error(fn) -> tuple:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - recorded for the test to check
        return ("error", type(exc).__name__, str(exc))
    return ("ok",)


def bad_inputs(rank: int) -> dict:
    """The scenarios that must fail on every rank with a named error (and never hang)."""
    x, y, _ = data()
    flat = nn.Sequential(nn.Flatten(), nn.Linear(6, 3)).to(F64)
    g = torch.Generator().manual_seed(rank)
    shape = (8, 6) if rank == 0 else (8, 2, 3)  # the same number of features, another shape
    xs = torch.randn(shape, generator=g, dtype=F64)
    out = {
        "shape": _error(lambda: Problem(flat, nn.MSELoss(), (xs, y[:8])).n_samples),
        "empty": _error(
            lambda: Problem(mlp(), nn.MSELoss(), batches(0) if rank == 0 else []).objective()
        ),
        "model": _error(lambda: problem(rank, mlp(rank)).objective()),
    }
    broken = batches(rank)
    if rank == 1:  # a batch whose targets do not match its inputs: fails on rank 1 only
        broken = [broken[0], (broken[1][0], broken[1][1][:-1])]
    out["remote"] = _error(lambda: GGNDiagonal().diagonal(Problem(mlp(), nn.MSELoss(), broken)))
    whole = Problem(mlp(), nn.MSELoss(), batches(None), split=True)  # every rank: the union
    out["split"] = GGNDiagonal().diagonal(whole)

    def report():
        from optbrain.curvature_report import run

        run(epochs=0)

    out["not_distributed"] = _error(report)
    sub = SubsampledDiagonal(GGNDiagonal(), 0.5)
    out["subsampled"] = _error(lambda: sub.diagonal(problem(rank, mlp())))
    xq = batches(rank)[0][0].float()
    out["quantize_raw"] = _error(lambda: GPTQ(bits=4).apply(mlp().float(), calibration=xq))
    out["hutchinson_fresh"] = HutchinsonDiagonal(samples=4).diagonal(problem(rank, mlp()))
    out["mc"] = MCFisherDiagonal(samples=2, seed=1).diagonal(problem(rank, mlp()))
    return out


def main(argv: list[str]) -> None:
    rank, world, init, dest = int(argv[0]), int(argv[1]), argv[2], argv[3]
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    try:
        results = compute(rank)
        results.update({f"bad/{k}": v for k, v in bad_inputs(rank).items()})
    finally:
        torch.distributed.destroy_process_group()
    torch.save(results, dest)


if __name__ == "__main__":
    main(sys.argv[1:])
