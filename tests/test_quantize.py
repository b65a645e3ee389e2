"""Matrix-level quantisation math: grids, RTN, GPTQ against a slow transcription of Algorithm 1,
OBQ against a brute-force greedy, packing."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from optbrain.pruners.layerwise import exact_obs
from optbrain.quantize import QuantSpec, fit_grid, gptq, obq, quantize_codes, rtn
from optbrain.quantize.packing import pack, packed_bytes, unpack

D = torch.float64


def problem(rows: int, k: int, n: int = 64, seed: int = 0, dead: int | None = None):
    """Random weights and H = 2XXᵀ/n of correlated inputs (column ``dead`` always 0)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k, dtype=D) + 0.5 * torch.randn(k, k, generator=g, dtype=D)
    X = torch.randn(n, k, generator=g, dtype=D) @ mix
    if dead is not None:
        X[:, dead] = 0.0
    W = torch.randn(rows, k, generator=g, dtype=D)
    return W, 2.0 * X.T @ X / n, X


# ------------------------------------------------------------------------- reference grid
def ref_grid(x: torch.Tensor, bits: int, sym: bool):
    """Min–max grid of each row, written from the formula row by row (PAPERS.md §14.5)."""
    maxq = 2**bits - 1
    scales, zeros = [], []
    for row in x.tolist():
        lo, hi = min(min(row), 0.0), max(max(row), 0.0)
        if sym:
            hi = max(hi, -lo)
            lo = -hi
        if lo == 0.0 and hi == 0.0:
            lo, hi = -1.0, 1.0
        s = (hi - lo) / maxq
        scales.append(s)
        zeros.append((maxq + 1) / 2 if sym else float(round(-lo / s)))
    return torch.tensor(scales, dtype=x.dtype), torch.tensor(zeros, dtype=x.dtype)


def ref_quant(w, s, z, maxq):
    c = torch.clamp(torch.round(w / s) + z, 0, maxq)
    return c, (c - z) * s


