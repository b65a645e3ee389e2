"""One-shot OBS on a network with more than a million weights (issue 16, item 4).

A 784-1024-512-10 tanh MLP (1 333 770 weights) is trained briefly (Adam) on synthetic data: a
latent z ~ N(0, I₆₄) is mapped to inputs x = zM + 0.1 ε (784 correlated features, M fixed
random) and labelled by a random teacher MLP 64-64-10 on z (argmax). It is then pruned once (no
retraining) to 50, 80 and 90 % of its weights (biases are kept, and moved by OBS) by

* ``magnitude`` (½ w², global), ``obd`` (½ h w² with the exact GGN diagonal h, one step),
* ``obs-block<c>``: OBS with the block-diagonal inverse of chunks of c weights
  (:class:`~optbrain.curvature.BlockInverse`, WoodFisher's layout) and its exact bulk greedy step,
* ``obs-kfac``: OBS with the K-FAC inverse (:class:`~optbrain.curvature.KFACInverse`) and its bulk
  group update,
* ``obs-dense`` (the dense inverse, :class:`~optbrain.curvature.AutoInverse`): refused on the
  full net (p² memory), so it is compared on a *subnet*: the same trained net with only the last
  layer (512-10, 5 130 weights) prunable, where every method above runs too.

All OBS inverses use the GGN with α = ``--alpha``; the curvature and the objective are over
``--calibration`` training samples. Reported per method and sparsity: the training objective E
(cross-entropy on the calibration samples) after the one-shot prune, the test accuracy, the
seconds of the prune call and the peak resident memory of the process during it (VmHWM after a
reset, Linux). ``--quick`` trains less, uses 512 calibration samples and the 50 % level only
(about 5 minutes, most of it the dense OBS on the subnet).

Run ``python benchmarks/large_obs.py --help``; results are recorded in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time

import torch
from torch import nn

from _nets import environment
from _timing import reset_peak_rss, status_kb
from optbrain.curvature import AutoInverse, BlockInverse, KFACInverse
from optbrain.errors import OptbrainError
from optbrain.masking import Mask, attach
from optbrain.problem import Problem
from optbrain.pruners import OBSPruner, magnitude, obd

LATENT, D_IN, CLASSES = 64, 784, 10
SUBNET = ["4.weight", "4.bias"]  # the prunable part of the subnet: 4.weight


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(LATENT, D_IN, generator=torch.Generator().manual_seed(0)) / LATENT**0.5
    teacher = nn.Sequential(nn.Linear(LATENT, 64), nn.Tanh(), nn.Linear(64, CLASSES))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        z = torch.randn(n, LATENT, generator=g)
        x = z @ mix + 0.1 * torch.randn(n, D_IN, generator=g)
        y = teacher(z).argmax(1)
    return x, y


def trained(args):
    torch.manual_seed(args.seed)
    model = nn.Sequential(
        nn.Linear(D_IN, 1024), nn.Tanh(), nn.Linear(1024, 512), nn.Tanh(), nn.Linear(512, CLASSES)
    )
    x, y = make_data(args.train, args.seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        for idx in torch.randperm(len(y), generator=g).split(128):
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        with torch.no_grad():
            log(f"epoch {epoch + 1}: loss {float(loss_fn(model(x[:2048]), y[:2048])):.4f}")
    return model, x[: args.calibration], y[: args.calibration]


def pruners(args, subnet: bool) -> dict:
    out = {
        "magnitude": lambda: magnitude(min_kept=0),
        "obd": lambda: obd(steps=None, min_kept=0),
        f"obs-block{args.block}": lambda: OBSPruner(BlockInverse(args.block, alpha=args.alpha)),
        "obs-kfac": lambda: OBSPruner(KFACInverse(alpha=args.alpha)),
    }
    if subnet:
        out["obs-dense"] = lambda: OBSPruner(AutoInverse(alpha=args.alpha))
    return out


def run_one(model, data, test, make, sparsity: float, params) -> dict:
    m = copy.deepcopy(model)
    batches = [(data[0][i : i + 512], data[1][i : i + 512]) for i in range(0, len(data[1]), 512)]
    problem = Problem(m, nn.CrossEntropyLoss(), batches, params=params)
    gc.collect()
    reset_peak_rss()
    t0 = time.perf_counter()
    mask = Mask.ones(m, [params[0]]) if params else None
    try:
        mask, _ = make()(problem, mask, sparsity=sparsity)
    except OptbrainError as exc:
        return {"error": f"{type(exc).__name__}: {str(exc).split(';')[0][:160]}"}
    seconds = time.perf_counter() - t0
    peak = (status_kb("VmHWM") or 0) / 2**20
    attach(m, mask)
    with torch.no_grad():
        acc = float((m(test[0]).argmax(1) == test[1]).double().mean())
    return {"objective": problem.objective(), "accuracy": acc, "seconds": seconds,
            "peak_gib": peak}  # fmt: skip


def sweep(model, data, test, args, subnet: bool) -> list[dict]:
    rows = []
    params = SUBNET if subnet else None
    for name, make in pruners(args, subnet).items():
        for sparsity in args.sparsities:
            log(f"{'subnet' if subnet else 'full'} {name} {100 * sparsity:g}% ...")
            r = run_one(model, data, test, make, sparsity, params)
            r.update(net="subnet (last layer)" if subnet else "full", method=name,
                     sparsity=sparsity)  # fmt: skip
            rows.append(r)
            log(f"  {r}")
    if not subnet:  # the dense inverse on the full net: the refusal
        r = run_one(model, data, test, lambda: OBSPruner(AutoInverse(alpha=args.alpha)),
                    args.sparsities[0], None)  # fmt: skip
        r.update(net="full", method="obs-dense", sparsity=args.sparsities[0])
        rows.append(r)
    return rows


def render(rows: list[dict], base: dict, args) -> str:
    lines = [
        f"before pruning: objective {base['objective']:.4f}, test accuracy "
        f"{100 * base['accuracy']:.1f} %",
        "",
        "| net | method | sparsity | objective E | test accuracy | seconds | peak RSS GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['net']} | {r['method']} | {100 * r['sparsity']:g} % |"
        if "error" in r:
            lines.append(f"{head} refused: {r['error']} | | | |")
        else:
            lines.append(
                f"{head} {r['objective']:.4f} | {100 * r['accuracy']:.1f} % | "
                f"{r['seconds']:.1f} | {r['peak_gib']:.2f} |"
            )
    lines.append(
        f"\n{args.calibration} calibration samples, α = {args.alpha}, chunks of {args.block}; "
        f"{environment()}"
    )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small training, 512 samples, 50 %% only")
    ap.add_argument("--train", type=int, default=16384)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--calibration", type=int, default=4096)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=1e-4)
    ap.add_argument("--parts", nargs="+", default=["full", "subnet"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.train, args.epochs, args.calibration = 4096, 1, 512
        args.sparsities = [0.5]
    torch.set_num_threads(args.threads)
    model, *data = trained(args)
    test = make_data(4096, args.seed + 2)
    base_problem = Problem(model, nn.CrossEntropyLoss(), tuple(data))
    with torch.no_grad():
        accuracy = float((model(test[0]).argmax(1) == test[1]).double().mean())
    base = {"objective": base_problem.objective(), "accuracy": accuracy}
    log(f"{sum(p.numel() for p in model.parameters())} weights; before: {base}")
    rows = []
    for part in args.parts:
        rows += sweep(model, data, test, args, subnet=part == "subnet")
    print(render(rows, base, args))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "before": base, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
