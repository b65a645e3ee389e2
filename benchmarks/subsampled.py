"""Subsampled curvature with error bars (issue 16, item 3): how many samples
:class:`~optbrain.curvature.SubsampledDiagonal` needs before the OBD selection is stable, how well
its selection agrees with the one from the full data, and the time it saves.

Two settings, both streamed batch by batch (nothing but the current batch is held):

* ``digits``: the 64-256-128-10 tanh MLP of ``_nets.digits_mlp`` (trained by Adam, cached), its
  training set (about 1 200 samples) in one fixed random order, batches of 16;
* ``synthetic``: a random teacher MLP 32-64-10 labels x ~ N(0, I₃₂) by sampling from its
  softmax; a student 32-128-64-10 tanh MLP (13 130 weights) is trained briefly by Adam on the first
  131 072 samples; the curvature data are ``--samples`` (default 2²⁰ = 1 048 576) samples,
  generated per batch from a seed derived from the batch index, so every pass sees the same data.

For each target sparsity the base estimator (GGN diagonal) runs once on all the data (the
baseline) and the wrapper runs on the same stream with ``--confidence`` and ``--tolerance``
(first check after ``--first`` samples, then ×``--growth``). Reported: samples used, the fraction
of undecided weights at the stop, whether the rule fired, the Jaccard index |A∩B|/|A∪B| of the
pruned sets (k smallest ½ D w² over all parameters) and the agreement 1 − |A△B|/P, and the time
ratio full / subsampled (both in this process, interleaved over ``--rounds`` rounds; median and
range). ``--quick`` runs a small synthetic set (2¹⁶ samples) and one round.

Run ``python benchmarks/subsampled.py --help``; results are recorded in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch import nn

from _nets import environment
from optbrain.curvature import GGNDiagonal, SubsampledDiagonal
from optbrain.problem import Problem
from optbrain.streaming import BatchStream

D_IN, CLASSES = 32, 10


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the settings
def digits_setting(seed: int):
    from _nets import digits_mlp  # trains (cached) on first use

    net = digits_mlp(seed)
    order = torch.randperm(len(net.y_train), generator=torch.Generator().manual_seed(seed))
    x, y = net.x_train[order], net.y_train[order]
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, len(y), 16)]
    return "digits MLP 64-256-128-10", net.model, net.loss_fn, lambda: iter(batches), len(y)


def _teacher(seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(D_IN, 64), nn.Tanh(), nn.Linear(64, CLASSES))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2 / p.shape[-1] ** 0.5)
    return teacher


def synthetic_stream(teacher: nn.Module, samples: int, batch: int, seed: int):
    """A generator function over ``samples`` teacher-labelled samples in batches of ``batch``."""

    def gen():
        for b, start in enumerate(range(0, samples, batch)):
            g = torch.Generator().manual_seed(seed * 1_000_003 + b)
            x = torch.randn(min(batch, samples - start), D_IN, generator=g)
            with torch.no_grad():
                p = torch.softmax(teacher(x), 1)
            yield x, torch.multinomial(p, 1, generator=g)[:, 0]

    return gen


def synthetic_setting(seed: int, samples: int, batch: int):
    teacher = _teacher(seed)
    torch.manual_seed(seed)
    student = nn.Sequential(
        nn.Linear(D_IN, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, CLASSES)
    )
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    train = synthetic_stream(teacher, 131_072, 1024, seed + 1)  # not the curvature samples
    for _ in range(2):
        for x, y in train():
            opt.zero_grad()
            loss_fn(student(x), y).backward()
            opt.step()
    stream = synthetic_stream(teacher, samples, batch, seed + 2)
    name = f"synthetic teacher 32-64-10, student 32-128-64-10, {samples} samples"
    return name, student, loss_fn, stream, samples


# ----------------------------------------------------------------------------- measuring
def pruned_set(diag: dict, model: nn.Module, k: int) -> torch.Tensor:
    params = dict(model.named_parameters())
    s = torch.cat([(0.5 * diag[n] * params[n].detach().square()).reshape(-1) for n in diag])
    out = torch.zeros(s.numel(), dtype=torch.bool)
    out[torch.topk(s.double(), k, largest=False).indices] = True
    return out


def one_setting(name, model, loss_fn, stream, n, args) -> list[dict]:
    base = GGNDiagonal()
    problem = Problem(model, loss_fn, BatchStream(stream))
    p = sum(q.numel() for q in model.parameters())
    rows = []
    for sparsity in args.sparsities:
        sub = SubsampledDiagonal(
            base,
            sparsity,
            confidence=args.confidence,
            tolerance=args.tolerance,
            first=args.first,
            growth=args.growth,
            min_batches=args.min_batches,
            draw=args.draw,
        )
        result: dict = {}
        full_t, sub_t = [], []
        for r in range(args.rounds):  # interleaved, alternating which goes first
            for which in (0, 1) if r % 2 == 0 else (1, 0):
                t0 = time.perf_counter()
                if which == 0:
                    result["full"] = base.diagonal(problem)
                    full_t.append(time.perf_counter() - t0)
                else:
                    result["sub"] = sub.estimate(problem)
                    sub_t.append(time.perf_counter() - t0)
        k = round(sparsity * p)
        a = pruned_set(result["full"], model, k)
        b = pruned_set(result["sub"].diagonal, model, k)
        ratios = [f / s for f, s in zip(full_t, sub_t)]
        est = result["sub"]
        rows.append(
            {
                "setting": name,
                "weights": p,
                "samples_total": n,
                "sparsity": sparsity,
                "samples_used": est.samples,
                "fraction_used": est.samples / n,
                "undecided": est.undecided,
                "converged": est.converged,
                "jaccard": float((a & b).sum() / (a | b).sum()),
                "agreement": 1.0 - float((a ^ b).sum()) / p,
                "full_s": statistics.median(full_t),
                "sub_s": statistics.median(sub_t),
                "speedup": statistics.median(ratios),
                "speedup_range": [min(ratios), max(ratios)],
            }
        )
        r = rows[-1]
        log(
            f"  {100 * sparsity:g}%: {est.samples}/{n} samples, undecided {est.undecided:.4f}, "
            f"Jaccard {r['jaccard']:.3f}, {r['speedup']:.1f}x faster"
        )
    return rows


def render(rows: list[dict], args) -> str:
    lines = [
        "| setting | weights | sparsity | samples used / all | undecided at stop | rule fired | "
        "Jaccard | agreement | full s | subsampled s | time saved (full / sub) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["speedup_range"]
        lines.append(
            f"| {r['setting']} | {r['weights']} | {100 * r['sparsity']:g} % | "
            f"{r['samples_used']} / {r['samples_total']} ({100 * r['fraction_used']:.1f} %) | "
            f"{r['undecided']:.4f} | {'yes' if r['converged'] else 'no'} | {r['jaccard']:.3f} | "
            f"{r['agreement']:.4f} | {r['full_s']:.2f} | {r['sub_s']:.2f} | "
            f"{r['speedup']:.1f}× ({lo:.1f}–{hi:.1f}) |"
        )
    lines.append(
        f"\nconfidence {args.confidence}, tolerance {args.tolerance}, first check at {args.first} "
        f"samples, growth {args.growth}, draws of {args.draw or 'one batch'}, {args.rounds} "
        f"interleaved round(s); {environment()}"
    )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2^16 synthetic samples, one round")
    ap.add_argument("--settings", nargs="+", default=["digits", "synthetic"])
    ap.add_argument("--samples", type=int, default=2**20)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--first", type=int, default=256)
    ap.add_argument("--growth", type=float, default=1.5)
    ap.add_argument("--min-batches", type=int, default=8)
    ap.add_argument("--draw", type=int, help="join batches into draws of this many samples")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.rounds = 2**16, 1
    torch.set_num_threads(args.threads)
    rows = []
    for setting in args.settings:
        if setting == "digits":
            spec = digits_setting(args.seed)
        elif setting == "synthetic":
            spec = synthetic_setting(args.seed, args.samples, args.batch)
        else:
            raise SystemExit(f"unknown setting {setting!r}")
        log(f"{spec[0]} ...")
        rows += one_setting(*spec, args)
    print(render(rows, args))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