# ------------------------------------------------------------------------- GPTQ reference
def gptq_reference(W, H, spec: QuantSpec, damping: float = 0.01):
    """GPTQ, Algorithm 1 without its lazy blocks: one column at a time, every later column
    updated at once, U = cholesky(inv(H + λI)) formed explicitly; float64."""
    W, H = W.clone().to(D), H.clone().to(D)
    rows, k = W.shape
    maxq = spec.maxq
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    g = spec.group_size or k
    n_groups = math.ceil(k / g)
    static = [ref_grid(W[:, i * g : (i + 1) * g], spec.bits, spec.sym) for i in range(n_groups)]
    perm = torch.arange(k)
    if spec.act_order:
        perm = torch.sort(H.diagonal(), descending=True, stable=True).indices
        W, H = W[:, perm], H[perm][:, perm]
    H = H + damping * H.diagonal().mean() * torch.eye(k, dtype=D)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    codes = torch.zeros(rows, k, dtype=D)
    s, z = static[0]
    for j in range(k):
        if spec.group_size is not None and spec.static_groups:
            s, z = static[int(perm[j]) // g]
        elif spec.group_size is not None and j % g == 0:
            s, z = ref_grid(W[:, j : j + g], spec.bits, spec.sym)
        c, q = ref_quant(W[:, j], s, z, maxq)
        e = (W[:, j] - q) / U[j, j]
        W[:, j:] -= e[:, None] * U[j, j:][None, :]
        codes[:, j] = c
    inv = torch.argsort(perm)
    return codes[:, inv]


SPECS = [
    QuantSpec(4),
    QuantSpec(3, sym=True),
    QuantSpec(2),
    QuantSpec(8),
    QuantSpec(4, group_size=4),
    QuantSpec(3, group_size=5),  # does not divide 12: the last group has 2 columns
    QuantSpec(4, act_order=True),
    QuantSpec(3, group_size=4, act_order=True),
    QuantSpec(3, group_size=5, act_order=True, static_groups=True),
    QuantSpec(4, group_size=4, static_groups=True, sym=True),
]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("blocksize", [128, 3, 5])
def test_gptq_equals_slow_algorithm_1(spec, blocksize):
    W, H, _ = problem(7, 12, dead=2)
    q = gptq(W, H, spec, blocksize=blocksize)
    ref = gptq_reference(W, H, spec)
    assert torch.equal(q.codes.to(D), ref)
    # the weights are the grid values of those codes
    s, z = q.scale[:, q.g_idx], q.zero[:, q.g_idx].to(D)
    assert torch.equal(q.weight(D), (q.codes.to(D) - z) * s)
    assert (q.weight(D)[:, 2] == 0).all()  # the dead input's weights are 0


def test_gptq_with_diagonal_hessian_is_rtn():
    """Without correlations there is nothing to compensate: GPTQ rounds to nearest."""
    W, _, _ = problem(5, 16, seed=3)
    H = torch.diag(torch.rand(16, dtype=D) + 0.5)
    for spec in (QuantSpec(3), QuantSpec(4, group_size=4, static_groups=True)):
        assert torch.equal(gptq(W, H, spec).codes, rtn(W, spec).codes)


def test_gptq_error_below_rtn_on_correlated_inputs():
    W, H, X = problem(32, 48, n=256, seed=1)
    for bits in (3, 4):
        spec = QuantSpec(bits)
        err = {
            name: float(((W - q.weight(D)) @ X.T).square().sum())
            for name, q in (("gptq", gptq(W, H, spec)), ("rtn", rtn(W, spec)))
        }
        assert err["gptq"] < 0.8 * err["rtn"], err


def test_gptq_kept_entries_stay_zero_and_compensate():
    """Joint mode: entries outside ``kept`` become exactly 0 (code = zero) and the rounding
    error moves to later columns — less error than rounding the survivors alone. After the exact
    OBS re-fit P, [H(W − P)]_kept = 0, so the errors of pruning and quantising add up."""
    W, H, X = problem(16, 24, n=200, seed=4)
    pruned = exact_obs(W, H, W.numel() // 2, damping=0.0)
    P = pruned.weight
    q = gptq(P, H, QuantSpec(4), kept=pruned.kept)
    Wq = q.weight(D)
    assert (Wq[~pruned.kept] == 0).all()
    assert torch.equal(q.codes[~pruned.kept], q.zero[:, q.g_idx][~pruned.kept])
    plain = rtn(P, QuantSpec(4)).weight(D) * pruned.kept

    def err(V, R=W):
        return float(((R - V) @ X.T).square().sum())

    assert err(Wq, P) < 0.95 * err(plain, P)
    assert err(Wq) == pytest.approx(err(P) + err(Wq, P), rel=1e-9)


# ------------------------------------------------------------------------- OBQ brute force
def constrained_fit(w0, H, fixed: dict[int, float]):
    """argmin ½(w − w0)ᵀH(w − w0) with w_j = fixed[j]: solved directly; (w, cost)."""
    k = len(w0)
    C = sorted(fixed)
    F = [j for j in range(k) if j not in fixed]
    d = torch.zeros(k, dtype=D)
    d[C] = torch.tensor([fixed[j] for j in C], dtype=D) - w0[C]
    if F:
        d[F] = -torch.linalg.solve(H[F][:, F], H[F][:, C] @ d[C])
    return w0 + d, float(0.5 * d @ H @ d)


def obq_bruteforce(w0, H, s, z, maxq, outliers, forced=(), fired=None):
    """OBQ's greedy rule with every candidate's constrained least squares solved from scratch
    (``fired``: a list that gets one entry per step decided by the outlier rule)."""
    fixed = {int(j): 0.0 for j in forced}
    w, _ = constrained_fit(w0, H, fixed)
    codes = {int(j): float(z[j]) for j in forced}
    while len(fixed) < len(w0):
        c, q = ref_quant(w, s, z, maxq)
        free = [j for j in range(len(w0)) if j not in fixed]
        err = {j: float((w[j] - q[j]) ** 2) for j in free}
        if outliers and any(err[j] > 0.25 * float(s[j]) ** 2 for j in free):
            j = max(free, key=lambda i: err[i])
            if fired is not None:
                fired.append(j)
        else:
            j = min(free, key=lambda i: constrained_fit(w0, H, {**fixed, i: float(q[i])})[1])
        fixed[j], codes[j] = float(q[j]), float(c[j])
        w, _ = constrained_fit(w0, H, fixed)
    return torch.tensor([codes[j] for j in range(len(w0))], dtype=D)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("outliers", [False, True])
def test_obq_equals_brute_force_greedy(k, bits, outliers):
    for seed in range(4):
        W, H, _ = problem(5, k, n=8, seed=10 * k + seed)
        spec = QuantSpec(bits)
        q = obq(W, H, spec, damping=0.0, outliers=outliers)
        maxq = spec.maxq
        for r in range(W.shape[0]):
            s, z = ref_grid(W[r : r + 1], bits, False)
            ref = obq_bruteforce(W[r], H, s.expand(k), z.expand(k), maxq, outliers)
            assert torch.equal(q.codes[r].to(D), ref), (seed, r)


def test_obq_outlier_rule_equals_brute_force_where_it_fires():
    """At 2 bits the compensation pushes some weights outside their grid; OBQ then quantises the
    one with the largest error first (the authors' rule) — and that changes the result."""
    fired: list[int] = []
    differs = 0
    for seed in range(40):
        W, H, _ = problem(5, 4, n=8, seed=40 + seed)
        q = obq(W, H, QuantSpec(2), damping=0.0, outliers=True)
        plain = obq(W, H, QuantSpec(2), damping=0.0, outliers=False)
        differs += int(not torch.equal(q.codes, plain.codes))
        for r in range(5):
            s, z = ref_grid(W[r : r + 1], 2, False)
            ref = obq_bruteforce(W[r], H, s.expand(4), z.expand(4), 3, True, fired=fired)
            assert torch.equal(q.codes[r].to(D), ref), (seed, r)
    assert len(fired) >= 10 and differs >= 1


def test_obq_with_pruned_entries_equals_brute_force():
    k = 4
    W, H, _ = problem(6, k, n=10, seed=7)
    kept = torch.rand(6, k, generator=torch.Generator().manual_seed(0)) > 0.4
    W = W * kept
    q = obq(W, H, QuantSpec(3), damping=0.0, kept=kept)
    for r in range(6):
        s, z = ref_grid(W[r : r + 1], 3, False)
        forced = torch.nonzero(~kept[r]).reshape(-1).tolist()
        ref = obq_bruteforce(W[r], H, s.expand(k), z.expand(k), 7, True, forced)
        assert torch.equal(q.codes[r].to(D), ref), r
    assert (q.weight(D)[~kept] == 0).all()


def test_obq_beats_gptq_and_rtn_on_a_small_layer():
    W, H, X = problem(16, 12, n=100, seed=5)
    spec = QuantSpec(3)
    err = {
        name: float(((W - f().weight(D)) @ X.T).square().sum())
        for name, f in (
            ("obq", lambda: obq(W, H, spec)),
            ("gptq", lambda: gptq(W, H, spec)),
            ("rtn", lambda: rtn(W, spec)),
        )
    }
    assert err["obq"] <= err["gptq"] < err["rtn"], err


# ------------------------------------------------------------------------- grids
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_grid_formula_and_zero_is_on_the_grid(bits, sym):
    x = torch.randn(9, 7, dtype=D, generator=torch.Generator().manual_seed(bits))
    x[0] = 0.0  # a row of zeros
    x[1] = x[1].abs()  # no negative entries
    s, z = fit_grid(x, bits, sym)
    rs, rz = ref_grid(x, bits, sym)
    assert torch.allclose(s, rs, rtol=1e-15) and torch.equal(z, rz)
    maxq = 2**bits - 1
    assert ((z >= 0) & (z <= maxq) & (z == z.round())).all()
    c = quantize_codes(torch.zeros(9, 1, dtype=D), s[:, None], z[:, None], maxq)
    assert ((c - z[:, None]) * s[:, None] == 0).all()  # 0 quantises to exactly 0
    # the extremes of each row lie within half a step of the grid
    c = quantize_codes(x, s[:, None], z[:, None], maxq)
    q = (c - z[:, None]) * s[:, None]
    tol = s[:, None] / 2 + 1e-12
    if not sym:
        assert ((x - q).abs() <= tol).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 1}, "bits"),
        ({"bits": 9}, "bits"),
        ({"bits": 4.0}, "bits"),
        ({"bits": True}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": -4}, "group_size"),
        ({"group_size": 2.5}, "group_size"),
    ],
)
def test_spec_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)
    with pytest.raises(TypeError, match="act_order"):
        QuantSpec(act_order=1)


