"""Curvature estimators on models that are not nn.Sequential chains: time per gradient pass and
peak memory, measured in the same run (issues #10 and #11).

Models (random data; one process, ``--threads`` intra-op threads):

* ``res_mlp``: the 64-128-128-128-10 tanh MLP with two residual additions in a custom forward,
  beside ``seq_mlp``, the same layers as an ``nn.Sequential`` without the skips (N = 1797);
* ``res_cnn``: a digits-size CNN (conv 1→8, conv 8→8 with a skip, pool, Linear) in a custom
  forward, beside ``seq_cnn`` without the skip;
* ``block``: a transformer block (embedding, LayerNorm, attention, GELU MLP; batch 64, 32 tokens,
  width 64), one class per token (cross-entropy over 64 classes at every position);
* ``bp_ggn``: BackPACK's ``DiagGGNExact`` beside our exact GGN wherever it runs (the chains, and
  the residual models in the nn.Tanh-module form its converter reads, same weights);
* ``gru32``/``lstm32``/``gru128``/``lstm128``: a recurrent layer (input 3, hidden 32 or 128,
  batch 256, 40 steps) with a Linear read-out (3 outputs, MSE) at every step (``*_every``) or at
  the last step only (``*_last``).

For every estimator the ratio is the median over interleaved rounds of (estimator time) /
(gradient-pass time: forward and backward of the loss over the same data), with the
interquartile range; candidates are interleaved with the baseline round by round, nobody waits
for the machine to be quiet. Peak memory (VmHWM above the process's RSS before the call) of one
call is measured in a fresh subprocess per candidate, beside the gradient pass's.

    python benchmarks/graphs.py --threads 1 [--models res_mlp,seq_mlp] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _timing import compare, reset_peak_rss, status_kb  # noqa: E402
from optbrain import Problem  # noqa: E402
from optbrain.curvature import (  # noqa: E402
    EmpiricalFisherDiagonal,
    GGNDiagonal,
    LeCunDiagonal,
    MCFisherDiagonal,
)


# --------------------------------------------------------------------------- models
class ResMLP(nn.Module):
    """``modules=True`` calls nn.Tanh modules instead of ``torch.tanh`` (the same function; the
    form BackPACK's converter can read)."""

    def __init__(self, skips: bool = True, modules: bool = False):
        super().__init__()
        self.l1, self.l2 = nn.Linear(64, 128), nn.Linear(128, 128)
        self.l3, self.l4 = nn.Linear(128, 128), nn.Linear(128, 10)
        self.skips = skips
        acts = (nn.Tanh(), nn.Tanh(), nn.Tanh()) if modules else (torch.tanh,) * 3
        self.a1, self.a2, self.a3 = acts

    def forward(self, x):
        h = self.a1(self.l1(x))
        h = h + self.a2(self.l2(h)) if self.skips else self.a2(self.l2(h))
        h = h + self.a3(self.l3(h)) if self.skips else self.a3(self.l3(h))
        return self.l4(h)


def seq_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(),
        nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10),
    )  # fmt: skip


class ResCNN(nn.Module):
    def __init__(self, modules: bool = False):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.pool, self.fc = nn.AvgPool2d(2), nn.Linear(8 * 4 * 4, 10)
        self.flat = nn.Flatten()
        self.a1, self.a2 = (nn.Tanh(), nn.Tanh()) if modules else (torch.tanh,) * 2

    def forward(self, x):
        h = self.a1(self.c1(x))
        h = h + self.a2(self.c2(h))
        return self.fc(self.flat(self.pool(h)))


def seq_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )  # fmt: skip


class Block(nn.Module):
    def __init__(self, vocab=64, width=64, tokens=32, heads=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.02 * torch.randn(tokens, width))
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ff1, self.ff2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.out = nn.Linear(width, vocab)
        self.register_buffer("mask", torch.triu(torch.ones(tokens, tokens, dtype=torch.bool), 1))

    def forward(self, x):
        h = self.emb(x) + self.pos
        q = self.ln1(h)
        a, _ = self.attn(q, q, q, attn_mask=self.mask, need_weights=False)
        h = h + a
        h = h + self.ff2(F.gelu(self.ff1(self.ln2(h))))
        return self.out(h).transpose(1, 2)  # N × classes × tokens


