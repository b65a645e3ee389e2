"""Data-parallel problems: two gloo ranks on this machine against one process on the union.

The two ranks run once per session (``tests/distributed_worker.py``: every estimator, the
inverses, layer-wise H, saliencies, pruner steps, a short iterative_prune, and the bad-input
scenarios); each test compares what they saved: the ranks must agree bit for bit, and with one
process on the union of their shards to float64 rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distributed_worker as W

HERE = Path(__file__).parent
TIMEOUT = 240  # seconds for both ranks together (they take ~15 s on an idle machine)

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), *sys.path]))
    env.pop("WORLD_SIZE", None)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "distributed_worker.py"),
                str(r),
                "2",
                str(tmp / "init"),
                str(tmp / f"rank{r}.pt"),
            ],
            env=env,
            cwd=tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the ranks did not finish within {TIMEOUT} s (a collective hangs?)")
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-4000:]}"
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def union() -> dict:
    torch.set_num_threads(1)
    return W.compute(None)


def _flat(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in _flat(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat(v)]
    return [torch.tensor(float(value), dtype=torch.float64)]


def _identical(a, b) -> bool:
    fa, fb = _flat(a), _flat(b)
    return len(fa) == len(fb) and all(torch.equal(x, y) for x, y in zip(fa, fb))


def _close(a, b, rtol=1e-9, atol=1e-12) -> None:
    fa, fb = _flat(a), _flat(b)
    assert len(fa) == len(fb)
    for x, y in zip(fa, fb):
        if x.dtype == torch.bool:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x.double(), y.double(), rtol=rtol, atol=atol)


COMPARED = [
    "n_samples",
    "objective",
    *(f"diag/{k}" for k in W._estimators()),
    "graph/ggn",
    "graph/lecun",
    "inverse/recursive",
    "inverse/direct",
    "inverse/hessian",
    "inverse/blocks",
    "inverse/kfac",
    "layerwise_H",
    "snip",
    "accumulated_gradient",
    "gradient",
]


@pytest.mark.parametrize("name", COMPARED)
def test_every_reduction_equals_one_process_on_the_union(ranks, union, name):
    r0, r1 = ranks
    assert _identical(r0[name], r1[name]), f"{name}: the ranks differ"
    rtol = 1e-7 if name.startswith("inverse") else 1e-9  # the inverses amplify rounding
    _close(r0[name], union[name], rtol=rtol)


def test_the_union_really_differs_from_each_shard(ranks, union):
    """The comparison can fail: one shard alone gives another diagonal."""
    p = W.problem(None, W.mlp())
    p.data = W.batches(0)
    alone = W.GGNDiagonal().diagonal(p)
    assert not torch.allclose(alone["0.weight"], union["diag/ggn"]["0.weight"], rtol=1e-3)


@pytest.mark.parametrize("step", ["obd", "obs", "layerwise", "obs_blocks", "obs_kfac"])
def test_a_pruner_step_equals_one_process_on_the_union(ranks, union, step):
    r0, r1 = ranks
    for part in ("mask", "weights", "predicted"):
        key = f"step/{step}/{part}"
        assert _identical(r0[key], r1[key]), key
        _close(r0[key], union[key], rtol=1e-7, atol=1e-10)


def test_iterative_prune_equals_one_process_and_rank0_writes(ranks, union):
    r0, r1 = ranks
    for key in ("loop/mask", "loop/weights", "loop/actual", "loop/predicted", "loop/metrics"):
        assert _identical(r0[key], r1[key]), key
    for key in ("loop/mask", "loop/weights", "loop/predicted"):
        _close(r0[key], union[key], rtol=1e-7, atol=1e-10)
    assert r0["loop/metrics"] == r1["loop/metrics"] == union["loop/metrics"]  # rank 0's metric
    assert r0["loop/files"] == ["checkpoint.pt", "history.json"]
    assert r1["loop/files"] == []  # rank 1 wrote nothing


def test_gptq_calibrated_on_a_distributed_problem(ranks, union):
    r0, r1 = ranks
    assert _identical(r0["quantized"], r1["quantized"])
    diff = [
        float((r0["quantized"][k] != union["quantized"][k]).float().mean())
        for k in union["quantized"]
    ]
    assert max(diff) < 0.02  # float32 H summed in another order: a rare rounding flip


@pytest.mark.parametrize(
    ("scenario", "errors"),
    [
        ("shape", ["ShardMismatchError", "ShardMismatchError"]),
        ("empty", ["EmptyShardError", "EmptyShardError"]),
        ("model", ["ModelMismatchError", "ModelMismatchError"]),
        ("remote", ["RemoteRankError", "ShapeMismatchError"]),
        ("not_distributed", ["NotDistributedError", "NotDistributedError"]),
        ("quantize_raw", ["NotDistributedError", "NotDistributedError"]),
        ("subsampled", ["NotDistributedError", "NotDistributedError"]),
    ],
)
def test_bad_input_fails_on_every_rank_with_a_named_error(ranks, scenario, errors):
    got = [r[f"bad/{scenario}"] for r in ranks]
    assert [g[0] for g in got] == ["error", "error"], got
    assert [g[1] for g in got] == errors, got
    if scenario == "remote":
        assert "rank 1" in got[0][2] and "targets" in got[0][2]
    if scenario == "empty":
        assert "rank(s) [1]" in got[0][2]


def test_split_batches_equals_the_union(ranks, union):
    assert _identical(ranks[0]["bad/split"], ranks[1]["bad/split"])
    # every rank holds the union and uses its half of each batch
    _close(ranks[0]["bad/split"], union["diag/ggn"])


@pytest.mark.parametrize("name", ["hutchinson_fresh", "mc"])
def test_random_estimators_agree_across_ranks(ranks, name):
    """Fresh Hutchinson probes come from rank 0; MC draws differ per rank but are summed."""
    assert _identical(ranks[0][f"bad/{name}"], ranks[1][f"bad/{name}"])


def test_optbrain_prune_under_torchrun_equals_one_process(tmp_path):
    """``torchrun -m optbrain prune``: the same rounds as one process; rank 0 writes the run."""
    task = f"{HERE / 'fixtures_task.py'}:task"
    args = ["prune", "--task", task, "--rounds", "2", "--sparsity", "0.6", "--no-progress"]
    args += ["--select", "fpe"]  # FPE per round, the round chosen on rank 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("WORLD_SIZE", None)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    runs = {
        "two": [*launch, "-m", "optbrain", *args, "--out", str(tmp_path / "two")],
        "one": [sys.executable, "-m", "optbrain", *args, "--out", str(tmp_path / "one")],
    }
    for name, cmd in runs.items():
        done = subprocess.run(
            cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT
        )
        assert done.returncode == 0, f"{name}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        if name == "two":
            assert done.stdout.count("optbrain prune:") == 1  # rank 0 alone prints
    one, two = (
        json.loads((tmp_path / n / "obd" / "history.json").read_text()) for n in ("one", "two")
    )
    for a, b in zip(one["records"], two["records"], strict=True):
        assert a["remaining"] == b["remaining"]
        for key in ("objective_before", "objective_pruned", "predicted_increase"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-5, nan_ok=True), key
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )


def test_ranks_retraining_on_their_own_shards_continue_as_one_model(tmp_path):
    """``--shards given`` with retraining: each rank retrains on its shard, then the weights are
    averaged (weighted by samples), so the next round's model check passes on every rank."""
    task = f"{HERE / 'fixtures_given_task.py'}:task"
    args = ["prune", "--task", task, "--method", "obd", "--rounds", "2", "--sparsity", "0.6"]
    args += ["--retrain-epochs", "1", "--shards", "given", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), *sys.path]))
    env.pop("WORLD_SIZE", None)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd = [*launch, "-m", "optbrain", *args, "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=TIMEOUT)  # fmt: skip
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    history = json.loads((tmp_path / "two" / "obd" / "history.json").read_text())
    assert len(history["records"]) >= 2


def test_average_models_is_the_sample_weighted_mean_of_the_ranks():
    """Against a stand-in for a second rank: every parameter (and normalisation statistic, not
    other buffers) becomes (n₀·θ₀ + n₁·θ₁)/(n₀ + n₁)."""
    from torch import nn

    from optbrain.distributed import Shards, average_models_

    torch.manual_seed(0)
    mine, other = (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(2))
    for m in (mine, other):
        m[1].running_mean.normal_()
        m[1].register_buffer("tag", torch.randn(4))
    n0, n1 = 30.0, 10.0
    want = {k: (n0 * v + n1 * other.state_dict()[k]) / (n0 + n1)
            for k, v in mine.state_dict().items() if v.is_floating_point()}  # fmt: skip
    theirs = [*(p.detach() for p in other.parameters()),
              other[1].running_mean, other[1].running_var]  # fmt: skip

    class TwoRanks(Shards):
        def sum(self, value):
            return value + n1

        def all_reduce_(self, values):
            for t, o in zip(values, theirs):
                t.add_(o * (n1 / (n0 + n1)))
            return values

    tag = mine[1].tag.clone()
    average_models_(mine, n0, TwoRanks(size=2))
    got = mine.state_dict()
    for k in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        torch.testing.assert_close(got[k], want[k])
    assert torch.equal(got["1.tag"], tag)  # other buffers (masks) untouched