def test_rtn_groups_when_the_size_does_not_divide():
    W = torch.randn(3, 10, dtype=D)
    q = rtn(W, QuantSpec(3, group_size=4))
    assert q.scale.shape == (3, 3) and q.g_idx.tolist() == [0] * 4 + [1] * 4 + [2] * 2
    for i, cols in enumerate((slice(0, 4), slice(4, 8), slice(8, 10))):
        s, z = ref_grid(W[:, cols], 3, False)
        assert torch.allclose(q.scale[:, i], s) and torch.equal(q.zero[:, i].to(D), z)


# ------------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 100])
def test_pack_round_trip_and_size(bits, n):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(n))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(n, bits)
    assert torch.equal(unpack(packed, bits, n), codes.to(torch.uint8))


def test_pack_bit_layout_is_little_endian():
    assert pack(torch.tensor([1, 2]), 4).tolist() == [0x21]
    assert pack(torch.tensor([5, 3, 1]), 3).tolist() == [0b01011101, 0b0]  # 101,110,100 LSB first


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="fewer"):
        unpack(torch.zeros(1, dtype=torch.uint8), 4, 3)


def test_all_bit_widths_run_through_gptq_and_obq():
    W, H, _ = problem(4, 6, seed=2)
    for bits, method in itertools.product(range(2, 9), (gptq, obq)):
        q = method(W, H, QuantSpec(bits))
        assert int(q.codes.max()) <= 2**bits - 1