class Recurrent(nn.Module):
    def __init__(self, kind: str, hidden: int, every: bool):
        super().__init__()
        self.r = (nn.GRU if kind == "gru" else nn.LSTM)(3, hidden, batch_first=True)
        self.out, self.every = nn.Linear(hidden, 3), every

    def forward(self, x):
        o, _ = self.r(x)
        return self.out(o).flatten(1) if self.every else self.out(o[:, -1])


@dataclass
class Setting:
    build: Callable[[], nn.Module]
    data: Callable[[torch.Generator], tuple]
    loss: nn.Module
    note: str


def _digits(g):
    return torch.randn(1797, 64, generator=g), torch.randint(0, 10, (1797,), generator=g)


def _images(g):
    return torch.randn(1797, 1, 8, 8, generator=g), torch.randint(0, 10, (1797,), generator=g)


def _tokens(g):
    return torch.randint(0, 64, (64, 32), generator=g), torch.randint(0, 64, (64, 32), generator=g)


def _seq(every):
    def make(g):
        x = torch.randn(256, 40, 3, generator=g)
        return x, torch.randn(256, 3 * 40 if every else 3, generator=g)

    return make


SETTINGS = {
    "res_mlp": Setting(ResMLP, _digits, nn.CrossEntropyLoss(), "2 residual additions"),
    "seq_mlp": Setting(seq_mlp, _digits, nn.CrossEntropyLoss(), "same layers, Sequential"),
    "res_cnn": Setting(ResCNN, _images, nn.CrossEntropyLoss(), "1 residual addition"),
    "seq_cnn": Setting(seq_cnn, _images, nn.CrossEntropyLoss(), "same layers, Sequential"),
    "block": Setting(Block, _tokens, nn.CrossEntropyLoss(), "64 classes at 32 tokens"),
}
for _k in ("gru", "lstm"):
    for _h in (32, 128):
        for _e in (True, False):
            SETTINGS[f"{_k}{_h}_{'every' if _e else 'last'}"] = Setting(
                (lambda k=_k, h=_h, e=_e: Recurrent(k, h, e)), _seq(_e), nn.MSELoss(),
                f"batch 256, 40 steps, read-out at {'every' if _e else 'the last'} step",
            )  # fmt: skip

ESTIMATORS = {
    "lecun": lambda: LeCunDiagonal(),
    "ef": lambda: EmpiricalFisherDiagonal(),
    "mc": lambda: MCFisherDiagonal(samples=1, seed=0),
    "ggn": lambda: GGNDiagonal(),
}


#: BackPACK's DiagGGNExact runs on these (the residual ones in the module form its converter reads,
#: with the same weights); the others it refuses (functional activations, LayerNorm, attention,
#: embeddings and recurrent layers have no BackPACK extension)
BACKPACK_TWINS = {
    "seq_mlp": None,
    "seq_cnn": None,
    "res_mlp": lambda: ResMLP(modules=True),
    "res_cnn": lambda: ResCNN(modules=True),
}


def _backpack(name, model, loss_fn, x, y):
    """BackPACK's exact GGN diagonal on the model (or its module-form twin), as a candidate."""
    import copy

    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    twin = BACKPACK_TWINS[name]
    net = copy.deepcopy(model) if twin is None else twin().eval()
    if twin is not None:
        net.load_state_dict(model.state_dict())
    net = extend(net, use_converter=twin is not None)
    lf = extend(copy.deepcopy(loss_fn))

    def run():
        loss = lf(net(x), y)
        with backpack(DiagGGNExact()):
            loss.backward()
        net.zero_grad(set_to_none=True)

    return run, _Engine("backpack")


@dataclass
class _Engine:
    engine: str


def _setup(name: str):
    s = SETTINGS[name]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = s.build().eval()
    x, y = s.data(g)
    return model, s.loss, x, y


def _grad_pass(model, loss_fn, x, y):
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        loss = loss_fn(model(x), y)
        torch.autograd.grad(loss, params)

    return run


