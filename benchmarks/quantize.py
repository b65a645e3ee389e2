"""Benchmark of GPTQ and of the shared layer-wise machinery against straight transcriptions
(issue #17, item 5).

Single Linear layers (rows × columns: 768 × 3072, a BERT-base FFN down-projection; 4096 × 4096,
a 7B-LLM attention projection) with 2048 calibration rows in batches of 256; inputs are
correlated Gaussians X = Z·(I + R/√k), weights W ~ N(0, 1/k) (the setting of benchmarks/obs.py).
Each case times ours against a transcription written below, in interleaved rounds (median and
quartiles of the per-round ratio, ``_timing.compare``), at each thread count:

* ``gptq``: the whole layer — H = 2XXᵀ/n through the forward hooks
  (:func:`optbrain.curvature.calibration.calibration_hessians`) plus :func:`optbrain.quantize.gptq`
  (4 bits, per channel, float32) — against H = 2XᵀX/n built directly in float32 plus
  :func:`gptq_transcription`, GPTQ's Algorithm 1 as the paper and its reference code write it.
  Output error (1/n)‖(W − Q)X‖²_F of both, relative to round-to-nearest's.
* ``sparsegpt``: the solver alone — :func:`optbrain.layerwise.blocked_obs` at 50 % against
  :func:`sparsegpt_transcription`, SparseGPT's loop; errors relative to magnitude pruning's.
* ``hessian``: H through the hooks against the direct float32 build.

With ``--before REV`` the two layer-wise cases also run the code of ``src/optbrain/layerwise.py``
and ``src/optbrain/curvature/layerwise.py`` as of git revision REV (``sparsegpt@REV``,
``hessian@REV``): the A/B of a change, in the same process.

Run ``python benchmarks/quantize.py --help``; results are recorded in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn

from _timing import compare
from obs import layer_setting, machine, magnitude
from optbrain.curvature.calibration import calibration_hessians
from optbrain.pruners.layerwise import blocked_obs, reconstruction_error
from optbrain.quantize import QuantSpec, gptq, rtn

FULL_LAYERS = [(768, 3072), (4096, 4096)]
QUICK_LAYERS = [(128, 512)]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- transcriptions
def gptq_transcription(W, H, bits=4, blocksize=128, percdamp=0.01):
    """GPTQ's Algorithm 1 (per-channel asymmetric grid, lazy blocks), as transcribed from the
    paper and the authors' ``fasterquant``."""
    W, H = W.clone(), H.clone()
    columns, maxq = W.shape[1], 2**bits - 1
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    xmin = torch.clamp(W.min(1).values, max=0)
    xmax = torch.clamp(W.max(1).values, min=0)
    flat = (xmin == 0) & (xmax == 0)
    xmin[flat], xmax[flat] = -1, 1
    scale = ((xmax - xmin) / maxq).unsqueeze(1)
    zero = torch.round(-xmin.unsqueeze(1) / scale)
    H[range(columns), range(columns)] += percdamp * torch.mean(torch.diag(H))
    H = torch.cholesky_inverse(torch.linalg.cholesky(H))
    Hinv = torch.linalg.cholesky(H, upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            q = torch.clamp(torch.round(w.unsqueeze(1) / scale) + zero, 0, maxq)
            q = (scale * (q - zero)).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q


def sparsegpt_transcription(W, H, sparsity=0.5, blocksize=128, percdamp=0.01):
    """SparseGPT's loop (unstructured, mask per block), as transcribed from its reference code."""
    W, H = W.clone(), H.clone()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H[range(columns), range(columns)] += percdamp * torch.mean(torch.diag(H))
    H = torch.cholesky_inverse(torch.linalg.cholesky(H))
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
        thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
        mask1 = tmp <= thresh
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def load_before(rev: str):
    """(blocked_obs, calibration_hessians) of the two layer-wise files at git revision ``rev``,
    imported from a temporary folder (relative imports made absolute)."""
    import importlib.util
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    tmp = Path(tempfile.mkdtemp(prefix="optbrain-before-"))
    mods = {}
    for name, rel, pkg in (
        ("before_clw", "src/optbrain/curvature/layerwise.py", "optbrain.curvature"),
        ("before_lw", "src/optbrain/layerwise.py", "optbrain"),
    ):
        src = subprocess.run(
            ["git", "show", f"{rev}:{rel}"], cwd=root, capture_output=True, text=True, check=True
        ).stdout
        parent = pkg.rsplit(".", 1)[0]
        src = re.sub(r"^from \.\.(\w)", rf"from {parent}.\1", src, flags=re.M)
        src = re.sub(r"^from \.(\w)", rf"from {pkg}.\1", src, flags=re.M)
        if name == "before_lw":
            src = src.replace("from optbrain.curvature.layerwise import", "from before_clw import")
        path = tmp / f"{name}.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(name, path)
        mods[name] = importlib.util.module_from_spec(spec)
        sys.modules[name] = mods[name]
        spec.loader.exec_module(mods[name])
    return mods["before_lw"].blocked_obs, mods["before_clw"].calibration_hessians


def direct_hessian(batches, n):
    H = torch.zeros(batches[0].shape[1], batches[0].shape[1])
    for b in batches:
        H += b.T @ b
    return H * (2.0 / n)


# ----------------------------------------------------------------------------- cases
def bench_layer(rows: int, cols: int, threads: int, args) -> list[dict]:
    torch.set_num_threads(threads)
    X, W = layer_setting(rows, cols, args.calibration_rows)
    layer = nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        layer.weight.copy_(W)
    batches = list(X.split(args.batch))
    n = X.shape[0]
    H64 = calibration_hessians(layer, batches)[""].H[0]
    H32 = direct_hessian(batches, n)
    spec = QuantSpec(args.bits)
    got: dict = {}
    out = []

    def ours_gptq():
        h = calibration_hessians(layer, batches)[""]
        got["gptq"] = gptq(W, h.H[0].float(), spec).weight(torch.float32)

    def ref_gptq():
        got["ref"] = gptq_transcription(W, direct_hessian(batches, n), args.bits)

    def ours_sgpt():
        got["obs"] = blocked_obs(W, H32, W.numel() // 2).weight

    def ref_sgpt():
        got["sgpt"] = sparsegpt_transcription(W, H32)

    def ours_h():
        calibration_hessians(layer, batches)

    def ref_h():
        direct_hessian(batches, n)

    name = f"{rows}x{cols}"
    cases = [
        ("gptq", ref_gptq, ours_gptq),
        ("sparsegpt", ref_sgpt, ours_sgpt),
        ("hessian", ref_h, ours_h),
    ]
    if args.before:
        old_blocked, old_hessians = load_before(args.before)

        def old_sgpt():
            got["obs"] = old_blocked(W, H32, W.numel() // 2).weight

        cases += [
            (f"sparsegpt@{args.before}", ref_sgpt, old_sgpt),
            (f"hessian@{args.before}", ref_h, lambda: old_hessians(layer, batches)),
        ]
    for case, base, cand in cases:
        log(f"{name} {case}, {threads} thread(s) ...")
        p = compare(
            base,
            cand,
            args.repeats,
            base_number=1,
            quiet=args.quiet,
            max_contention=args.max_contention,
        )
        row = {
            "layer": name,
            "case": case,
            "threads": threads,
            "ours_s": p.cand_s,
            "transcription_s": p.base_s,
            "ratio": p.ratio,
            "ratio_q1": p.ratio_iqr[0],
            "ratio_q3": p.ratio_iqr[1],
            "rounds": p.rounds,
            "retried": p.retried,
        }
        if case == "gptq":
            e_rtn = reconstruction_error(rtn(W, spec).weight(torch.float64) - W.double(), H64)
            row["error_vs_rtn"] = (
                reconstruction_error(got["gptq"].double() - W.double(), H64) / e_rtn
            )
            row["ref_error_vs_rtn"] = (
                reconstruction_error(got["ref"].double() - W.double(), H64) / e_rtn
            )
        if case.startswith("sparsegpt"):
            e_mag = reconstruction_error(magnitude(W, None).double() - W.double(), H64)
            row["error_vs_rtn"] = (
                reconstruction_error(got["obs"].double() - W.double(), H64) / e_mag
            )
            row["ref_error_vs_rtn"] = (
                reconstruction_error(got["sgpt"].double() - W.double(), H64) / e_mag
            )
        log(
            f"  ours {p.cand_s:.3f} s, transcription {p.base_s:.3f} s, ratio {p.ratio:.2f} "
            f"[{p.ratio_iqr[0]:.2f}, {p.ratio_iqr[1]:.2f}]"
        )
        out.append(row)
    return out


def render(rows: list[dict]) -> str:
    lines = [
        "| layer | case | threads | ours s | transcription s | ours / transcription "
        "(median [q1, q3]) | rounds | error ours / ref (÷ RTN or magnitude) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = ""
        if "error_vs_rtn" in r:
            err = f"{r['error_vs_rtn']:.4f} / {r['ref_error_vs_rtn']:.4f}"
        lines.append(
            f"| {r['layer']} | {r['case']} | {r['threads']} | {r['ours_s']:.3f} | "
            f"{r['transcription_s']:.3f} | {r['ratio']:.2f} "
            f"[{r['ratio_q1']:.2f}, {r['ratio_q3']:.2f}] | {r['rounds']} (+{r['retried']} "
            f"retried) | {err} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one small layer (smoke run)")
    p.add_argument("--threads", default="1,2", help="thread counts, e.g. 1,2")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds per case")
    p.add_argument("--calibration-rows", type=int, default=2048)
    p.add_argument("--batch", type=int, default=256, help="calibration batch size")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--layers", default=None, help="e.g. 768x3072,4096x4096")
    p.add_argument("--quiet", type=float, default=None, help="wait for other jobs below this load")
    p.add_argument("--max-contention", type=float, default=0.1)
    p.add_argument(
        "--before", default=None, metavar="REV", help="also time the layer-wise code at REV"
    )
    p.add_argument("--json", default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.calibration_rows = min(args.calibration_rows, 512)
        args.repeats = min(args.repeats, 2)
    layers = args.layers or ",".join(
        f"{r}x{c}" for r, c in (QUICK_LAYERS if args.quick else FULL_LAYERS)
    )
    args.layers = [tuple(int(v) for v in s.split("x")) for s in layers.split(",")]
    args.threads = [int(t) for t in args.threads.split(",")]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rows: list[dict] = []
    for rows_, cols in args.layers:
        for threads in args.threads:
            rows += bench_layer(rows_, cols, threads, args)
    print(
        "command: python benchmarks/quantize.py " + " ".join(sys.argv[1:] if argv is None else argv)
    )
    print(machine(args))
    print(render(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
