"""Benchmark: what structured and unstructured pruning buy at inference time (issue #5, item 5).

Part 1, structured: for the digits MLP 64-300-100-10, the digits CNN and an MLP 784-1024-1024-10,
keep 25 % of the hidden units/channels of every hidden layer (those with the largest fan-out
weight norm; the others are deleted with ``optbrain.structure.remove``) and time the dense forward
pass of the pruned model against the original at batch 1 and batch 256 (CPU, inference mode).

Part 3, recurrent (issue #11, item 5): an LSTM sequence model (32 inputs, hidden 128 and 512,
40 steps, a Linear read-out at every step) loses 75 % of its hidden units (those of smallest
fan-out norm: their ``weight_hh`` columns in every gate and their read-out columns), deleted
with ``optbrain.structure.remove`` (their rows in every gate of ``weight_ih``/``weight_hh`` and
the biases go with them); the forward pass of the smaller LSTM is timed against the original at
batch 1 and 256.

Part 2, unstructured: a square weight ``W`` (1024² and 4096²) with 50 / 90 / 99 % of its entries
zero, ``x @ W.T`` as a dense matmul against ``torch.sparse`` CSR (``W_csr @ x.T``) at batch 1 and
256: when does unstructured sparsity pay without special hardware?

Every figure is a ratio candidate / baseline taken in interleaved rounds in the same process
(``_timing.compare``: medians of per-round ratios, contended rounds redone). Run
``python benchmarks/structured.py --help``; results are recorded in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
import warnings
from collections.abc import Callable
from functools import partial
from operator import matmul

import torch
from torch import Tensor, nn

from _timing import compare, quartiles
from optbrain import structure
from optbrain.cells import cell_sums, cells
from optbrain.models.digits import digits_cnn, digits_mlp

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

TARGET_SPEEDUP = 3.0  # 4x fewer hidden units -> at least 3x lower batch-256 latency
CALL_S = 0.004  # each timed call loops the forward pass until it lasts about this long
QUIET: float | None = None  # wait before each round until others use less than this CPU share


def mlp_784() -> nn.Sequential:
    return digits_mlp((1024, 1024), "relu", seed=0, n_in=784, n_out=10)


NETWORKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "digits_mlp 64-300-100-10": (lambda: digits_mlp(seed=0), (64,)),
    "digits_cnn": (lambda: digits_cnn(seed=0), (1, 8, 8)),
    "mlp 784-1024-1024-10": (mlp_784, (784,)),
}


def keep_strongest(model: nn.Module, keep: float) -> structure.Removal:
    """Delete all but the ``keep`` fraction of each hidden layer's cells, by fan-out L2 norm."""
    hidden = [c for c in cells(model) if c.kind != "input"]
    sq = {n: p.detach().square() for n, p in model.named_parameters()}
    norms = cell_sums(sq, hidden, "fan_out")
    drop: dict[str, list[int]] = {}
    for layer in dict.fromkeys(c.layer for c in hidden):
        idx = [i for i, c in enumerate(hidden) if c.layer == layer]
        n_keep = max(1, round(keep * len(idx)))
        order = sorted(idx, key=lambda i: (float(norms[i]), hidden[i].index))
        drop[layer] = [hidden[i].index for i in order[: len(idx) - n_keep]]
    return structure.remove(model, drop)


