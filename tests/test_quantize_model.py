"""Model-level quantisation: layers anywhere, grids of the written weights, sequential
calibration, skipped layers, bad input, restore on failure, export and reload, the CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from optbrain import cli
from optbrain.curvature.calibration import calibration_hessians
from optbrain.errors import CalibrationError
from optbrain.models.transformer import CharTransformer, TransformerConfig
from optbrain.quantize import (
    GPTQ,
    OBQ,
    RTN,
    Joint,
    QuantizationError,
    QuantLinear,
    QuantSpec,
    gptq,
    load_quantized,
    save_quantized,
)
from optbrain.quantize.calibrate import find_blocks, plan_stages, stage_hessians

FIXTURE = Path(__file__).with_name("fixtures_task.py")


def transformer(seed: int = 0) -> CharTransformer:
    return CharTransformer(
        TransformerConfig(vocab=20, context=12, width=16, layers=2, heads=2), seed
    )


def token_batches(n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 20, (8, 12), generator=g) for _ in range(n)]


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1 = nn.Conv1d(4, 6, 3, padding=1, padding_mode="reflect")
        self.c2 = nn.Conv2d(6, 8, (3, 2), stride=(1, 2), groups=2)
        self.fc = nn.Linear(8 * 3 * 2, 5)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5

    def forward(self, x):  # x: N × 4 × 20
        h = torch.tanh(self.c1(x))  # N × 6 × 20
        h = torch.tanh(self.c2(h.reshape(h.shape[0], 6, 5, 4)))  # N × 8 × 3 × 2
        return self.fc(h.flatten(1))


def conv_batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 4, 20, generator=g) for _ in range(3)]


def on_grid(weight: torch.Tensor, layer_report) -> None:
    """Every entry of each row is (code − zero)·scale of its grid; at most 2^bits distinct
    values per row and grid."""
    q = layer_report.quantized
    from optbrain.curvature.calibration import weight_matrix

    bits = layer_report.bits
    W = weight_matrix(layer_report.module_for_test, weight.detach()).double()
    G, rows, k = W.shape
    for g in range(G):
        idx = q.g_idx[g]
        s = q.scale[g][:, idx].double()
        z = q.zero[g][:, idx].double()
        codes = W[g] / s + z
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert codes.round().min() >= 0 and codes.round().max() <= 2**bits - 1
        for grid in idx.unique():
            cols = idx == grid
            for r in range(rows):
                assert W[g][r, cols].unique().numel() <= 2**bits


METHODS = [
    RTN(4),
    RTN(3, group_size=5, sym=True),
    GPTQ(4),
    GPTQ(3, group_size=4, act_order=True),
    GPTQ(3, group_size=6, act_order=True, static_groups=True),
    GPTQ(2, sym=True, sequential="layer"),
    OBQ(3),
    Joint(4, sparsity=0.5),
    Joint(3, nm=(2, 4), prune="blocked", quantizer="obq"),
]


@pytest.mark.parametrize("quantizer", METHODS, ids=repr)
def test_transformer_weights_land_on_their_grids(quantizer):
    model = transformer()
    report = quantizer.apply(model, token_batches())
    modules = dict(model.named_modules())
    linears = [p for p, m in modules.items() if isinstance(m, nn.Linear)]
    assert list(report.layers) == linears  # every projection, head included, in module order
    for path, rep in report.layers.items():
        rep.module_for_test = modules[path]
        on_grid(modules[path].weight, rep)
        assert rep.bits == quantizer.bits and rep.calibration_rows == 4 * 8 * 12
        assert rep.error >= 0 and rep.error_rtn >= 0
    if isinstance(quantizer, Joint):
        for path, rep in report.layers.items():
            w = modules[path].weight
            assert rep.sparsity == pytest.approx(0.5, abs=1e-9)
            assert float((w == 0).float().mean()) >= 0.5


def test_gptq_reduces_the_reconstruction_error_of_rtn_layer_by_layer():
    model = transformer()
    report = GPTQ(3).apply(model, token_batches(8))
    errs = [(r.error, r.error_rtn) for r in report.layers.values()]
    assert sum(e for e, _ in errs) < 0.8 * sum(r for _, r in errs)


def test_group_size_that_does_not_divide_the_columns_leaves_a_smaller_last_group():
    model = transformer()
    report = GPTQ(4, group_size=5).apply(model, token_batches())
    rep = report.layers["blocks.0.fc2"]  # 64 columns: 12 groups of 5 and one of 4
    assert (rep.columns, rep.groups, rep.last_group) == (64, 13, 4)
    assert rep.quantized.scale.shape == (1, 16, 13)
    assert rep.quantized.g_idx[0].bincount().tolist() == [5] * 12 + [4]


def test_conv_layers_groups_and_padding_modes():
    model = ConvNet()
    ref = copy.deepcopy(model)
    report = GPTQ(4, act_order=True).apply(model, conv_batches())
    assert list(report.layers) == ["c1", "c2", "fc"]
    assert report.layers["c2"].rows == 8 and report.layers["c2"].columns == 3 * 3 * 2
    assert report.layers["c2"].quantized.codes.shape == (2, 4, 18)  # two conv groups
    modules = dict(model.named_modules())
    for path, rep in report.layers.items():
        rep.module_for_test = modules[path]
        on_grid(modules[path].weight, rep)
    # the first layer's H is the one of the float model (nothing before it)
    h = calibration_hessians(ref, conv_batches(), ["c1"])["c1"]
    W = ref.c1.weight.detach().reshape(6, -1)
    q = gptq(W, h.H[0].float(), QuantSpec(4, act_order=True))
    assert torch.equal(q.weight(torch.float32).reshape(model.c1.weight.shape), model.c1.weight)


def test_block_calibration_sees_the_quantised_earlier_blocks():
    model, ref = transformer(), transformer()
    batches = token_batches()
    GPTQ(4).apply(model, batches)
    # quantise block 0 alone, then the Hessians of block 1 come from that model
    GPTQ(4, layers=["blocks.0.*"]).apply(ref, batches)
    for name in ("blocks.0.fc1", "blocks.0.attn.q_proj"):
        assert torch.equal(model.get_submodule(name).weight, ref.get_submodule(name).weight)
    hs = calibration_hessians(ref, batches, ["blocks.1.fc1"])
    W = transformer().blocks[1].fc1.weight.detach()
    q = gptq(W, hs["blocks.1.fc1"].H[0].float(), QuantSpec(4))
    assert torch.equal(q.weight(torch.float32), model.blocks[1].fc1.weight)
    # within a block, every layer sees the block's input from the float weights of the block
    hs0 = calibration_hessians(transformer(), batches, ["blocks.0.fc1"])
    q0 = gptq(
        transformer().blocks[0].fc1.weight.detach(), hs0["blocks.0.fc1"].H[0].float(), QuantSpec(4)
    )
    assert torch.equal(q0.weight(torch.float32), model.blocks[0].fc1.weight)


def test_stages_blocks_and_early_stop():
    model = transformer()
    layers = {p: m for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert find_blocks(model, layers) == ["blocks.0", "blocks.1"]
    stages = plan_stages(model, layers, "block")
    assert [s.path for s in stages] == ["blocks.0", "blocks.1", "head"]
    assert [len(s.layers) for s in stages] == [6, 6, 1]
    assert len(plan_stages(model, layers, "layer")) == 13
    assert len(plan_stages(model, layers, "none")) == 1
    calls = []
    handle = model.ln_f.register_forward_hook(lambda *a: calls.append(1))
    hs = stage_hessians(model, token_batches(), stages[0])
    handle.remove()
    assert len(calls) == 1  # only the first batch ran past block 0
    full = calibration_hessians(model, token_batches(), list(stages[0].layers))
    for p in stages[0].layers:
        assert torch.equal(hs[p].H, full[p].H)


def test_sequential_none_uses_the_float_model_for_every_hessian():
    model, ref, seq = transformer(), transformer(), transformer()
    batches = token_batches()
    GPTQ(2, sequential="none").apply(model, batches)
    GPTQ(2, sequential="block").apply(seq, batches)
    hs = calibration_hessians(ref, batches, ["blocks.1.fc2"])
    q = gptq(ref.blocks[1].fc2.weight.detach(), hs["blocks.1.fc2"].H[0].float(), QuantSpec(2))
    assert torch.equal(q.weight(torch.float32), model.blocks[1].fc2.weight)
    assert not torch.equal(seq.blocks[1].fc2.weight, model.blocks[1].fc2.weight)


# ------------------------------------------------------------------------- skipped layers
class WithMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.proj = nn.Linear(8, 8)
        self.out = nn.Linear(8, 10)
        self.out.weight = self.emb.weight  # tied, as GPT-2's head

    def forward(self, x):
        h = self.emb(x)
        h = self.mha(h, h, h, need_weights=False)[0]
        return self.out(torch.tanh(self.proj(h)))


def test_multihead_attention_and_tied_weights_are_named_as_skipped():
    model = WithMHA()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = GPTQ(4).apply(model, [torch.randint(0, 10, (4, 6))])
    assert list(report.layers) == ["proj"]
    assert "nn.MultiheadAttention" in report.skipped["mha"]
    assert report.skipped["out"] == "weight tied to emb.weight"
    assert torch.equal(model.mha.in_proj_weight, before["mha.in_proj_weight"])
    assert torch.equal(model.emb.weight, before["emb.weight"])
    assert "skipped" in report.table()


# ------------------------------------------------------------------------- bad input
def test_bad_options():
    for kwargs, exc, match in [
        ({"bits": 9}, ValueError, "bits"),
        ({"bits": 1}, ValueError, "bits"),
        ({"group_size": 0}, ValueError, "group_size"),
        ({"damping": -0.1}, ValueError, "damping"),
        ({"damping": float("nan")}, ValueError, "damping"),
        ({"sequential": "rows"}, ValueError, "sequential"),
        ({"dtype": torch.float16}, ValueError, "dtype"),
        ({"layers": "head"}, TypeError, "layers"),
        ({"blocksize": 0}, ValueError, "blocksize"),
    ]:
        with pytest.raises(exc, match=match):
            GPTQ(**kwargs)
    with pytest.raises(ValueError, match="sparsity"):
        Joint(4, sparsity=1.5)
    with pytest.raises(ValueError, match="nm"):
        Joint(4, nm=(4, 2))


def _unchanged(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_input_is_named_and_leaves_the_model_alone():
    model = transformer()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(QuantizationError, match="needs calibration data"):
        GPTQ(4).apply(model)
    with pytest.raises(ValueError, match=r"\['nope'\] match no quantisable layer"):
        GPTQ(4, layers=["nope"]).apply(model, token_batches())
    with pytest.raises(TypeError, match="calibration must be"):
        GPTQ(4).apply(model, "text")
    with pytest.raises(QuantizationError, match="no layer to quantise"):
        GPTQ(4).apply(nn.Sequential(nn.Tanh()), torch.zeros(2, 3))
    with torch.no_grad():
        model.blocks[1].fc2.weight[0, 0] = float("nan")
    with pytest.raises(QuantizationError, match="'blocks.1.fc2' has NaN"):
        GPTQ(4).apply(model, token_batches())
    with torch.no_grad():
        model.blocks[1].fc2.weight[0, 0] = before["blocks.1.fc2.weight"][0, 0]
    assert _unchanged(model, before)


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.never = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_a_layer_no_calibration_reaches_is_named_and_everything_restored():
    model = Unused()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CalibrationError, match="no calibration input reached layer 'never'"):
        GPTQ(4, sequential="layer").apply(model, torch.randn(16, 4))
    assert _unchanged(model, before)  # a and b had been quantised: restored


def test_non_finite_calibration_and_interrupts_restore_the_model():
    model = transformer()
    before = copy.deepcopy(model.state_dict())
    bad = Unused()
    with pytest.raises(CalibrationError, match="NaN or infinite"):
        GPTQ(4).apply(bad, torch.tensor([[1.0, float("inf"), 0.0, 1.0]]))

    def stop(done, total):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        GPTQ(4, progress=stop).apply(model, token_batches())
    assert _unchanged(model, before)


# ------------------------------------------------------------------------- export
@pytest.mark.parametrize(
    "quantizer",
    [GPTQ(4), GPTQ(3, group_size=5, act_order=True), RTN(2, sym=True), Joint(4)],
    ids=repr,
)
def test_exported_transformer_reloads_to_identical_outputs(quantizer, tmp_path):
    model = transformer()
    report = quantizer.apply(model, token_batches())
    info = save_quantized(model, report, tmp_path / "q.pt")
    assert info.bytes == (tmp_path / "q.pt").stat().st_size > 0
    assert info.quantized_weights == sum(
        model.get_submodule(p).weight.numel() for p in report.layers
    )
    fresh = load_quantized(transformer(seed=5), tmp_path / "q.pt")
    assert isinstance(fresh.blocks[0].attn.q_proj, QuantLinear)
    x = torch.randint(0, 20, (3, 12))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    payload = torch.load(tmp_path / "q.pt", weights_only=True)
    assert "blocks.0.fc1.weight" not in payload["state"]
    assert payload["state"]["blocks.0.fc1.qweight"].dtype == torch.uint8
    assert payload["state"]["blocks.0.fc1.qweight"].numel() == -(-64 * 16 * quantizer.bits // 8)


def test_exported_conv_net_reloads_to_identical_outputs(tmp_path):
    model = ConvNet()
    report = GPTQ(3, group_size=4).apply(model, conv_batches())
    save_quantized(model, report, tmp_path / "c.pt")
    fresh = load_quantized(ConvNet(), tmp_path / "c.pt")
    x = conv_batches()[0]
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
        assert torch.equal(fresh.c2.weight, model.c2.weight)


def test_export_refuses_to_overwrite_and_bad_files(tmp_path):
    model = transformer()
    report = GPTQ(4).apply(model, token_batches())
    path = tmp_path / "q.pt"
    save_quantized(model, report, path)
    with pytest.raises(FileExistsError):
        save_quantized(model, report, path)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    with pytest.raises(ValueError, match="no longer holds"):
        save_quantized(model, report, path, overwrite=True)
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an optbrain quantised-model file"):
        load_quantized(transformer(), tmp_path / "other.pt")
    small = CharTransformer(TransformerConfig(vocab=20, context=12, width=8, layers=2, heads=2))
    with pytest.raises(ValueError, match="weight shape"):
        load_quantized(small, path)


# ------------------------------------------------------------------------- CLI
def test_quantize_command_writes_a_loadable_model(tmp_path, capsys, monkeypatch):
    import fixtures_task

    out = tmp_path / "run"
    args = ["quantize", "--task", f"{FIXTURE}:task", "--bits", "3", "--method", "gptq"]
    code = cli.main([*args, "--group-size", "4", "--act-order", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "| 0 | Linear | 16 × 8 | 3 | 2 |" in text and "bits each" in text
    data = json.loads((out / "report.json").read_text())
    assert data["quantizer"]["act_order"] is True and set(data["report"]["layers"]) == {"0", "2"}
    model = load_quantized(fixtures_task.make_model(), out / "quantized.pt")
    assert isinstance(model[0], QuantLinear) and model[0].bits == 3
    # a second run into the same folder needs --force (as optbrain prune; --overwrite too)
    assert cli.main([*args, "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli.main([*args, "--out", str(out), "--force", "--sparsity", "0.5"]) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["quantizer"]["method"] == "joint"
    assert cli.main([*args, "--out", str(out), "--overwrite"]) == 0
    assert (
        cli.main([*args[:-2], "--method", "rtn", "--sparsity", "0.5", "--out", str(tmp_path / "x")])
        == 2
    )
    assert "needs gptq or obq" in capsys.readouterr().err


def test_hessian_of_float32_inputs_is_summed_in_float64_chunks(monkeypatch):
    """Chunks of CHUNK_ROWS rows are multiplied in float32 and flushed into a float64 sum; the
    result is the float64 definition 2XᵀX/n to float32 rounding of each chunk."""
    import optbrain.curvature.calibration as lw

    monkeypatch.setattr(lw, "CHUNK_ROWS", 7)
    layer = nn.Linear(5, 3)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 5, generator=g) for n in (4, 9, 1, 12)]
    h = calibration_hessians(layer, xs)[""]
    X = torch.cat(xs).double()
    assert h.n == 26 and h.H.dtype == torch.float64
    assert torch.allclose(h.H[0], 2 * X.T @ X / 26, rtol=1e-6, atol=1e-7)
    with pytest.raises(CalibrationError, match="NaN or infinite"):
        calibration_hessians(layer, [torch.full((2, 5), 1e30)])  # squares overflow float32
