"""One-shot pruning of every named method, without and with retraining (issue #12, item 4).

Every method of ``optbrain.pruners.METHODS`` (with the options ``optbrain prune`` adds) prunes
each net in one call to 50, 80, 90 and 95 % sparsity; the table gives the test accuracy right
after (no retraining), the increase of the training objective that call measured, and the test
accuracy after a fixed retraining budget (100 Adam steps, lr 1e-3, batches of 64, deleted weights
held at 0), mean ± sd over seeds. Nets (``_nets``): the digits MLP 64-256-128-10 (tanh, CE), the
small digits CNN (``optbrain.models.digits.digits_cnn``, CE) and a tabular net (wine, 13-16-3
tanh, MSE on one-hot targets, L-BFGS to saturation).

OCD's ``sparsity`` counts input variables (the achieved weight sparsity is in the JSON); a method
that cannot run on a net (OBS's dense inverse over 50k weights, OCD on a one-channel image) is
listed with the reason. Run ``python benchmarks/one_shot.py --help``; ``--quick`` is a smoke run
(one seed, two levels, the MLP and the tabular net, no OBS on large nets). The results are in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time

import torch

import _nets
from optbrain.errors import OptbrainError
from optbrain.masking import attach
from optbrain.problem import Problem
from optbrain.pruners import METHODS

NETS = ("digits-mlp", "digits-cnn", "wine")
LEVELS = (0.5, 0.8, 0.9, 0.95)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_one(net: _nets.Net, method: str, sparsity: float, seed: int, steps: int) -> dict:
    """Prune a fresh copy once; accuracy now and after retraining; or the reason it cannot."""
    n = net.fresh()
    problem = Problem(n.model, n.loss_fn, (n.x_train, n.y_train))
    pruner = METHODS[method].make(seed, task=True)
    t = time.perf_counter()
    try:
        mask, info = pruner(problem, sparsity=sparsity)
    except OptbrainError as exc:
        return {"error": f"{type(exc).__name__}: {str(exc).split(';')[0]}"}
    seconds = time.perf_counter() - t
    attach(n.model, mask)
    out = {
        "accuracy": n.accuracy(),
        "increase": info.measured_increase,
        "weight_sparsity": info.sparsity,
        "re_estimates": info.re_estimates,
        "seconds": seconds,
    }
    if steps:
        _nets.retrain(n, seed=1000 + seed, steps=steps)
        out["retrained"] = n.accuracy()
    return out


def stat(values: list[float], scale: float = 100.0, fmt: str = ".1f") -> str:
    if not values:
        return "–"
    m = statistics.fmean(values) * scale
    s = (statistics.stdev(values) * scale) if len(values) > 1 else 0.0
    return f"{m:{fmt}} ± {s:{fmt}}"


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"]}
    return {
        "accuracy": stat([r["accuracy"] for r in ok]),
        "retrained": stat([r["retrained"] for r in ok if "retrained" in r]),
        "increase": stat([r["increase"] for r in ok], 1.0, ".3g"),
        "seconds": statistics.fmean(r["seconds"] for r in ok),
        "re_estimates": statistics.fmean(r["re_estimates"] for r in ok),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 50/90 %%, MLP+wine")
    p.add_argument("--nets", default=",".join(NETS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--levels", default=",".join(map(str, LEVELS)))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--retrain-steps", type=int, default=100, help="0: no retraining")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the raw results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    nets, methods = args.nets.split(","), args.methods.split(",")
    levels = [float(x) for x in args.levels.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        nets, levels, seeds = ["digits-mlp", "wine"], [0.5, 0.9], [0]
    t0 = time.perf_counter()
    raw: dict = {}
    lines = [
        f"Environment: {_nets.environment()}; seeds {seeds}; retraining "
        f"{args.retrain_steps} Adam steps.",
        "",
        "| net | method | sparsity | test acc % one-shot | ΔE train (one-shot) | test acc % "
        "retrained | s / call | re-estimates |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in nets:
        built = {seed: _nets.build(name, seed) for seed in seeds}
        dense = stat([built[s].accuracy() for s in seeds])
        lines.append(f"| {name} | (dense) | 0 % | {dense} | – | – | – | – |")
        for method in methods:
            for level in levels:
                runs = [run_one(built[s], method, level, s, args.retrain_steps) for s in seeds]
                raw[f"{name}/{method}/{level}"] = runs
                row = summarise(runs)
                if "error" in row:
                    line = f"| {name} | {method} | {100 * level:g} % | n/a: {row['error']} |||||"
                else:
                    line = (
                        f"| {name} | {method} | {100 * level:g} % | {row['accuracy']} | "
                        f"{row['increase']} | {row['retrained']} | {row['seconds']:.2f} | "
                        f"{row['re_estimates']:.1f} |"
                    )
                lines.append(line)
                log(line)
    lines += ["", f"total {time.perf_counter() - t0:.0f} s"]
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