def _looped(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` repeated enough times that one call lasts about ``CALL_S`` (timer resolution)."""
    fn()
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    once = max(sorted(times)[3], 1e-7)  # median: one lucky or stalled call does not set k
    k = max(1, int(CALL_S / once))

    def run() -> None:
        for _ in range(k):
            fn()

    run.loops = k  # type: ignore[attr-defined]
    return run


def _pair(base_fn, cand_fn, repeats: int) -> dict:
    base, cand = _looped(base_fn), _looped(cand_fn)
    k_base, k_cand = base.loops, cand.loops  # type: ignore[attr-defined]
    paired = compare(
        base, cand, repeats, base_number=3, cand_number=3, quiet=QUIET, max_retries=4 * repeats
    )
    per_call = [(c / k_cand) / (b / k_base) for b, c in zip(paired.base, paired.cand)]
    q1, median, q3 = quartiles(per_call)
    return {
        "base_ms": 1e3 * paired.base_s / k_base,
        "cand_ms": 1e3 * paired.cand_s / k_cand,
        "ratio": median,
        "ratio_q1_q3": (q1, q3),
        # ratio of the fastest rounds: a contention-robust companion of the median ratio
        "ratio_of_minima": (min(paired.cand) / k_cand) / (min(paired.base) / k_base),
        "rounds": paired.rounds,
        "retried": paired.retried,
    }


def structured(repeats: int, batches: list[int], names: list[str]) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name in names:
        build, shape = NETWORKS[name]
        model = build().eval()
        removal = keep_strongest(model, 0.25)
        small = removal.model.eval()
        widths = {p: (len(removal.kept[p]) + len(removal.removed.get(p, []))) for p in removal.kept}
        for b in batches:
            x = torch.randn(b, *shape, generator=gen)
            with torch.inference_mode():
                res = _pair(partial(model, x), partial(small, x), repeats)
            rows.append(
                {
                    "network": name,
                    "batch": b,
                    "params_before": removal.params_before,
                    "params_after": removal.params_after,
                    "hidden_before": sum(widths.values()),
                    "hidden_after": sum(len(v) for v in removal.kept.values()),
                    **res,
                }
            )
            _log(rows[-1])
    return rows


class LSTMReadout(nn.Module):
    """An LSTM and a Linear read-out of every step."""

    def __init__(self, hidden: int, inputs: int = 32, outputs: int = 10):
        super().__init__()
        self.rnn = nn.LSTM(inputs, hidden, batch_first=True)
        self.out = nn.Linear(hidden, outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.rnn(x)[0])


def recurrent(repeats: int, batches: list[int], hiddens: list[int], steps: int = 40) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(2)
    for hidden in hiddens:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LSTMReadout(hidden).eval()
        removal = keep_strongest(model, 0.25)
        small = removal.model.eval()
        for b in batches:
            x = torch.randn(b, steps, 32, generator=gen)
            with torch.inference_mode():
                err = float((small(x) - _masked_reference(model, removal)(x)).abs().max())
                res = _pair(partial(model, x), partial(small, x), repeats)
            rows.append(
                {
                    "network": f"LSTM 32-{hidden}-10, {steps} steps",
                    "batch": b,
                    "params_before": removal.params_before,
                    "params_after": removal.params_after,
                    "hidden_before": hidden,
                    "hidden_after": small.rnn.hidden_size,
                    "max_abs_diff_vs_masked": err,
                    **res,
                }
            )
            _log(rows[-1])
    return rows


def _masked_reference(model: nn.Module, removal: structure.Removal) -> nn.Module:
    """The original model with the removed units' fan-out weights zeroed."""
    from optbrain.cells import cell_mask
    from optbrain.masking import Mask, attach

    ref = copy.deepcopy(model)
    hidden = [c for c in cells(model) if c.kind != "input"]
    gone = [c for c in hidden if c.index in removal.removed.get(c.layer, [])]
    names = [n for n, _ in model.named_parameters()]
    attach(ref, cell_mask(Mask.ones(model, names), gone, part="fan_out"))
    return ref


def _sparse_weight(n: int, sparsity: float, gen: torch.Generator) -> Tensor:
    w = torch.randn(n, n, generator=gen)
    keep = torch.rand(n, n, generator=gen) >= sparsity
    return w * keep


def unstructured(repeats: int, batches: list[int], sizes: list[int]) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(1)
    for n in sizes:
        for sparsity in (0.5, 0.9, 0.99):
            w = _sparse_weight(n, sparsity, gen)
            w_csr = w.to_sparse_csr()
            for b in batches:
                x = torch.randn(b, n, generator=gen)
                xt = x.T.contiguous()
                with torch.inference_mode():
                    dense = x @ w.T
                    sparse = (w_csr @ xt).T
                    err = float((dense - sparse).abs().max() / dense.abs().max())
                    res = _pair(partial(matmul, x, w.T), partial(matmul, w_csr, xt), repeats)
                rows.append({"n": n, "sparsity": sparsity, "batch": b, "max_rel_err": err, **res})
                _log(rows[-1])
    return rows


def _log(row: dict) -> None:
    print(json.dumps(row), file=sys.stderr, flush=True)


def report(
    struct_rows: list[dict], sparse_rows: list[dict], meta: dict, rec_rows: list[dict] = ()
) -> str:
    out = [
        f"torch {meta['torch']}, {meta['threads']} threads, {meta['machine']}, "
        f"{meta['repeats']} rounds per row",
    ]
    if struct_rows:
        out += _structured_section(struct_rows)
    if rec_rows:
        out += _recurrent_section(rec_rows)
    if sparse_rows:
        out += _sparse_section(sparse_rows)
    return "\n".join(out)


def _structured_section(rows: list[dict]) -> list[str]:
    out = [
        "",
        "### Structured: 25 % of the hidden units/channels kept (`structure.remove`)",
        "",
        "| network | params before → after | hidden before → after | batch "
        "| ms before | ms after | after / before [IQR] | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        q1, q3 = r["ratio_q1_q3"]
        out.append(
            f"| {r['network']} | {r['params_before']:,} → {r['params_after']:,} "
            f"| {r['hidden_before']} → {r['hidden_after']} | {r['batch']} "
            f"| {r['base_ms']:.3f} | {r['cand_ms']:.3f} | {r['ratio']:.3f} [{q1:.3f}–{q3:.3f}] "
            f"| {1 / r['ratio']:.2f}× |"
        )
    big = [r for r in rows if r["network"].startswith("mlp 784") and r["batch"] == 256]
    if big:
        s = 1 / big[0]["ratio"]
        verdict = "met" if s >= TARGET_SPEEDUP else "NOT met"
        out += [
            "",
            f"Target (784-1024-1024-10, batch 256, ≥ {TARGET_SPEEDUP}×): {s:.2f}× — {verdict}.",
        ]
    return out


def _recurrent_section(rows: list[dict]) -> list[str]:
    out = [
        "",
        "### Recurrent: 75 % of an LSTM's hidden units removed (`structure.remove`)",
        "",
        "| network | params before → after | hidden | batch | ms before | ms after "
        "| after / before [IQR] | speed-up | max abs diff vs masked |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        q1, q3 = r["ratio_q1_q3"]
        out.append(
            f"| {r['network']} | {r['params_before']:,} → {r['params_after']:,} "
            f"| {r['hidden_before']} → {r['hidden_after']} | {r['batch']} "
            f"| {r['base_ms']:.3f} | {r['cand_ms']:.3f} "
            f"| {r['ratio']:.3f} [{q1:.3f}–{q3:.3f}] | {1 / r['ratio']:.2f}× "
            f"| {r['max_abs_diff_vs_masked']:.1e} |"
        )
    return out


def _sparse_section(rows: list[dict]) -> list[str]:
    out = [
        "",
        "### Unstructured: CSR sparse vs dense matmul (`x @ W.T`, W n×n)",
        "",
        "| n | sparsity | batch | dense ms | CSR ms | CSR / dense [IQR] |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        q1, q3 = r["ratio_q1_q3"]
        out.append(
            f"| {r['n']} | {r['sparsity']:.0%} | {r['batch']} | {r['base_ms']:.3f} "
            f"| {r['cand_ms']:.3f} | {r['ratio']:.2f} [{q1:.2f}–{q3:.2f}] |"
        )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--repeats", type=int, default=9, help="interleaved rounds per row")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, n = 1024 only")
    ap.add_argument(
        "--sizes", default="1024,4096", help="weight sizes n of the CSR part (comma-separated)"
    )
    ap.add_argument("--json", help="also write all rows to this JSON file")
    ap.add_argument(
        "--parts",
        default="structured,unstructured,recurrent",
        help="comma-separated parts to run (structured, unstructured, recurrent)",
    )
    ap.add_argument("--hidden", default="128,512", help="LSTM hidden sizes of the recurrent part")
    ap.add_argument(
        "--quiet",
        type=float,
        default=None,
        help="before each round wait (<= 30 s) until other processes use less than this share "
        "of the CPUs (e.g. 0.25); default: do not wait",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global QUIET
    QUIET = args.quiet
    repeats = 3 if args.quick else args.repeats
    sizes = [1024] if args.quick else [int(n) for n in args.sizes.split(",")]
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "repeats": repeats,
        "quick": args.quick,
        "quiet": args.quiet,
    }
    parts = set(args.parts.split(","))
    struct_rows = structured(repeats, [1, 256], list(NETWORKS)) if "structured" in parts else []
    sparse_rows = unstructured(repeats, [1, 256], sizes) if "unstructured" in parts else []
    hiddens = [int(h) for h in args.hidden.split(",")]
    rec_rows = recurrent(repeats, [1, 256], hiddens) if "recurrent" in parts else []
    print(report(struct_rows, sparse_rows, meta, rec_rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "meta": meta,
                    "structured": struct_rows,
                    "unstructured": sparse_rows,
                    "recurrent": rec_rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
