"""Benchmark of optbrain's curvature diagonals against one gradient pass (issue #2, item 6).

For the digits MLP 64-300-100-10 (tanh) and a small digits CNN, on all 1,797 digits as one batch,
with cross-entropy and/or MSE (one-hot targets), this script reports for every estimator:

* its median time and its time as a ratio to one forward+backward pass of the same model over the
  same data (``zero_grad(); loss_fn(model(X), Y).backward()``), measured in the same process in
  interleaved rounds (see ``_timing.py``): the ratio is the median of per-round ratios. In each
  round the gradient pass and (if faster than ``FAST_S``) the estimator are each timed as the
  median of 3 consecutive calls; ``--cand-calls 1`` times the estimator by a single call instead
  (the protocol before 2026-11-25, which charges the estimator a first-call cost — memory the
  allocator has to map afresh — that the median of three spares the baseline);
* its peak memory: the growth of the resident set during one call in a fresh subprocess, after a
  warm-up on a 64-sample subset (kernel peak RSS, reset just before the call, minus the RSS then);
* BackPACK's ``DiagGGNExact``, ``DiagGGNMC`` and ``DiagHessian`` on ``extend()``-ed copies of the
  same model and loss, side by side, where ``backpack-for-pytorch`` is installed;
* a correctness cross-check (``GGNDiagonal`` vs ``DiagGGNExact``, ``ExactHessianDiagonal`` vs
  ``DiagHessian``) and the three targets: LeCun ≤ 1.0× a gradient pass, GGN ≤ 0.5× BackPACK's
  DiagGGNExact, exact Hessian diagonal ≤ 1.0× BackPACK's DiagHessian.

Run ``python benchmarks/curvature.py --help``; results are recorded in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import optbrain.curvature as oc
from _timing import compare, measure, reset_peak_rss, status_kb
from optbrain.models.digits import digits_mlp
from optbrain.problem import Problem

try:  # optional benchmark peer
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact, DiagGGNMC, DiagHessian

    HAVE_BACKPACK = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_BACKPACK = False

warnings.filterwarnings("ignore", message="Full backward hook is firing")

WARMUP_SAMPLES = 64
SLOW_S = 2.0  # candidates slower than this (first round) get --slow-repeats rounds
FAST_S = 0.5  # candidates faster than this are timed like the baseline (median of 3 calls)
BASE_CALLS = 3

MEMORY_METHOD = (
    "Peak MB = growth of the resident set during ONE call in a fresh subprocess (after imports, "
    f"data, model and a warm-up call on {WARMUP_SAMPLES} samples): the kernel's peak RSS "
    "(VmHWM, reset through /proc/self/clear_refs just before the call) minus the RSS before it. "
    "It counts every allocation (torch tensors, BackPACK's saved fields, the result); memory "
    "that the allocator reuses from earlier calls is not counted again"
)


# ----------------------------------------------------------------------------- problem set-up
def load_digits_xy(n: int | None) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.int64)
    return (x, y) if n is None else (x[:n], y[:n])


def digits_cnn_tanh(seed: int = 0) -> nn.Sequential:
    """Conv(1→8,3)·tanh·AvgPool2·Conv(8→16,3)·tanh·AvgPool2·Flatten·Linear(64→10), 1,898 params.

    Same shape as :func:`optbrain.models.digits.digits_cnn` but with ``nn.Tanh`` instead of
    ``LeCunTanh``, so that BackPACK (which only extends its known modules) can run on it too.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 2 * 2, 10),
        )


MODELS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "mlp": ("MLP 64-300-100-10 tanh", lambda: digits_mlp((300, 100), "tanh", seed=0)),
    "cnn": ("CNN conv8-pool-conv16-pool-fc10 tanh", lambda: digits_cnn_tanh(seed=0)),
}


def make_setting(model_kind: str, loss_kind: str, n: int | None):
    """(model, loss_fn, X, T) for one model × loss; MSE gets one-hot float targets."""
    x, y = load_digits_xy(n)
    if model_kind == "cnn":
        x = x.reshape(-1, 1, 8, 8)
    model = MODELS[model_kind][1]()
    if loss_kind == "ce":
        return model, nn.CrossEntropyLoss(), x, y
    return model, nn.MSELoss(), x, nn.functional.one_hot(y, 10).to(torch.float32)


