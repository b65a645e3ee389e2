"""Benchmark of OBS's full inverse and of layer-wise OBS (issue #4, item 5).

(a) Layer-wise OBS on single Linear layers (weight rows × columns, e.g. 768 × 3072 and 4096 × 4096)
    with 2048 calibration rows: H = 2XXᵀ/n accumulated through the forward hook (float64), then
    the blocked solver (SparseGPT) at 50 % unstructured and at 2:4, and, for small layers, the
    exact solver (OBC). Reported: the reconstruction error (1/n)‖(W − Ŵ)X‖²_F relative to
    magnitude pruning of the same layer (same sparsity pattern kind: per-layer 50 % / 2:4 by |w|),
    seconds per layer (calibration + solve), and that time as a ratio to one X·Wᵀ matmul (float32)
    timed in the same process. Inputs are correlated Gaussians X = Z·(I + R/√k) (R standard
    normal), weights W ~ N(0, 1/k): a synthetic stand-in, not a trained network.
(b) The full inverse of OBS (:mod:`optbrain.curvature.inverse`): time and peak memory of
    ``RecursiveInverse`` and ``DirectInverse`` against the number of weights p, on one-hidden-layer
    tanh MLPs 32-h-4 of growing width (MSE, N samples), each in a fresh subprocess, with one
    forward+backward pass of the same model over the same data as the baseline ratio; plus the
    p² × 8 bytes bound on p for a memory budget.

Run ``python benchmarks/obs.py --help``; results are recorded in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time

import torch
from torch import nn

from _timing import compare, reset_peak_rss, status_kb
from optbrain.curvature.calibration import calibration_hessians
from optbrain.problem import Problem
from optbrain.pruners.layerwise import blocked_obs, exact_obs, reconstruction_error

FULL_LAYERS = [(768, 3072), (4096, 4096)]
QUICK_LAYERS = [(64, 256), (256, 512)]
FULL_WIDTHS = [27, 68, 135, 270, 540]  # p = 37h + 4: 1.0k, 2.5k, 5.0k, 10k, 20k weights
QUICK_WIDTHS = [27, 68]
EXACT_MAX = 2e9  # rows · k³: run the exact solver only on layers this small


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- (a) layer-wise
def layer_setting(rows: int, cols: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + torch.randn(cols, cols, generator=g) / cols**0.5
    X = torch.randn(n, cols, generator=g) @ mix
    W = torch.randn(rows, cols, generator=g) / cols**0.5
    return X, W


def magnitude(W: torch.Tensor, nm: tuple[int, int] | None) -> torch.Tensor:
    if nm is None:
        flat = W.reshape(-1).clone()
        flat[flat.abs().argsort()[: flat.numel() // 2]] = 0
        return flat.reshape(W.shape)
    groups = W.reshape(W.shape[0], -1, nm[1]).clone()
    idx = groups.abs().argsort(2)[:, :, : nm[0]]
    return groups.scatter_(2, idx, 0.0).reshape(W.shape)


def bench_layer(rows: int, cols: int, args) -> list[dict]:
    X, W = layer_setting(rows, cols, args.calibration_rows)
    layer = nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        layer.weight.copy_(W)
    batches = list(X.split(args.batch))
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    out = []
    cases = [("blocked", None), ("blocked", (2, 4))]
    if rows * float(cols) ** 3 <= EXACT_MAX:
        cases += [("exact", None), ("exact", (2, 4))]
    for method, nm in cases:
        result: dict = {}

        def run(method=method, nm=nm, result=result):
            h = calibration_hessians(layer, batches)[""]
            fn = exact_obs if method == "exact" else blocked_obs
            target = None if nm else W.numel() // 2
            result["sol"] = fn(W.to(dtype), h.H[0], target, nm=nm, damping=args.damping)
            result["H"] = h.H[0]

        def matmul():
            X @ W.T

        log(f"layer {rows}x{cols} {method} {nm or '50%'} ...")
        paired = compare(
            matmul, run, args.repeats, slow_s=5.0, slow_repeats=1, quiet=None, max_contention=None
        )
        sol, H = result["sol"], result["H"]
        ours = reconstruction_error(sol.weight.to(torch.float64) - W.double(), H)
        mag = reconstruction_error(magnitude(W, nm).double() - W.double(), H)
        out.append(
            {
                "layer": f"{rows}x{cols}",
                "method": method,
                "pattern": "2:4" if nm else "50%",
                "error": ours,
                "magnitude_error": mag,
                "error_ratio": ours / mag,
                "seconds": paired.cand_s,
                "matmul_s": paired.base_s,
                "ratio": paired.ratio,
                "rounds": paired.rounds,
                "sparsity": float((~sol.kept).float().mean()),
            }
        )
        log(f"  error/magnitude {ours / mag:.3f}, {paired.cand_s:.2f} s ({paired.ratio:.0f}x)")
    return out


# ----------------------------------------------------------------------------- (b) full inverse
def mlp_setting(width: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, width), nn.Tanh(), nn.Linear(width, 4)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / p.shape[-1] ** 0.5)
    x = torch.randn(n, 32, generator=g, dtype=torch.float64)
    y = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return model, x, y


def inverse_here(width: int, method: str, n: int) -> dict:
    """Child side: time one inverse and measure its peak RSS growth; gradient pass baseline."""
    from optbrain.curvature.inverse import DirectInverse, RecursiveInverse

    model, x, y = mlp_setting(width, n)
    loss_fn = nn.MSELoss()
    p = sum(q.numel() for q in model.parameters())
    problem = Problem(model, loss_fn, (x, y))
    est = (RecursiveInverse if method == "recursive" else DirectInverse)(max_params=p + 1)

    def grad_pass():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    grad_pass()
    grad_s = min(_timed(grad_pass) for _ in range(5))
    gc.collect()
    reset_peak_rss()
    before = status_kb("VmRSS") or 0
    t0 = time.perf_counter()
    inv = est.inverse(problem)
    seconds = time.perf_counter() - t0
    peak = (status_kb("VmHWM") or 0) - before
    grad_s = min(grad_s, min(_timed(grad_pass) for _ in range(5)))
    return {
        "p": p,
        "width": width,
        "method": method,
        "seconds": seconds,
        "grad_s": grad_s,
        "ratio": seconds / grad_s,
        "peak_mb": peak / 1024,
        "matrix_mb": inv.matrix.numel() * 8 / 2**20,
    }


def _timed(fn, calls: int = 10) -> float:
    """Seconds per call, averaged over ``calls`` back-to-back calls (a pass takes ~1 ms)."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def bench_inverse(width: int, method: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--only", f"{width}:{method}"]
    cmd += ["--threads", str(args.threads), "--samples", str(args.samples)]
    log(f"inverse {method} width {width} ...")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"width": width, "method": method, "error": proc.stderr.strip()[-300:]}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    log(f"  p={res['p']}: {res['seconds']:.2f} s, {res['ratio']:.0f}x, {res['peak_mb']:.0f} MB")
    return res