def _estimator(key, model, loss_fn, x, y, name=None):
    if key == "bp_ggn":
        return _backpack(name, model, loss_fn, x, y)
    problem = Problem(model, loss_fn, (x, y))
    est = ESTIMATORS[key]()

    def run():
        est.diagonal(problem)

    return run, est.path(problem)


def _memory(name: str, key: str, threads: int) -> float | None:
    """Peak memory (MB above the RSS before the call) of one call, in a fresh process."""
    cmd = [sys.executable, __file__, "--memory-only", f"{name}:{key}", "--threads", str(threads)]
    # glibc keeps freed memory of the warm-up call and serves the measured call from it, which
    # hides most of a peak; a fixed mmap threshold returns every block over 128 kB to the system
    # when it is freed, so the resident-set peak is the call's own
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])["mb"]
    except (subprocess.SubprocessError, ValueError, KeyError, IndexError):
        return None


def _memory_here(spec: str) -> None:
    name, key = spec.split(":")
    model, loss_fn, x, y = _setup(name)
    run = _grad_pass(model, loss_fn, x, y) if key == "grad" else None
    if run is None:
        run, _ = _estimator(key, model, loss_fn, x, y, name)
    run()  # warm: lazy initialisation, allocator pools
    import gc

    gc.collect()
    reset_peak_rss()
    before = status_kb("VmRSS") or 0
    run()
    peak = status_kb("VmHWM") or 0
    print(json.dumps({"mb": (peak - before) / 1024}))


def bench(name: str, keys: list[str], repeats: int, threads: int, memory: bool) -> list[dict]:
    model, loss_fn, x, y = _setup(name)
    base = _grad_pass(model, loss_fn, x, y)
    rows = []
    mem_grad = _memory(name, "grad", threads) if memory else None
    for key in keys:
        if key == "bp_ggn" and (name not in BACKPACK_TWINS or not _have_backpack()):
            continue
        run, path = _estimator(key, model, loss_fn, x, y, name)
        run()
        paired = compare(base, run, repeats, base_number=3, cand_number=1, slow_s=20.0,
                         slow_repeats=2, quiet=None, max_contention=None)  # fmt: skip
        q1, q3 = paired.ratio_iqr
        mem = _memory(name, key, threads) if memory else None
        rows.append({
            "model": name, "estimator": key, "engine": path.engine, "ratio": paired.ratio,
            "q1": q1, "q3": q3, "rounds": paired.rounds, "grad_ms": paired.base_s * 1e3,
            "mem_mb": mem, "grad_mem_mb": mem_grad,
        })  # fmt: skip
        print(_row(rows[-1]), flush=True)
    return rows


def _have_backpack() -> bool:
    import importlib.util

    return importlib.util.find_spec("backpack") is not None


def _row(r: dict) -> str:
    mem = ""
    if r["mem_mb"] is not None and r["grad_mem_mb"]:
        mem = f"  mem {r['mem_mb']:.0f} MB = {r['mem_mb'] / r['grad_mem_mb']:.2f}x grad"
    return (
        f"{r['model']:<14} {r['estimator']:<6} [{r['engine']:<7}] {r['ratio']:6.2f}x grad "
        f"(IQR {r['q1']:.2f}-{r['q3']:.2f}, {r['rounds']} rounds, grad {r['grad_ms']:.1f} ms)"
        f"{mem}"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", default=",".join(SETTINGS))
    p.add_argument(
        "--estimators",
        default=",".join([*ESTIMATORS, "bp_ggn"]),
        help="lecun, ef, mc, ggn, and bp_ggn (BackPACK's DiagGGNExact where it runs; needs the "
        "peers extra)",
    )
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="2 rounds, no memory")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--memory-only", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_only:
        _memory_here(args.memory_only)
        return 0
    repeats = 2 if args.quick else args.repeats
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs ({cpu})")
    t0 = time.perf_counter()
    rows = []
    for name in args.models.split(","):
        rows += bench(name, args.estimators.split(","), repeats, args.threads,
                      memory=not (args.quick or args.no_memory))  # fmt: skip
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