# ----------------------------------------------------------------------------- candidates
class Runner:
    """A zero-argument callable for timing that keeps its last result (a ParamDict)."""

    def __init__(self, fn: Callable[[], dict[str, Tensor]]):
        self.fn = fn
        self.last: dict[str, Tensor] | None = None

    def __call__(self) -> None:
        self.last = self.fn()


Factory = Callable[[nn.Module, nn.Module, Tensor, Tensor], Runner]


def grad_pass(model: nn.Module, loss_fn: nn.Module, x: Tensor, t: Tensor) -> Runner:
    def fn():
        model.zero_grad()
        loss_fn(model(x), t).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    return Runner(fn)


def optbrain_factory(make_estimator: Callable[[], object]) -> Factory:
    def factory(model, loss_fn, x, t) -> Runner:
        problem = Problem(model, loss_fn, (x, t))
        problem.check()  # validation (one no-grad forward) once, outside the timed calls
        est = make_estimator()
        return Runner(lambda: est.diagonal(problem))

    return factory


def backpack_factory(make_extension: Callable[[], object]) -> Factory:
    def factory(model, loss_fn, x, t) -> Runner:
        bmodel = extend(copy.deepcopy(model))
        bloss = extend(copy.deepcopy(loss_fn))
        ext = make_extension()

        def fn():
            bmodel.zero_grad()
            with backpack(ext):
                bloss(bmodel(x), t).backward()
            return {n: getattr(p, ext.savefield) for n, p in bmodel.named_parameters()}

        return Runner(fn)

    return factory


@dataclass
class Candidate:
    key: str
    label: str
    factory: Factory
    peer: bool = False


def candidates(hutchinson_samples: int) -> list[Candidate]:
    out = [
        Candidate(
            "lecun_gn",
            "LeCunDiagonal(gauss_newton=True)",
            optbrain_factory(lambda: oc.LeCunDiagonal(gauss_newton=True)),
        ),
        Candidate(
            "lecun",
            "LeCunDiagonal(gauss_newton=False)",
            optbrain_factory(lambda: oc.LeCunDiagonal(gauss_newton=False)),
        ),
        Candidate("ggn", "GGNDiagonal()", optbrain_factory(oc.GGNDiagonal)),
        Candidate("hessian", "ExactHessianDiagonal()", optbrain_factory(oc.ExactHessianDiagonal)),
        Candidate(
            "empirical_fisher",
            "EmpiricalFisherDiagonal()",
            optbrain_factory(oc.EmpiricalFisherDiagonal),
        ),
        Candidate(
            "mc_fisher",
            "MCFisherDiagonal(samples=1)",
            optbrain_factory(lambda: oc.MCFisherDiagonal(samples=1, seed=0)),
        ),
        Candidate(
            "hutchinson",
            f"HutchinsonDiagonal(samples={hutchinson_samples})",
            optbrain_factory(lambda: oc.HutchinsonDiagonal(samples=hutchinson_samples, seed=0)),
        ),
    ]
    if HAVE_BACKPACK:
        out += [
            Candidate(
                "bp_ggn_exact", "BackPACK DiagGGNExact", backpack_factory(DiagGGNExact), True
            ),
            Candidate(
                "bp_ggn_mc",
                "BackPACK DiagGGNMC(mc_samples=1)",
                backpack_factory(lambda: DiagGGNMC(mc_samples=1)),
                True,
            ),
            Candidate("bp_hessian", "BackPACK DiagHessian", backpack_factory(DiagHessian), True),
        ]
    return out


# ----------------------------------------------------------------------------- memory
def measure_memory_here(key: str, model_kind: str, loss_kind: str, args) -> dict:
    """Child side of the memory measurement: one warm-up call, then one measured call.

    Peak = VmHWM after the call − VmRSS before it, with VmHWM reset just before the call through
    ``/proc/self/clear_refs``. (``ru_maxrss`` cannot be used: Linux carries the parent's peak
    RSS over fork+exec into the child's.) Without ``clear_refs`` the result is only an upper
    bound when the call does not raise the earlier high-water mark.
    """
    import gc

    model, loss_fn, x, t = make_setting(model_kind, loss_kind, args.n_samples)
    factories = {c.key: c.factory for c in candidates(args.hutchinson_samples)}
    factories["grad"] = grad_pass
    factory = factories[key]
    warm = factory(model, loss_fn, x[:WARMUP_SAMPLES], t[:WARMUP_SAMPLES])
    warm()
    del warm
    model.zero_grad(set_to_none=True)
    run = factory(model, loss_fn, x, t)
    gc.collect()
    reset = reset_peak_rss()
    before_hwm = status_kb("VmHWM")
    before = status_kb("VmRSS")
    run()
    after_hwm = status_kb("VmHWM")
    if before is None or before_hwm is None or after_hwm is None:  # pragma: no cover
        return {"key": key, "error": "no /proc/self/status"}
    return {
        "key": key,
        "code": source_fingerprint(),
        "peak_mb": max(after_hwm - before, 0) / 1024,
        "exact": reset or after_hwm > before_hwm,
        "rss_before_mb": before / 1024,
    }


