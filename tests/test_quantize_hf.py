"""``transformers``' Conv1D (GPT-2's projections, weight stored in × out) in layer-wise OBS and the
quantisers: the same results as on an ``nn.Linear`` twin, and a GPT-2 model built from a config.
Skipped without the ``hf`` extra."""

from __future__ import annotations

import copy
import importlib.util
import sys

import pytest
import torch
from torch import nn

from optbrain.curvature.calibration import calibration_hessians
from optbrain.masking import Mask
from optbrain.problem import Problem
from optbrain.pruners.layerwise import LayerwiseOBS
from optbrain.quantize import GPTQ, OBQ, QuantLinear, load_quantized, save_quantized

if importlib.util.find_spec("transformers") is None:
    pytest.skip("needs the hf extra (transformers)", allow_module_level=True)


@pytest.fixture(scope="module")
def Conv1D():
    """transformers' Conv1D. transformers imports torchvision (for its vision models) whenever
    it is installed, and a torchvision built for another torch raises on import (not
    ImportError), which breaks GPT-2 too; the text models here never need it, so it is hidden
    while transformers is first imported (unless torchvision or transformers is loaded already).
    """
    with pytest.MonkeyPatch.context() as mp:
        if "torchvision" not in sys.modules and "transformers" not in sys.modules:
            mp.setitem(sys.modules, "torchvision", None)
        from transformers import GPT2LMHeadModel  # noqa: F401 - imported while hidden
        from transformers.pytorch_utils import Conv1D

        yield Conv1D


def twins(Conv1D, seed: int = 0):
    """A Conv1D net and its nn.Linear twin (weights transposed)."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Sequential(Conv1D(12, 8), nn.Tanh(), Conv1D(5, 12))
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    lin = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 5))
    with torch.no_grad():
        for i in (0, 2):
            lin[i].weight.copy_(conv[i].weight.t())
            lin[i].bias.copy_(conv[i].bias)
    x = torch.randn(64, 8, generator=g)
    return conv, lin, x


def test_conv1d_hessian_is_that_of_its_linear_twin(Conv1D):
    conv, lin, x = twins(Conv1D)
    hc, hl = calibration_hessians(conv, [x]), calibration_hessians(lin, [x])
    for p in ("0", "2"):
        assert hc[p].transposed and not hl[p].transposed
        assert torch.allclose(hc[p].H, hl[p].H)
        assert torch.equal(hc[p].weight_matrix(conv[int(p)].weight), lin[int(p)].weight[None])


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_layerwise_obs_prunes_conv1d_as_its_linear_twin(Conv1D, nm):
    conv, lin, x = twins(Conv1D, 1)
    y = torch.randn(64, 5)
    out = {}
    for name, model in (("conv", conv), ("lin", lin)):
        mask = Mask.ones(model, ["0.weight", "2.weight"])
        problem = Problem(model, nn.MSELoss(), (x, y))
        new, _ = LayerwiseOBS(nm=nm)(problem, mask, None if nm else 0.5)
        out[name] = new
    for i in (0, 2):
        name = f"{i}.weight"
        assert torch.equal(out["conv"][name], out["lin"][name].t())
        assert torch.allclose(conv[i].weight, lin[i].weight.t(), atol=1e-6)


@pytest.mark.parametrize("quantizer", [GPTQ(3, group_size=4, act_order=True), OBQ(3)], ids=repr)
def test_quantisers_treat_conv1d_as_its_linear_twin(Conv1D, quantizer, tmp_path):
    conv, lin, x = twins(Conv1D, 2)
    rc = quantizer.apply(conv, [x])
    rl = copy.deepcopy(quantizer).apply(lin, [x])
    for i in (0, 2):
        assert torch.allclose(conv[i].weight, lin[i].weight.t(), atol=1e-6)
        assert rc.layers[str(i)].kind == "Conv1D" and rl.layers[str(i)].kind == "Linear"
    save_quantized(conv, rc, tmp_path / "c.pt")
    fresh = load_quantized(twins(Conv1D, 9)[0], tmp_path / "c.pt")
    assert isinstance(fresh[0], QuantLinear) and fresh[0].transposed
    with torch.no_grad():
        assert torch.equal(fresh(x), conv(x))


def test_gpt2_from_config_quantises_and_reloads(Conv1D, tmp_path):
    from optbrain.experiments.quantise_transformer import LogitsOnly
    from optbrain.models.hf_gpt2 import gpt2_char_model

    state = torch.random.get_rng_state()
    model = LogitsOnly(gpt2_char_model(30, 16, 32, 2, 2, seed=0))
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone
    calib = [
        torch.randint(0, 30, (8, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)
    ]
    report = GPTQ(4).apply(model, calib)
    assert [s[0] for s in report.stages] == [
        "model.transformer.h.0.attn.c_attn",
        "model.transformer.h.1.attn.c_attn",
    ]  # one stage per GPT2Block
    assert len(report.layers) == 8 and all(r.kind == "Conv1D" for r in report.layers.values())
    assert report.skipped["model.lm_head"] == "weight tied to model.transformer.wte.weight"
    save_quantized(model, report, tmp_path / "g.pt")
    fresh = load_quantized(LogitsOnly(gpt2_char_model(30, 16, 32, 2, 2, seed=1)), tmp_path / "g.pt")
    x = calib[0]
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