# ----------------------------------------------------------------------------- report
def render(layers: list[dict], inverses: list[dict], args) -> str:
    lines = [
        "| layer (rows×cols) | solver | pattern | error / magnitude's | s per layer | "
        "× one X·Wᵀ matmul |",
        "|---|---|---|---|---|---|",
    ]
    for r in layers:
        lines.append(
            f"| {r['layer']} | {r['method']} | {r['pattern']} | {r['error_ratio']:.3f} | "
            f"{r['seconds']:.2f} | {r['ratio']:.0f} |"
        )
    lines += [
        "",
        "| p (weights) | method | seconds | × one gradient pass | peak MB | p²·8 bytes MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in inverses:
        if "error" in r:
            lines.append(f"| width {r['width']} | {r['method']} | failed: {r['error']} | | | |")
            continue
        lines.append(
            f"| {r['p']:,} | {r['method']} | {r['seconds']:.2f} | {r['ratio']:.0f} | "
            f"{r['peak_mb']:.0f} | {r['matrix_mb']:.0f} |"
        )
    budget = args.memory_gib * 2**30
    lines += [
        "",
        f"Memory bound: one p × p float64 matrix fits in {args.memory_gib:g} GiB up to "
        f"p = {int((budget / 8) ** 0.5):,}; with the peak/matrix ratio measured at the largest "
        f"size above, up to p ≈ {_bound(inverses, budget):,}.",
    ]
    return "\n".join(lines)


def _bound(inverses: list[dict], budget: float) -> int:
    ok = [r for r in inverses if "error" not in r and r["matrix_mb"] > 0]
    if not ok:
        return 0
    big = max(ok, key=lambda r: r["p"])
    factor = max(big["peak_mb"] / big["matrix_mb"], 1.0)
    return int((budget / 8 / factor) ** 0.5)


def machine(args) -> str:
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"Machine: {cpu}, nproc = {os.cpu_count()}, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f} at the end."
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small layers and widths (smoke run)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds per layer case")
    p.add_argument("--calibration-rows", type=int, default=2048)
    p.add_argument("--batch", type=int, default=256, help="calibration batch size")
    p.add_argument("--damping", type=float, default=0.01)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--layers", default=None, help="e.g. 768x3072,4096x4096")
    p.add_argument("--widths", default=None, help="hidden widths of the MLPs, e.g. 27,68,135")
    p.add_argument("--direct-max-p", type=int, default=10_000, help="largest p for DirectInverse")
    p.add_argument("--samples", type=int, default=512, help="samples N for the full inverse")
    p.add_argument("--memory-gib", type=float, default=24.0)
    p.add_argument("--skip", choices=["layerwise", "inverse"], default=None)
    p.add_argument("--json", default=None, help="also write the results as JSON")
    p.add_argument("--only", default=None, help="internal: WIDTH:METHOD in a subprocess")
    args = p.parse_args(argv)
    if args.quick:
        args.calibration_rows = min(args.calibration_rows, 512)
        args.repeats = min(args.repeats, 2)
    layers = args.layers or ",".join(
        f"{r}x{c}" for r, c in (QUICK_LAYERS if args.quick else FULL_LAYERS)
    )
    args.layers = [tuple(int(v) for v in s.split("x")) for s in layers.split(",")]
    widths = args.widths or ",".join(map(str, QUICK_WIDTHS if args.quick else FULL_WIDTHS))
    args.widths = [int(v) for v in widths.split(",")]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.only:
        width, method = args.only.split(":")
        print(json.dumps(inverse_here(int(width), method, args.samples)))
        return 0
    layers: list[dict] = []
    inverses: list[dict] = []
    if args.skip != "layerwise":
        for rows, cols in args.layers:
            layers += bench_layer(rows, cols, args)
    if args.skip != "inverse":
        for width in args.widths:
            for method in ("recursive", "direct"):
                p = 37 * width + 4
                if method == "direct" and p > args.direct_max_p:
                    continue
                inverses.append(bench_inverse(width, method, args))
    print("command: python benchmarks/obs.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print(machine(args))
    print(render(layers, inverses, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"layers": layers, "inverses": inverses}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