def measure_memory(key: str, model_kind: str, loss_kind: str, args) -> dict:
    """Run :func:`measure_memory_here` in a fresh interpreter and return its result."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--only",
        key,
        "--model",
        model_kind,
        "--loss",
        loss_kind,
        "--threads",
        str(args.threads),
        "--hutchinson-samples",
        str(args.hutchinson_samples),
    ]
    if args.n_samples is not None:
        cmd += ["--n-samples", str(args.n_samples)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"key": key, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt_mem(m: dict | None) -> str:
    if m is None:
        return "—"
    if "error" in m:
        return "error"
    mark = " (†)" if m.get("changed") else ""
    if not m["exact"]:
        return f"<= {m['peak_mb']:.1f}{mark}"
    return f"{m['peak_mb']:.1f}{mark}"


# ----------------------------------------------------------------------------- cross-checks
def max_rel_diff(ours: dict[str, Tensor], ref: dict[str, Tensor]) -> float:
    """max over parameter tensors of max|ours − ref| / max|ref| (a norm-wise relative error)."""
    worst = 0.0
    for name, r in ref.items():
        o = ours[name].to(r.dtype)
        scale = float(r.abs().max())
        worst = max(worst, float((o - r).abs().max()) / (scale if scale > 0 else 1.0))
    return worst


# ----------------------------------------------------------------------------- main loop
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_setting(model_kind: str, loss_kind: str, args) -> dict:
    model, loss_fn, x, t = make_setting(model_kind, loss_kind, args.n_samples)
    n_params = sum(p.numel() for p in model.parameters())
    load0 = os.getloadavg()[0]
    base = grad_pass(model, loss_fn, x, t)
    for _ in range(3):
        base()
    rows: dict[str, dict] = {}
    results: dict[str, dict[str, Tensor]] = {}
    base_all: list[float] = []
    for cand in candidates(args.hutchinson_samples):
        if args.estimators and cand.key not in args.estimators:
            continue
        cand.factory(model, loss_fn, x[:WARMUP_SAMPLES], t[:WARMUP_SAMPLES])()  # lazy init
        run = cand.factory(model, loss_fn, x, t)
        log(f"[{model_kind}/{loss_kind}] timing {cand.label} ...")
        calls = 1
        if args.cand_calls == "match" and measure(run) < FAST_S:
            calls = BASE_CALLS
        paired = compare(
            base,
            run,
            args.repeats,
            base_number=BASE_CALLS,
            cand_number=calls,
            slow_s=SLOW_S,
            slow_repeats=args.slow_repeats,
            warmup=True,
        )
        base_all += paired.base
        results[cand.key] = run.last
        q1, q3 = paired.ratio_iqr
        rows[cand.key] = {
            "label": cand.label,
            "peer": cand.peer,
            "ms": paired.cand_s * 1e3,
            "ratio": paired.ratio,
            "ratio_q1": q1,
            "ratio_q3": q3,
            "rounds": paired.rounds,
            "calls": calls,
            "base_ms": paired.base_s * 1e3,
            "raw_base_s": paired.base,
            "raw_cand_s": paired.cand,
            "contention": paired.contention,
            "retried": paired.retried,
        }
        log(
            f"    {paired.cand_s * 1e3:.1f} ms, {paired.ratio:.2f}x grad ({paired.rounds} rounds, "
            f"{paired.retried} retried)"
        )
    load1 = os.getloadavg()[0]

    # correctness and normalisation cross-checks
    problem = Problem(model, loss_fn, (x, t))
    with torch.no_grad():
        direct = float(loss_fn(model(x), t))
    checks = {"objective_optbrain": problem.objective(), "objective_loss_fn": direct}
    if "ggn" in results and "bp_ggn_exact" in results:
        checks["ggn_vs_DiagGGNExact"] = max_rel_diff(results["ggn"], results["bp_ggn_exact"])
    if "hessian" in results and "bp_hessian" in results:
        checks["hessian_vs_DiagHessian"] = max_rel_diff(results["hessian"], results["bp_hessian"])

    memory: dict[str, dict] = {}
    if not args.no_memory:
        code = source_fingerprint()
        for key in ["grad", *rows]:
            log(f"[{model_kind}/{loss_kind}] peak memory of {key} (subprocess) ...")
            memory[key] = measure_memory(key, model_kind, loss_kind, args)
            if memory[key].get("code", code) != code:
                memory[key]["changed"] = True  # the sources changed since the timings
                log("    warning: optbrain's curvature sources changed since the timings")
    return {
        "model": model_kind,
        "model_label": MODELS[model_kind][0],
        "loss": loss_kind,
        "n_samples": int(x.shape[0]),
        "n_params": n_params,
        "grad_ms": sorted(base_all)[len(base_all) // 2] * 1e3,
        "rows": rows,
        "memory": memory,
        "checks": checks,
        "loadavg_1min": [load0, load1],
    }


TARGETS = (
    ("LeCunDiagonal() time / gradient pass", "lecun_gn", None, 1.0),
    ("GGNDiagonal() time / BackPACK DiagGGNExact time", "ggn", "bp_ggn_exact", 0.5),
    ("ExactHessianDiagonal() time / BackPACK DiagHessian time", "hessian", "bp_hessian", 1.0),
)


def targets(res: dict) -> list[tuple[str, str, float | None, float]]:
    """(description, verdict, value, limit) for the three targets of issue #2."""
    rows = res["rows"]
    verdicts = []
    for desc, key, ref, limit in TARGETS:
        if key not in rows or (ref is not None and ref not in rows):
            why = "BackPACK not installed" if ref is not None and not HAVE_BACKPACK else "not run"
            verdicts.append((desc, f"n/a ({why})", None, limit))
            continue
        value = rows[key]["ratio"] / (1.0 if ref is None else rows[ref]["ratio"])
        verdicts.append((desc, "MET" if value <= limit else "NOT MET", value, limit))
    return verdicts


def render(res: dict, hutchinson_samples: int) -> str:
    mem = res["memory"]
    lines = [
        f"### {res['model_label']}, {res['loss'].upper()} "
        f"({res['n_params']:,} parameters, N = {res['n_samples']})",
        "",
        f"Gradient pass (forward+backward): {res['grad_ms']:.1f} ms median, "
        f"peak {fmt_mem(mem.get('grad'))} MB. Load average (1 min) "
        f"{res['loadavg_1min'][0]:.1f} → {res['loadavg_1min'][1]:.1f} during the timings.",
        "",
        "| estimator | ms | × grad pass [IQR] | rounds | peak MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, r in res["rows"].items():
        lines.append(
            f"| {r['label']} | {r['ms']:.1f} | {r['ratio']:.2f} "
            f"[{r['ratio_q1']:.2f}–{r['ratio_q3']:.2f}] | {r['rounds']} | "
            f"{fmt_mem(mem.get(key)) if mem else '—'} |"
        )
        if key == "hutchinson":
            lines.append(
                f"| ↳ per probe (÷{hutchinson_samples}) | {r['ms'] / hutchinson_samples:.1f} | "
                f"{r['ratio'] / hutchinson_samples:.2f} | | |"
            )
    conts = [x for r in res["rows"].values() for x in r["contention"] if x is not None]
    retried = sum(r["retried"] for r in res["rows"].values())
    c = res["checks"]
    if any(m.get("changed") for m in mem.values()):
        lines += ["", "(†) measured after optbrain's curvature sources changed: not comparable."]
    lines += [
        "",
        f"Rounds discarded for CPU contention: {retried}; run-queue wait / wall time of the kept "
        f"rounds: median {statistics.median(conts) if conts else float('nan'):.3f}, max "
        f"{max(conts) if conts else float('nan'):.3f} (threads summed; > 0.1 means contended).",
        f"Objective: optbrain E = {c['objective_optbrain']:.8f}, loss_fn(model(X), Y) = "
        f"{c['objective_loss_fn']:.8f} (|Δ| = "
        f"{abs(c['objective_optbrain'] - c['objective_loss_fn']):.1e}): same normalisation.",
    ]
    pairs = [
        ("GGNDiagonal vs DiagGGNExact", "ggn_vs_DiagGGNExact"),
        ("ExactHessianDiagonal vs DiagHessian", "hessian_vs_DiagHessian"),
    ]
    shown = [f"{label} {c[key]:.1e}" for label, key in pairs if key in c]
    if shown:
        lines.append(
            "Cross-check against BackPACK (max over tensors of max|Δ|/max|ref|, float32): "
            + "; ".join(shown)
            + "."
        )
    lines.append("")
    for desc, verdict, value, limit in targets(res):
        shown = "—" if value is None else f"{value:.2f}"
        lines.append(f"- TARGET {desc} = {shown} (≤ {limit:g}): **{verdict}**")
    return "\n".join(lines)


def source_fingerprint() -> str:
    """Git commit (+ "dirty") and a hash of the curvature sources actually imported."""
    import hashlib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head = "no git"
    digest = hashlib.sha256()
    folder = os.path.dirname(oc.__file__)
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return f"git {head}, optbrain/curvature/*.py sha256 {digest.hexdigest()[:12]}"


def machine_facts(args) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    bp = importlib.metadata.version("backpack-for-pytorch") if HAVE_BACKPACK else "not installed"
    return (
        f"Machine: {cpu}, nproc = {os.cpu_count()}, Python {platform.python_version()}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"backpack-for-pytorch {bp}; code: {source_fingerprint()}. "
        f"Repeats {args.repeats} (slow candidates, > {SLOW_S:g} s: "
        f"{args.slow_repeats}); ratios are medians of per-round ratios vs a gradient pass timed "
        f"in the same round (median of {BASE_CALLS} calls), order alternating; estimators are "
        f"timed "
        + (
            f"as the median of {BASE_CALLS} calls when faster than {FAST_S:g} s, else by one call"
            if args.cand_calls == "match"
            else "by one call (--cand-calls 1)"
        )
        + f"; each round first waits until "
        f"other processes use < 25% of the CPUs (waiting at most 30 s), and is redone (at most "
        f"`repeats` times per estimator) when its threads waited for a CPU more than 10% of its "
        f"wall time. "
        f"{MEMORY_METHOD}."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 7)")
    p.add_argument(
        "--slow-repeats",
        type=int,
        default=None,
        help=f"rounds for candidates slower than {SLOW_S:g} s (default 3)",
    )
    p.add_argument("--loss", choices=["ce", "mse", "both"], default="both")
    p.add_argument("--model", choices=["mlp", "cnn", "both"], default="both")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 rounds (1 for slow candidates) on 256 samples",
    )
    p.add_argument("--n-samples", type=int, default=None, help="use the first N digits only")
    p.add_argument("--hutchinson-samples", type=int, default=10, help="probe vectors (default 10)")
    p.add_argument(
        "--estimators",
        default=None,
        help="comma-separated subset of: " + ", ".join(c.key for c in candidates(10)),
    )
    p.add_argument(
        "--cand-calls",
        choices=["match", "1"],
        default="match",
        help=f"estimators faster than {FAST_S:g} s are timed like the gradient pass, as the median "
        f"of {BASE_CALLS} consecutive calls (match, default), or by one call (1)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the results as JSON")
    p.add_argument("--only", default=None, help="internal: measure peak memory of one candidate")
    args = p.parse_args(argv)
    args.estimators = set(args.estimators.split(",")) if args.estimators else None
    if args.quick:
        args.repeats = args.repeats or 2
        args.slow_repeats = args.slow_repeats or 1
        args.n_samples = args.n_samples or 256
    args.repeats = args.repeats or 7
    args.slow_repeats = args.slow_repeats or 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.only is not None:
        if args.model == "both" or args.loss == "both":
            raise SystemExit("--only needs one --model and one --loss")
        print(json.dumps(measure_memory_here(args.only, args.model, args.loss, args)))
        return 0
    models = ["mlp", "cnn"] if args.model == "both" else [args.model]
    loss_kinds = ["ce", "mse"] if args.loss == "both" else [args.loss]
    t0 = time.perf_counter()
    facts = machine_facts(args)
    print(facts + "\n", flush=True)
    all_results = []
    for m in models:
        for lk in loss_kinds:
            res = bench_setting(m, lk, args)
            all_results.append(res)
            print(render(res, args.hutchinson_samples) + "\n", flush=True)
    print("## Targets (issue #2)\n")
    for res in all_results:
        for desc, verdict, value, limit in targets(res):
            shown = "—" if value is None else f"{value:.2f}"
            print(f"- {res['model']}/{res['loss']}: {desc} = {shown} (≤ {limit:g}): {verdict}")
    print(f"\nTotal benchmark time {time.perf_counter() - t0:.0f} s.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"facts": facts, "argv": sys.argv, "results": all_results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
